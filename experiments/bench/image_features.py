"""Training step with the frozen vision trunk against the same step from precomputed trunk features.

``data.image_features=DIR`` (features written once by ``python -m instructblip.data.features``) makes the training
loader yield the frozen trunk's output instead of pixels, so a step no longer runs the vision trunk (EVA ViT-g, 39
blocks, at the released size); ``ln_vision`` still runs, it trains. This measures what that is worth: the same
model (ours, built from the same weights as the other benchmarks), the same batch, one training step (forward, loss
on the labelled positions, backward, AdamW on queries, Q-Former, projection and ln_vision; bf16 autocast on CUDA),
timed in turns as the other benchmarks do. Sides:

* ``pixels``: ``model(pixel_values=..., ...)``, what training runs without the switch;
* ``features``: ``model(image_features=..., ...)``, the features stored in the trunk's dtype (bf16 on CUDA, fp32 on
  CPU), as the command writes them by default on a GPU.

Before timing it checks that both give the same loss. Prints one JSON object (per batch size: samples/s of each
side, the ratio features / pixels, the loss difference; on CUDA the peak memory of each side; the bytes a stored
image takes in bf16).

    python experiments/bench/image_features.py --size cpu --llm llama --batch-sizes 4,8
    python experiments/bench/image_features.py --size released --llm llama --device cuda --batch-sizes 8,16,32
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_device_flags, build_pair, emit, environment, peak_memory_gib, setup_device, synthetic_batch, time_sides,
    train_like_the_module,
)
from train_throughput import make_step  # noqa: E402  (the same training step, fused AdamW on every device)


def loss_of(model, batch: dict, device: str) -> float:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    torch.manual_seed(0)  # the same dropout masks for both sides
    with torch.no_grad(), autocast:
        return float(model(**batch, return_logits=False).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_flags(parser)
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--qformer-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64, help="LLM prompt length including the visual tokens")
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    setup_device(args.device, args.threads)

    pair = build_pair(args.size, args.llm, args.device)
    model = pair.ours
    config = pair.config
    del pair  # transformers' side is not timed here; ours keeps the shared (frozen) LLM module
    train_like_the_module(model)
    vision = model.vision
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        with_pixels, _ = synthetic_batch(config, batch_size, args.qformer_len, args.prompt_len, args.answer_len,
                                         args.device)
        with torch.no_grad():  # what the features command stores: the trunk's output, in the trunk's dtype
            pixels = with_pixels["pixel_values"].to(next(vision.trunk.parameters()).dtype)
            features = vision._run_trunk(pixels)
        with_features = {k: v for k, v in with_pixels.items() if k != "pixel_values"}
        with_features["image_features"] = features
        losses = {"pixels": loss_of(model, with_pixels, args.device),
                  "features": loss_of(model, with_features, args.device)}
        steps = {"pixels": make_step(model, with_pixels, args.device, return_logits=False),
                 "features": make_step(model, with_features, args.device, return_logits=False)}
        timings = time_sides(steps, args.device, args.warmup, args.repeats)
        row = {"batch": batch_size, "loss": losses,
               "loss_rel_diff": abs(losses["features"] - losses["pixels"]) / max(abs(losses["pixels"]), 1e-12)}
        for name, timing in timings.items():
            row[name] = {**timing.as_dict(), "samples_per_s": batch_size / timing.primary(args.device),
                         "peak_memory_gib": peak_memory_gib(steps[name], args.device)}
        row["features_vs_pixels"] = timings["pixels"].primary(args.device) / timings["features"].primary(args.device)
        row["features_vs_pixels_wall"] = timings["pixels"].wall_s / timings["features"].wall_s
        results.append(row)
        print(f"batch {batch_size}: features/pixels {row['features_vs_pixels']:.2f}x", file=sys.stderr, flush=True)
    tokens, width = features.shape[1], features.shape[2]
    emit({
        "benchmark": "image_features",
        "size": args.size,
        "llm": args.llm,
        "lengths": {"qformer": args.qformer_len, "prompt": args.prompt_len, "answer": args.answer_len},
        "feature_shape": [tokens, width],
        "feature_bytes_per_image_bf16": tokens * width * 2,
        "ratio_from": "wall time" if args.device.startswith("cuda") else "process CPU time",
        "environment": environment(args.device),
        "results": results,
    })


if __name__ == "__main__":
    main()
