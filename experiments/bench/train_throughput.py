"""Training throughput: ours vs transformers' InstructBLIP (as it is, and under torch.compile), same weights.

One training step = forward + loss + backward + AdamW step on the trainable set (queries, Q-Former, projection,
ln_vision); vision and LLM frozen. Sides:

* ``ours``: the training path (``model(**batch, return_logits=False)``: LM head and cross-entropy on the labelled
  positions only), what ``instructblip.train.module`` runs;
* ``ours_full_logits``: ours with the full logits (the plain ``forward``), to show that lever alone;
* ``transformers``: ``InstructBlipForConditionalGeneration`` as it is; ``transformers_compiled`` (``--compile``):
  the whole model under ``torch.compile``; ``ours_compiled`` (``--compile-ours``) likewise.

Prints one JSON object: per batch size and side, samples/s (from CPU time on a CPU, wall time on a GPU), the
median wall and CPU seconds per step and their spread, peak memory (CUDA), the ratios, and with ``--peak-tflops``
the FLOPs per sample (torch's FlopCounterMode) and the utilisation.

    python experiments/bench/train_throughput.py --size cpu --llm llama --batch-sizes 4,8
    python experiments/bench/train_throughput.py --size released --llm llama --device cuda --batch-sizes 8,16,32 \
        --compile --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_flags, build_pair, emit, environment, setup_device, synthetic_batch, time_sides  # noqa: E402


def make_step(model, batch, device: str, **forward_flags):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.05, fused=fused)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = model(**batch, **forward_flags).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def check_agreement(pair, ours_batch, theirs_batch, device: str) -> float:
    """Relative difference of the loss in eval mode (no dropout): ours' training path against transformers."""
    pair.ours.eval()
    pair.theirs.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        a = pair.ours(**ours_batch, return_logits=False).loss.float()
        b = pair.theirs(**theirs_batch).loss.float()
    return (a - b).abs().item() / max(b.abs().item(), 1e-12)


def flops_per_sample(step, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch_size


def peak_memory_gib(step, device: str) -> float | None:
    """Peak allocated memory of one step run alone (interleaved timing cannot attribute peaks to a side)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_flags(parser)
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--qformer-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64, help="LLM prompt incl. the visual tokens")
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time transformers under torch.compile")
    parser.add_argument("--compile-ours", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--no-full-logits", action="store_true", help="skip the ours_full_logits side")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    args = parser.parse_args()
    setup_device(args.device, args.threads)

    torch.manual_seed(0)
    pair = build_pair(args.size, args.llm, args.device)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        ours_batch, theirs_batch = synthetic_batch(
            pair.config, batch_size, args.qformer_len, args.prompt_len, args.answer_len, args.device
        )
        agreement = check_agreement(pair, ours_batch, theirs_batch, args.device)
        pair.ours.train()
        pair.theirs.train()
        sides = {
            "ours": make_step(pair.ours, ours_batch, args.device, return_logits=False),
            "transformers": make_step(pair.theirs, theirs_batch, args.device),
        }
        if not args.no_full_logits:
            sides["ours_full_logits"] = make_step(pair.ours, ours_batch, args.device)
        if args.compile:
            sides["transformers_compiled"] = make_step(torch.compile(pair.theirs), theirs_batch, args.device)
        if args.compile_ours:
            sides["ours_compiled"] = make_step(torch.compile(pair.ours), ours_batch, args.device, return_logits=False)
        row = dict(batch=batch_size, loss_relative_difference=agreement, sides={})
        peaks = {name: peak_memory_gib(step, args.device) for name, step in sides.items()}
        timings = time_sides(sides, args.device, args.warmup, args.repeats)
        for name, timing in timings.items():
            side = dict(samples_per_s=batch_size / timing.primary(args.device), **timing.as_dict())
            if peaks[name] is not None:
                side["peak_gib"] = peaks[name]
            row["sides"][name] = side
        speed = {name: side["samples_per_s"] for name, side in row["sides"].items()}
        row["ours_vs_transformers"] = speed["ours"] / speed["transformers"]
        row["ours_vs_transformers_wall"] = timings["transformers"].wall_s / timings["ours"].wall_s
        if "transformers_compiled" in speed:
            row["ours_vs_transformers_compiled"] = speed["ours"] / speed["transformers_compiled"]
        if args.peak_tflops:
            # Utilisation of the reference workload: transformers' FLOPs per sample (ours skips part of them, so its
            # own count is lower and reported beside it).
            reference = flops_per_sample(sides["transformers"], batch_size)
            row["tflop_per_sample"] = reference / 1e12
            row["ours_tflop_per_sample"] = flops_per_sample(sides["ours"], batch_size) / 1e12
            for name in speed:
                row["sides"][name]["utilisation"] = speed[name] * reference / (args.peak_tflops * 1e12)
        rows.append(row)
        print(f"batch {batch_size}: " + ", ".join(f"{k} {v:.2f}/s" for k, v in speed.items()), file=sys.stderr)
    emit(dict(
        benchmark="train_throughput", size=args.size, llm=args.llm,
        lengths=dict(qformer=args.qformer_len, prompt=args.prompt_len, answer=args.answer_len),
        timing=f"warmup {args.warmup}, {args.repeats} interleaved repeats, medians",
        environment=environment(args.device), rows=rows,
    ))


if __name__ == "__main__":
    main()
