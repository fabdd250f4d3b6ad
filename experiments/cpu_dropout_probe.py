"""How much of the tiny T5 training step's gap to 1.2x a faster CPU dropout would close (a lever measured, not kept:
experiments/README.md, "Session 19").

torch's CPU dropout draws its mask with ``bernoulli_``; the same Bernoulli(1 - p) mask and scale can come from
uniform draws (``rand_like(x).ge_(p)``), about 1.8x faster on the largest mask of the step. This script times ours'
training step (``bench/train_throughput.py``'s, tiny size, T5, one thread) three ways in one process, against
transformers' as it is:

* ``ours``: as it is;
* ``ours_faster_attention_dropout``: ``F.scaled_dot_product_attention`` replaced, during ours' step only, by SDPA's
  math (scores, softmax, then the mask above) whenever it is asked for dropout: the Q-Former's and the frozen T5's
  attention;
* ``ours_faster_dropout``: that, and ``F.dropout`` (every ``nn.Dropout``, the T5's among them) replaced the same way.

The replacement is module-level patching, fit for a measurement and nothing else: both sides share the frozen T5 in
the benchmark, so only ours' steps run with it.

It first prints the two dropouts' forward times on two mask shapes, then one JSON line per batch size.

    python experiments/cpu_dropout_probe.py [--batch-sizes 4,8] [--repeats 21]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from common import build_pair, setup_device, synthetic_batch, time_sides, train_like_the_module  # noqa: E402
from train_throughput import make_step  # noqa: E402

TORCH_DROPOUT, TORCH_SDPA = F.dropout, F.scaled_dot_product_attention


def uniform_mask_dropout(x, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return x
    with torch.no_grad():
        scaled_mask = torch.rand_like(x).ge_(p).mul_(1 / (1 - p))
    return x * scaled_mask


def math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p == 0.0:
        return TORCH_SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    scores = (q * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)) @ k.transpose(-2, -1)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return uniform_mask_dropout(scores.softmax(-1), dropout_p) @ v


def patched(step, dropout: bool):
    def run():
        F.scaled_dot_product_attention = math_attention
        if dropout:
            F.dropout = uniform_mask_dropout
        try:
            return step()
        finally:
            F.dropout, F.scaled_dot_product_attention = TORCH_DROPOUT, TORCH_SDPA
    return run


def mask_timings(shapes=((8, 4, 64, 64), (8, 64, 32)), calls: int = 300) -> dict[str, dict[str, float]]:
    """Microseconds per forward call of each dropout (p = 0.1) on the step's largest mask and a Q-Former-sized one."""
    out = {}
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        for name, dropout in (("F.dropout", TORCH_DROPOUT), ("uniform_mask_dropout", uniform_mask_dropout)):
            for _ in range(10):
                dropout(x, 0.1, True)
            start = time.perf_counter()
            for _ in range(calls):
                dropout(x, 0.1, True)
            out.setdefault("x".join(map(str, shape)), {})[name] = round((time.perf_counter() - start) / calls * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    setup_device("cpu", 1)
    print(json.dumps({"mask_us": mask_timings()}), flush=True)
    pair = build_pair("tiny", "t5", "cpu")
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        ours_batch, theirs_batch = synthetic_batch(pair.config, batch_size, 32, 64, 16, "cpu")
        train_like_the_module(pair.ours)
        pair.theirs.train()
        sides = {
            "ours": make_step(pair.ours, ours_batch, "cpu", return_logits=False),
            "ours_faster_attention_dropout": patched(make_step(pair.ours, ours_batch, "cpu", return_logits=False),
                                                     dropout=False),
            "ours_faster_dropout": patched(make_step(pair.ours, ours_batch, "cpu", return_logits=False), dropout=True),
            "transformers": make_step(pair.theirs, theirs_batch, "cpu"),
        }
        timing = time_sides(sides, "cpu", 3, args.repeats)
        theirs = timing["transformers"].cpu_s
        ratios = {k: round(theirs / t.cpu_s, 3) for k, t in timing.items() if k != "transformers"}
        rows.append({"batch": batch_size, "cpu_ms": {k: round(t.cpu_s * 1e3, 2) for k, t in timing.items()},
                     "vs_transformers": ratios})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
