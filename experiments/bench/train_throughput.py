"""Training throughput: ours vs transformers' InstructBLIP (as it is, and under torch.compile), same weights.

One training step = forward + loss + backward + AdamW step on the trainable set (queries, Q-Former, projection,
ln_vision); vision and LLM frozen. Prints one JSON object: per batch size, samples/s of each side, the ratios,
peak memory (CUDA) and model-FLOP utilisation when ``--peak-tflops`` is given.

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
from common import build_pair, emit, environment, median_seconds, synthetic_batch  # noqa: E402


def make_step(model, batch, device: str, is_ours: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.05, fused=fused)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def check_agreement(pair, ours_batch, theirs_batch) -> float:
    """Relative difference of the loss in eval mode (no dropout), float32 on CPU, bf16 autocast on CUDA."""
    pair.ours.eval()
    pair.theirs.eval()
    with torch.no_grad():
        a = pair.ours(**ours_batch).loss.float()
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
    parser.add_argument("--size", default="cpu", choices=["tiny", "cpu", "released"])
    parser.add_argument("--llm", default="llama", choices=["llama", "t5"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--qformer-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64, help="LLM prompt incl. the visual tokens")
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time transformers under torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    args = parser.parse_args()

    torch.manual_seed(0)
    pair = build_pair(args.size, args.llm, args.device)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        ours_batch, theirs_batch = synthetic_batch(
            pair.config, batch_size, args.qformer_len, args.prompt_len, args.answer_len, args.device
        )
        agreement = check_agreement(pair, ours_batch, theirs_batch)
        pair.ours.train()
        pair.theirs.train()
        row = dict(batch=batch_size, loss_relative_difference=agreement)
        sides = {
            "ours": make_step(pair.ours, ours_batch, args.device, True),
            "transformers": make_step(pair.theirs, theirs_batch, args.device, False),
        }
        if args.compile:
            compiled = torch.compile(pair.theirs)
            sides["transformers_compiled"] = make_step(compiled, theirs_batch, args.device, False)
        for name, step in sides.items():
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = median_seconds(step, args.device, args.warmup, args.repeats)
            row[f"{name}_samples_per_s"] = batch_size / seconds
            if args.device.startswith("cuda"):
                row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["ours_vs_transformers"] = row["ours_samples_per_s"] / row["transformers_samples_per_s"]
        if args.compile:
            row["ours_vs_transformers_compiled"] = row["ours_samples_per_s"] / row["transformers_compiled_samples_per_s"]
        if args.peak_tflops:
            flops = flops_per_sample(sides["ours"], batch_size)
            row["tflop_per_sample"] = flops / 1e12
            row["ours_utilisation"] = row["ours_samples_per_s"] * flops / (args.peak_tflops * 1e12)
        rows.append(row)
        print(f"batch {batch_size}: {row}", file=sys.stderr)
    emit(dict(benchmark="train_throughput", size=args.size, llm=args.llm, environment=environment(args.device), rows=rows))


if __name__ == "__main__":
    main()
