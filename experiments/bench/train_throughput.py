"""Training throughput: ours vs transformers' InstructBLIP (as it is, and under torch.compile), same weights.

One training step = forward + loss + backward + AdamW step on the trainable set (queries, Q-Former, projection,
ln_vision); vision and LLM frozen. Sides:

* ``ours``: the training path (``model(**batch, return_logits=False)``: LM head and cross-entropy on the labelled
  positions only), what ``instructblip.train.module`` runs, in its modes (``common.train_like_the_module``: the
  frozen vision trunk in eval mode, so its dropout layers, all at p=0, are skipped; the runs before 2026-11-27 had
  it in train mode);
* ``ours_full_logits``: ours with the full logits (the plain ``forward``), to show that lever alone;
* ``transformers``: ``InstructBlipForConditionalGeneration`` as it is; ``transformers_compiled``: the whole model
  under ``torch.compile``;
* ``ours_compiled``: ours with every transformer block compiled in place (``instructblip.train.parallelize
  .compile_blocks``, what ``stage.module.compile=true`` does in training). In-place means it cannot share a run
  with ``ours`` or ``ours_full_logits``. ``--compile-mode`` passes torch.compile's mode to every block; on the H200,
  ``reduce-overhead`` (each block replayed as a CUDA graph) failed in the first eval forward: the 39 ViT blocks share
  one compiled function, and a block's replay overwrote the output the next block still read.
  ``max-autotune-no-cudagraphs`` (``stage.module.compile_mode`` in training) weighs inductor's own Triton matrix
  kernels against cuBLAS's per shape while compiling.
* ``ours_compiled_whole``: ours' training path under one ``torch.compile`` of the whole model, as
  ``transformers_compiled`` compiles theirs (what ``stage.module.compile_scope=whole`` does in training).
* ``ours_graphed`` (CUDA): ours' whole step (forward, backward, fused AdamW with ``capturable=True``) captured once
  as a CUDA graph and replayed (``instructblip.train.cuda_graph``); ``ours_compiled_graphed``: the same over the
  blocks compiled in place (so, like ``ours_compiled``, without the eager sides of ours). Captured at the first
  call after 3 warm-up steps; each call copies the batch into the graph's buffers. A replay allocates nothing, so
  their ``peak_gib`` is the peak of the warm-up steps and the capture (``peak_of``).
* ``ours_packed``: ours' training path with ``pack_sequences``: the samples packed without padding
  before the LLM. It pays off on batches of mixed lengths: ``--mixed-lengths`` gives each row the instruction and
  answer lengths of a draw from the instruction-tuning mixture (``padding.py``'s length model), right-padded to
  the longest, instead of the fixed ``--prompt-len``/``--answer-len``; each timed call then runs ``K`` such
  micro-batches (``--mixed-lengths K``, seeds 0..K-1), since one batch of 8 holds a long sample only about half
  of the time.

* ``llm_alone``: no model, only the frozen LLM's call that ours' training path makes (T5: the whole
  seq2seq model; decoder-only: its body without the head), replayed with the inputs ours gave it (captured once)
  and a backward from the mean of its output: how much of a step the LLM both implementations share takes, so the
  best ratio any Q-Former and vision encoder could reach beside that LLM is ``llm_alone_vs_transformers``.

``--sides`` picks them (default: ours, transformers, ours_full_logits).

Prints one JSON object: per batch size and side, samples/s (from CPU time on a CPU, wall time on a GPU), the
median wall and CPU seconds per step and their spread, peak memory (CUDA), the ratios, and with ``--peak-tflops``
the FLOPs per sample (torch's FlopCounterMode) and the utilisation. ``--profile``: on a GPU each side's kernel time
against its wall time (``sides.*.profile``); on a CPU each side's self CPU time and calls per op, in rounds whose
order alternates between the sides (``op_profile``: the ops that differ most).

    python experiments/bench/train_throughput.py --size cpu --llm llama --batch-sizes 4,8
    python experiments/bench/train_throughput.py --size released --llm llama --device cuda --batch-sizes 8,16,32 \
        --sides ours,transformers --peak-tflops 790
    python experiments/bench/train_throughput.py --size released --llm llama --device cuda --batch-sizes 8,16 \
        --sides ours_compiled,transformers_compiled,transformers
    python experiments/bench/train_throughput.py --size released --llm llama --device cuda --batch-sizes 8,16 \
        --sides ours_compiled_graphed,ours_compiled,transformers_compiled,transformers
    python experiments/bench/train_throughput.py --size cpu --llm llama --batch-sizes 8,16 --mixed-lengths 4 \
        --sides ours,ours_packed,transformers
    python experiments/bench/train_throughput.py --size tiny --llm t5 --batch-sizes 8 --sides ours,transformers \
        --profile
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_device_flags, build_pair, emit, environment, first_call, kernel_profile, op_profile, setup_device, sync,
    synthetic_batch, time_sides, train_like_the_module,
)
from padding import draw_text_lengths  # noqa: E402

from instructblip.model.packing import row_layout, seq2seq_row_layout  # noqa: E402


SIDES = ("ours", "ours_full_logits", "ours_compiled", "ours_compiled_whole", "ours_packed", "ours_graphed",
         "ours_compiled_graphed", "transformers", "transformers_compiled", "llm_alone")
# sides that compile ours' blocks in place
IN_PLACE = {"ours_compiled", "ours_compiled_graphed"}
# (numerator, denominator) of the reported speed ratios, where both sides ran
RATIOS = (("ours", "transformers"), ("ours", "transformers_compiled"), ("ours_compiled", "transformers"),
          ("ours_compiled", "transformers_compiled"), ("ours_compiled_whole", "transformers_compiled"),
          ("ours_compiled_whole", "transformers"), ("ours_packed", "transformers"), ("ours_packed", "ours"),
          ("ours_graphed", "transformers"), ("ours_graphed", "transformers_compiled"), ("ours_graphed", "ours"),
          ("ours_compiled_graphed", "transformers"), ("ours_compiled_graphed", "transformers_compiled"),
          ("ours_compiled_graphed", "ours_compiled"), ("llm_alone", "transformers"))


def bench_adamw(model, capturable: bool = False) -> torch.optim.AdamW:
    """Every side's optimizer over its trainable parameters: torch's fused AdamW on a CPU and a GPU alike (what
    instructblip.train.optim picks); ``capturable`` for a step replayed as a CUDA graph."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.05, fused=True,
                             capturable=capturable)


def step_autocast(device: str):
    """The precision every side trains in: bf16 autocast on a GPU, float32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def make_step(model, batch, device: str, cudagraphs: bool = False, **forward_flags):
    """One training step on ``batch``, or on each micro-batch in turn when ``batch`` is a list (``--mixed-lengths``).

    ``cudagraphs``: the model's blocks replay CUDA graphs; each step is marked as a new one, so the graphs' output
    buffers may be reused from one step to the next.
    """
    batches = batch if isinstance(batch, list) else [batch]
    optimizer = bench_adamw(model)
    autocast = step_autocast(device)

    def step():
        for micro_batch in batches:
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                loss = model(**micro_batch, **forward_flags).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_llm_alone_step(model, batch, device: str):
    """The LLM call of ours' training path on ``batch`` (or on each micro-batch of a list), alone: its module and
    inputs are captured from one forward (pre-hooks on the LLM and its body: the outer call is the one the path
    makes), then each step replays it with the captured input embeddings as a leaf that needs a gradient, as the
    Q-Former's output does."""
    llm = model.llm.hf_model
    autocast = step_autocast(device)
    replays = []
    for micro_batch in batch if isinstance(batch, list) else [batch]:
        calls = []

        def capture(module, args, kwargs):
            calls.append((module, dict(kwargs)))

        hooks = [llm.register_forward_pre_hook(capture, with_kwargs=True)]
        if llm.base_model is not llm:
            hooks.append(llm.base_model.register_forward_pre_hook(capture, with_kwargs=True))
        try:
            with torch.no_grad(), autocast:
                model(**micro_batch, return_logits=False)
        finally:
            for hook in hooks:
                hook.remove()
        module, kwargs = calls[0]
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].detach().requires_grad_()
        replays.append((module, kwargs))

    def step():
        for module, kwargs in replays:
            with autocast:
                output = module(**kwargs)[0]
            output.float().mean().backward()
            kwargs["inputs_embeds"].grad = None
        return output

    return step


def make_graphed_step(model, batch, device: str, **forward_flags):
    """The whole step replayed as one CUDA graph (``instructblip.train.cuda_graph.CudaGraphTrainStep``): captured
    at the first call, after its warm-up steps, so a failed capture is reported like any failed side. Each call
    copies the batch into the graph's input buffers, as a training loop would."""
    from instructblip.train.cuda_graph import CudaGraphTrainStep

    graphed = None

    def step():
        nonlocal graphed
        if graphed is None:
            if not device.startswith("cuda"):
                raise RuntimeError("a CUDA graph needs a CUDA device")
            torch.cuda.reset_peak_memory_stats()
            graphed = CudaGraphTrainStep(model, bench_adamw(model, capturable=True), batch, forward_flags)
            # a replay allocates nothing, so the peak of one step is that of the warm-up steps and the capture
            step.capture_peak_gib = torch.cuda.max_memory_allocated() / 2**30
            print(f"  captured: peak {step.capture_peak_gib:.1f} GiB while capturing", file=sys.stderr, flush=True)
        return graphed(batch)

    return step


def packed(step, model):
    """``step`` with the model's ``pack_sequences`` on (the other sides share the model, with it off)."""

    def packed_step():
        model.config.pack_sequences = True
        try:
            return step()
        finally:
            model.config.pack_sequences = False

    return packed_step


def mixed_length_batch(config, batch_size: int, qformer_len: int, device: str, seed: int = 0):
    """Like ``synthetic_batch``, but each row has the instruction and answer lengths of a draw from the
    instruction-tuning mixture (``padding.draw_text_lengths``), right-padded to the longest: decoder-only rows
    ``BOS instruction answer``; encoder-decoder rows the instruction on the encoder's side and the answer (labels,
    with a ``decoder_attention_mask``) on the decoder's."""
    drawn, _ = draw_text_lengths(batch_size, seed)
    queries = config.num_query_tokens
    pad = config.text_config.pad_token_id or 0
    if not config.use_decoder_only_language_model:
        widest_instruction = max(instruction for instruction, _ in drawn)
        widest_answer = max(answer for _, answer in drawn)
        ours, theirs = synthetic_batch(config, batch_size, qformer_len, queries + widest_instruction, widest_answer,
                                       "cpu", seed)
        answer_mask = torch.zeros(batch_size, widest_answer, dtype=torch.long)
        for row, (instruction, answer) in enumerate(drawn):
            for batch, offset in ((ours, 0), (theirs, queries)):
                batch["input_ids"][row, offset + instruction :] = pad
                batch["attention_mask"][row, offset + instruction :] = 0
            ours["labels"][row, answer:] = -100   # the two sides share the labels tensor
            answer_mask[row, :answer] = 1
        ours["decoder_attention_mask"] = theirs["decoder_attention_mask"] = answer_mask
    else:
        width = max(1 + instruction + answer for instruction, answer in drawn)
        ours, theirs = synthetic_batch(config, batch_size, qformer_len, queries + width, 0, "cpu", seed)
        for row, (instruction, answer) in enumerate(drawn):
            answer_start, end = 1 + instruction, 1 + instruction + answer
            for batch, offset in ((ours, 0), (theirs, queries)):
                ids = batch["input_ids"][row]
                batch["labels"][row, offset + answer_start : offset + end] = ids[offset + answer_start : offset + end]
                ids[offset + end :] = pad
                batch["attention_mask"][row, offset + end :] = 0
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(ours), move(theirs)


def check_agreement(pair, ours_batch, theirs_batch, device: str) -> float:
    """Relative difference of the loss in eval mode (no dropout): ours' training path against transformers (the
    largest over the micro-batches when the batches are lists)."""
    if isinstance(ours_batch, list):
        return max(check_agreement(pair, a, b, device) for a, b in zip(ours_batch, theirs_batch))
    pair.ours.eval()
    pair.theirs.eval()
    with torch.no_grad(), step_autocast(device):
        a = pair.ours(**ours_batch, return_logits=False).loss.float()
        b = pair.theirs(**theirs_batch).loss.float()
    return (a - b).abs().item() / max(b.abs().item(), 1e-12)


def flops_per_sample(step, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_flags(parser)
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--qformer-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64, help="LLM prompt incl. the visual tokens")
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--mixed-lengths", type=int, default=0, metavar="K",
                        help="K micro-batches per timed call whose rows have the mixture's instruction/answer lengths "
                             "(instead of the fixed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sides", default="ours,transformers,ours_full_logits",
                        help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: profile one step of each side (kernel time against wall time, launches, syncs); "
                             "CPU: each side's self CPU time and calls per op, interleaved rounds (row 'op_profile')")
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode for ours_compiled's blocks (default: torch's default); with "
                             "ours_compiled_graphed, max-autotune-no-cudagraphs (the step's graph is the only one)")
    args = parser.parse_args()
    setup_device(args.device, args.threads)
    chosen = args.sides.split(",")
    unknown = sorted(set(chosen) - set(SIDES))
    if unknown:
        parser.error(f"--sides: unknown {unknown}; allowed: {', '.join(SIDES)}")
    eager_ours = {"ours", "ours_full_logits", "ours_compiled_whole", "ours_packed", "ours_graphed"}
    if IN_PLACE & set(chosen) and eager_ours & set(chosen):
        parser.error(f"--sides: {', '.join(sorted(IN_PLACE & set(chosen)))} compile ours in place; run them without "
                     f"{', '.join(sorted(eager_ours))}")

    torch.manual_seed(0)
    # ours_compiled compiles the LLM's blocks in place: it must not be transformers' own LLM module
    pair = build_pair(args.size, args.llm, args.device, share_llm=not IN_PLACE & set(chosen))
    cudagraphs = args.compile_mode == "reduce-overhead"
    if (IN_PLACE | {"ours_compiled_whole", "transformers_compiled"}) & set(chosen):
        # every batch size gets its own static-shape graphs on both compiled sides (torch would otherwise compile
        # the second batch size with a symbolic batch dimension, for ours only, since transformers' whole-model
        # compile runs at one batch size per job)
        torch._dynamo.config.automatic_dynamic_shapes = False
    if IN_PLACE & set(chosen):
        from instructblip.train.parallelize import compile_blocks

        compile_blocks(pair.ours, mode=args.compile_mode)
    compiled_theirs = torch.compile(pair.theirs) if "transformers_compiled" in chosen else None
    compiled_ours = torch.compile(pair.ours) if "ours_compiled_whole" in chosen else None
    # Each side trains its own Q-Former during the timed steps: every batch size starts again from the shared
    # initial weights, so the agreement check compares the two implementations, not two training histories.
    initial = [(p, p.detach().clone()) for model in (pair.ours, pair.theirs) for p in model.parameters()
               if p.requires_grad]
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        with torch.no_grad():
            for param, value in initial:
                param.copy_(value)
        if args.mixed_lengths:
            drawn = [
                mixed_length_batch(pair.config, batch_size, args.qformer_len, args.device, seed=seed)
                for seed in range(args.mixed_lengths)
            ]
            ours_batch, theirs_batch = [ours for ours, _ in drawn], [theirs for _, theirs in drawn]
        else:
            ours_batch, theirs_batch = synthetic_batch(
                pair.config, batch_size, args.qformer_len, args.prompt_len, args.answer_len, args.device
            )
        agreement = check_agreement(pair, ours_batch, theirs_batch, args.device)
        packed_agreement = None
        if "ours_packed" in chosen:
            pair.ours.config.pack_sequences = True
            packed_agreement = check_agreement(pair, ours_batch, theirs_batch, args.device)
            pair.ours.config.pack_sequences = False
        train_like_the_module(pair.ours)
        pair.theirs.train()
        factories = {
            "ours": lambda: make_step(pair.ours, ours_batch, args.device, return_logits=False),
            "ours_full_logits": lambda: make_step(pair.ours, ours_batch, args.device),
            "ours_compiled": lambda: make_step(
                pair.ours, ours_batch, args.device, cudagraphs=cudagraphs, return_logits=False
            ),
            "ours_packed": lambda: packed(
                make_step(pair.ours, ours_batch, args.device, return_logits=False), pair.ours
            ),
            "transformers": lambda: make_step(pair.theirs, theirs_batch, args.device),
            "ours_compiled_whole": lambda: make_step(compiled_ours, ours_batch, args.device, return_logits=False),
            "ours_graphed": lambda: make_graphed_step(pair.ours, ours_batch, args.device, return_logits=False),
            "ours_compiled_graphed": lambda: make_graphed_step(pair.ours, ours_batch, args.device,
                                                               return_logits=False),
            "transformers_compiled": lambda: make_step(compiled_theirs, theirs_batch, args.device),
            "llm_alone": lambda: make_llm_alone_step(pair.ours, ours_batch, args.device),
        }
        sides = {name: factories[name]() for name in chosen}
        samples_per_call = batch_size * max(args.mixed_lengths, 1)
        row = dict(batch=batch_size, loss_relative_difference=agreement, sides={})
        if packed_agreement is not None:
            row["packed_loss_relative_difference"] = packed_agreement
        if args.mixed_lengths:  # LLM positions: the samples' own, the padded batches', the packed rows'
            # (encoder-decoder: the encoder's in llm_positions, the decoder's in decoder_positions)
            positions = dict(useful=0, padded=0, packed=0)
            decoder_positions = dict(useful=0, padded=0, packed=0)
            for micro_batch in ours_batch:
                lengths = (micro_batch["attention_mask"].sum(dim=1) + pair.config.num_query_tokens).tolist()
                if "decoder_attention_mask" in micro_batch:
                    answers = micro_batch["decoder_attention_mask"].sum(dim=1).tolist()
                    packed_rows, row_length, answer_row_length = seq2seq_row_layout(lengths, answers)
                    decoder_positions["useful"] += sum(answers)
                    decoder_positions["padded"] += batch_size * max(answers)
                    decoder_positions["packed"] += len(packed_rows) * answer_row_length
                else:
                    packed_rows, row_length = row_layout(lengths)
                positions["useful"] += sum(lengths)
                positions["padded"] += batch_size * max(lengths)
                positions["packed"] += len(packed_rows) * row_length
            row["llm_positions"] = positions
            if decoder_positions["useful"]:
                row["decoder_positions"] = decoder_positions
        print(f"batch {batch_size}:", file=sys.stderr, flush=True)
        first_calls = {name: first_call(name, step, args.device)[0] for name, step in sides.items()}
        failed = {name: call["error"] for name, call in first_calls.items() if "error" in call}
        if failed:
            row["failed_sides"] = failed
            sides = {name: step for name, step in sides.items() if name not in failed}
        timings = time_sides(sides, args.device, args.warmup, args.repeats)
        for name, timing in timings.items():
            row["sides"][name] = dict(
                samples_per_s=samples_per_call / timing.primary(args.device), **timing.as_dict(), **first_calls[name]
            )
            if hasattr(sides[name], "capture_peak_gib"):  # a graphed side: the replay's peak is not seen
                row["sides"][name].update(peak_gib=sides[name].capture_peak_gib, peak_of="warm-up and capture")
        speed = {name: side["samples_per_s"] for name, side in row["sides"].items()}
        for mine, theirs in RATIOS:
            if mine in speed and theirs in speed:
                row[f"{mine}_vs_{theirs}"] = speed[mine] / speed[theirs]
                row[f"{mine}_vs_{theirs}_wall"] = timings[theirs].wall_s / timings[mine].wall_s
        if args.peak_tflops:
            # Utilisation of the reference workload: transformers' FLOPs per sample counted on its eager model (ours
            # skips part of them, so its own count is lower and reported beside it).
            reference = flops_per_sample(make_step(pair.theirs, theirs_batch, args.device), samples_per_call)
            row["tflop_per_sample"] = reference / 1e12
            if "ours" in sides:
                row["ours_tflop_per_sample"] = flops_per_sample(sides["ours"], samples_per_call) / 1e12
            for name in speed:
                row["sides"][name]["utilisation"] = speed[name] * reference / (args.peak_tflops * 1e12)
        if args.profile and not args.device.startswith("cuda"):
            row["op_profile"] = op_profile(sides)
            print("  profiled ms per step: " + ", ".join(f"{name} {ms:.1f}" for name, ms in
                                                       row["op_profile"]["total_ms"].items()), file=sys.stderr)
        elif args.profile:
            for name, step in sides.items():
                row["sides"][name]["profile"] = kernel_profile(step, args.device)
                busy = row["sides"][name]["profile"]
                print(f"  {name}: kernels {busy['kernel_s'] * 1e3:.0f} ms of {busy['profiled_wall_s'] * 1e3:.0f} ms, "
                      f"{busy['kernel_launches']} launches, syncs {busy['sync_calls']}", file=sys.stderr, flush=True)
        rows.append(row)
        print(f"batch {batch_size}: " + ", ".join(f"{k} {v:.2f}/s" for k, v in speed.items()), file=sys.stderr)
    emit(dict(
        benchmark="train_throughput", size=args.size, llm=args.llm,
        lengths=(dict(qformer=args.qformer_len,
                      mixture=f"padding.draw_text_lengths, {args.mixed_lengths} micro-batches "
                              f"(seeds 0..{args.mixed_lengths - 1})") if args.mixed_lengths
                 else dict(qformer=args.qformer_len, prompt=args.prompt_len, answer=args.answer_len)),
        timing=f"warmup {args.warmup}, {args.repeats} interleaved repeats, medians",
        compile_mode=args.compile_mode if IN_PLACE & set(chosen) else None,
        environment=environment(args.device), rows=rows,
    ))


if __name__ == "__main__":
    main()
