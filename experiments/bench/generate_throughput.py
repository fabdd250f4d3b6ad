"""Generation throughput: ours vs transformers' InstructBLIP generate(), same weights, same inputs.

Greedy decoding of ``--new-tokens`` tokens (EOS suppressed through ``min_new_tokens`` so every row produces them
all) at each batch size, and beam search with ``--beams`` beams (``length_penalty=1``, transformers' default
``early_stopping``). Ours decodes with its lean loops (``instructblip.model.decoding``, dynamic KV cache):
``greedy`` / ``greedy_encoder_decoder`` and ``beam_search`` / ``beam_search_encoder_decoder``, which
``LanguageModel.generate`` picks for these settings; transformers runs its ``generate``. The token ids of both
sides are compared before timing (``identical_token_ids``), and each row records which path ours took
(``ours_path``). Each timed call includes the image encoding (vision + Q-Former + projection) and the prompt
prefill, as a user's generate call does.

``--static`` (GPU): also times both sides with a static KV cache and a compiled decode step (transformers:
``cache_implementation="static"``, which compiles its forward on CUDA, greedy only; ours, greedy and beam search
of decoder-only LLMs: ``decoding_options`` cache="static", compile=True).

``--graphed`` (GPU, greedy, decoder-only): ours' whole decode step (token choice and forward) captured once as a
CUDA graph and replayed per token (``decoding_options`` cache="static", step="graphed"; side
``ours_static_graphed``), and the same over a ``torch.compile``d forward (``ours_static_compiled_graphed``).
``--autotune`` (GPU, greedy, decoder-only): the graphed step over a forward compiled in max-autotune's mode (side
``ours_static_autotuned_graphed``; inductor weighs its own Triton matrix kernels against cuBLAS per shape).
``--triton`` (GPU, greedy, decoder-only): the graphed step over the compiled forward with the LLM's linear layers
through Triton's matrix-vector kernel for the one-token steps (``decoding_options`` kernels="triton"; side
``ours_static_compiled_graphed_triton``).
``--fixed`` (any device): that step without the graph (step="fixed"; side ``ours_static_fixed``).
``--profile`` (GPU): one call of each side under torch's profiler: its kernels' time against its wall time, the
kernel launches, the host-device synchronisations and the costliest kernels (where a call's time goes: the image
encoding and prefill against the decode steps, the GPU waiting on the host).
``--phases`` (any device): also times ours' image encoding alone and the encoding with the prompt's prefill (one LLM
forward over the whole prompt, no decoding), and gives every side's decode time per new token: its call's wall time
less the encoding and prefill, over the new tokens (``decode_ms_per_token``; the phases under ``phases_s``). With
``--graphed`` the two phases are also timed replayed as CUDA graphs (``*_graphed``), as the graphed sides run them,
and those sides' decode time is taken against these.

Prints one JSON object: new tokens per second of each side (from CPU time on a CPU, wall time on a GPU), median
wall and CPU seconds per call, and the ratios.

    python experiments/bench/generate_throughput.py --size cpu --batch-sizes 1,8
    python experiments/bench/generate_throughput.py --size released --device cuda --batch-sizes 1,16,64 --static
    python experiments/bench/generate_throughput.py --size released --device cuda --batch-sizes 1,16 --modes greedy \
        --static --graphed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from instructblip.model import decoding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_device_flags, build_pair, emit, environment, first_call, kernel_profile, setup_device, synthetic_batch,
    time_sides,
)


def generation_inputs(pair, batch_size: int, prompt_len: int, device: str):
    ours, theirs = synthetic_batch(pair.config, batch_size, 32, prompt_len, 0, device)
    ours.pop("labels"), theirs.pop("labels")
    return ours, theirs


def ours_path(pair, settings: dict) -> str:
    """Which decoding loop our generate takes for ``settings`` (``transformers.generate`` when none applies)."""
    llm = pair.ours.llm
    kwargs = {**settings, "eos_token_id": 0, "pad_token_id": 0}
    suffix = "" if llm.kind == "decoder_only" else "_encoder_decoder"
    if decoding.handles(llm.hf_model, kwargs):
        return "decoding.greedy" + suffix
    if decoding.handles_beam_search(llm.hf_model, kwargs):
        return "decoding.beam_search" + suffix
    return "transformers.generate"


def prefill_phases(pair, batch: dict, cuda: bool, graphed: bool = False) -> dict:
    """Callables for what every generate call does before its first new token: the image encoding (vision encoder,
    Q-Former, projection), and that plus the prompt's prefill (one LLM forward over the prompt with the visual
    tokens, its KV cache kept as a decoding loop keeps it). ``graphed``: also both replayed as CUDA graphs, as the
    graphed sides run them (``encode_graphed``, ``encode_prefill_graphed``)."""
    model = pair.ours
    batch = {k: v.to(model.device) for k, v in batch.items()}

    @torch.no_grad()
    def encode():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return model.encode_images(
                batch["pixel_values"], batch.get("qformer_input_ids"), batch.get("qformer_attention_mask"))

    @torch.no_grad()
    def encode_prefill():
        visual = encode()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            embeds, mask = model.llm.embed_with_visual(visual, batch["input_ids"], batch.get("attention_mask"))
            if model.llm.kind == "decoder_only":
                return model.llm.hf_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return model.llm.hf_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)

    phases = {"encode": encode, "encode_prefill": encode_prefill}
    if graphed:
        from instructblip.model import graphs

        phases["encode_graphed"] = graphs.GraphedCall(encode)
        phases["encode_prefill_graphed"] = graphs.GraphedCall(lambda: encode_prefill().logits)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_flags(parser)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64, help="LLM prompt incl. the visual tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=5, help="0: skip beam search")
    parser.add_argument("--modes", default="greedy,beam", help="which of greedy, beam to time")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--static", action="store_true", help="also time static caches with compiled decode steps")
    parser.add_argument("--graphed", action="store_true",
                        help="greedy, CUDA: also time ours' decode step replayed as a CUDA graph (eager, compiled)")
    parser.add_argument("--fixed", action="store_true", help="greedy: also time ours' fixed-shape decode step")
    parser.add_argument("--autotune", action="store_true",
                        help="greedy, CUDA: also time the graphed step over a forward compiled with max-autotune")
    parser.add_argument("--triton", action="store_true",
                        help="greedy, CUDA: also the graphed, compiled step with Triton's gemv for the decode steps")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: profile one call of each side (kernel time against wall time, launches, syncs)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the image encoding and the prefill alone: decode time per new token")
    args = parser.parse_args()
    setup_device(args.device, args.threads)

    pair = build_pair(args.size, args.llm, args.device)
    pair.ours.eval()
    pair.theirs.eval()
    chosen = args.modes.split(",")
    modes = [("greedy", 1)] * ("greedy" in chosen) + [("beam", args.beams)] * ("beam" in chosen and args.beams > 1)
    if not modes:
        parser.error(f"--modes {args.modes!r}: choose from greedy, beam (beam needs --beams > 1)")
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        ours_batch, theirs_batch = generation_inputs(pair, batch_size, args.prompt_len, args.device)
        for mode, beams in modes:
            # min_new_tokens = max_new_tokens: EOS is suppressed, every row produces exactly new_tokens tokens.
            settings = dict(
                num_beams=beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                repetition_penalty=1.0, length_penalty=1.0, do_sample=False,
            )

            cuda = args.device.startswith("cuda")

            def ours(options=None):
                pair.ours.llm.decoding_options = options or {}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    return pair.ours.generate_ids(ours_batch, **settings)

            def theirs(**extra):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    out = pair.theirs.generate(**theirs_batch, **settings, **extra)
                if pair.config.use_decoder_only_language_model:
                    return out[:, theirs_batch["input_ids"].shape[1]:]
                return out[:, 1:]

            sides = {"ours": ours, "transformers": theirs}
            if args.static:
                sides["ours_static_compiled"] = lambda: ours({"cache": "static", "compile": True})
                if mode == "greedy":  # transformers' beam search reorders a static cache by rebinding its tensors
                    sides["transformers_static_compiled"] = lambda: theirs(cache_implementation="static")
            if mode == "greedy" and args.fixed:
                sides["ours_static_fixed"] = lambda: ours({"cache": "static", "step": "fixed"})
            if mode == "greedy" and args.graphed:
                sides["ours_static_graphed"] = lambda: ours({"cache": "static", "step": "graphed"})
                sides["ours_static_compiled_graphed"] = lambda: ours(
                    {"cache": "static", "step": "graphed", "compile": True})
            if mode == "greedy" and args.autotune:
                sides["ours_static_autotuned_graphed"] = lambda: ours(
                    {"cache": "static", "step": "graphed", "compile": "max-autotune"})
            if mode == "greedy" and args.triton:
                sides["ours_static_compiled_graphed_triton"] = lambda: ours(
                    {"cache": "static", "step": "graphed", "compile": True, "kernels": "triton"})
            reference = theirs().cpu()
            row = dict(batch=batch_size, mode=mode, beams=beams, ours_path=ours_path(pair, settings), sides={})
            print(f"batch {batch_size} {mode}:", file=sys.stderr, flush=True)
            first_calls = {}
            for name, fn in list(sides.items()):  # a compiled side compiles in its first call
                first_calls[name], ids = first_call(name, fn, args.device)
                if "error" in first_calls[name]:
                    row.setdefault("failed_sides", {})[name] = first_calls.pop(name)["error"]
                    del sides[name]
                elif name.startswith("ours"):
                    row[f"identical_token_ids_{name}"] = torch.equal(ids.cpu(), reference)
            row["identical_token_ids"] = all(v for k, v in row.items() if k.startswith("identical_token_ids_"))
            timings = time_sides(sides, args.device, args.warmup, args.repeats)
            for name, timing in timings.items():
                row["sides"][name] = dict(
                    tokens_per_s=batch_size * args.new_tokens / timing.primary(args.device), **timing.as_dict(),
                    **first_calls[name],
                )
            if "ours_static_compiled_graphed_triton" in sides:  # the kernel's choices per (rows, out, in)
                from instructblip.model.gemv import best_configs

                row["triton_configs"] = best_configs()
            if args.phases:
                graphed_phases = cuda and (args.graphed or args.triton) and mode == "greedy"
                phases = time_sides(prefill_phases(pair, ours_batch, cuda, graphed_phases), args.device, args.warmup,
                                    args.repeats)
                row["phases_s"] = {name: timing.primary(args.device) for name, timing in phases.items()}
                for name, timing in timings.items():
                    before = "encode_prefill_graphed" if graphed_phases and "graphed" in name else "encode_prefill"
                    row["sides"][name]["decode_ms_per_token"] = 1000 * (
                        timing.primary(args.device) - row["phases_s"][before]) / args.new_tokens
            if args.profile and cuda:
                for name, fn in sides.items():
                    row["sides"][name]["profile"] = kernel_profile(fn, args.device)
            speed = {name: side["tokens_per_s"] for name, side in row["sides"].items()}
            for mine, theirs_name, key in (
                ("ours", "transformers", "ours_vs_transformers"),
                ("ours_static_compiled", "transformers_static_compiled", "ours_static_vs_transformers_static"),
                ("ours_static_compiled", "transformers", "ours_static_vs_transformers"),
                ("ours_static_fixed", "transformers", "ours_fixed_vs_transformers"),
                ("ours_static_graphed", "transformers", "ours_graphed_vs_transformers"),
                ("ours_static_graphed", "transformers_static_compiled", "ours_graphed_vs_transformers_static"),
                ("ours_static_compiled_graphed", "transformers", "ours_compiled_graphed_vs_transformers"),
                ("ours_static_compiled_graphed", "transformers_static_compiled",
                 "ours_compiled_graphed_vs_transformers_static"),
                ("ours_static_autotuned_graphed", "transformers", "ours_autotuned_graphed_vs_transformers"),
                ("ours_static_compiled_graphed_triton", "transformers", "ours_triton_graphed_vs_transformers"),
                ("ours_static_compiled_graphed_triton", "ours_static_compiled_graphed", "triton_vs_cublas_graphed"),
            ):
                if mine in speed and theirs_name in speed:
                    row[key] = speed[mine] / speed[theirs_name]
            if "ours" in speed and "transformers" in speed:
                row["ours_vs_transformers_wall"] = timings["transformers"].wall_s / timings["ours"].wall_s
            rows.append(row)
            print(f"batch {batch_size} {mode}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in speed.items()),
                  file=sys.stderr)
            # the whole row (phases, profiles) in the log as it ends: a run stopped later still leaves it there
            print(f"row {json.dumps(row)}", file=sys.stderr, flush=True)
    pair.ours.llm.decoding_options = {}
    emit(dict(
        benchmark="generate_throughput", size=args.size, llm=args.llm, new_tokens=args.new_tokens,
        prompt_len=args.prompt_len, timing=f"warmup {args.warmup}, {args.repeats} interleaved repeats, medians",
        environment=environment(args.device), rows=rows,
    ))


if __name__ == "__main__":
    main()
