"""A matrix-vector product for small batches written in Triton: ``x @ weight.T`` for x (M <= 16, K), weight (N, K).

A decode step at batch 1-16 is a chain of such products, and on an H200 cuBLAS's kernels for them reach about 71% of
the card's copy bandwidth (session 22, ``decode_floor.py``). This kernel streams each weight once, a block of rows per
program, and lets Triton's autotuner pick the block sizes and pipelining per shape: ``decode_floor.py --triton`` times
it against cuBLAS on the same products, to learn whether custom kernels can bring a decode step nearer the floor.

On a machine without a GPU, ``TRITON_INTERPRET=1`` runs the kernel (one fixed configuration, fp16: the interpreter
mishandles bf16) on the CPU:

    TRITON_INTERPRET=1 python experiments/bench/triton_gemv.py      # checks it against F.linear
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16  # rows of x, padded: tl.dot needs at least 16 in every dimension

CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
    for block_n, block_k, warps, stages in (
        (16, 128, 4, 3), (16, 256, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 8, 3),
        (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3),
        (64, 128, 4, 3), (64, 256, 8, 3), (64, 256, 4, 4),
    )
]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                    other=0.0)
        x = tl.load(x_ptr + batch[:, None] * K + cols[None, :], mask=(batch[:, None] < M) & (cols[None, :] < K),
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + batch[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(batch[:, None] < M) & (rows[None, :] < N))


_autotuned = triton.autotune(configs=CONFIGS, key=["M", "N", "K"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` for x (..., K) with at most 16 rows; ``config`` fixes the block sizes (no autotuning:
    the CPU interpreter)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.shape[0] > BLOCK_M:
        raise ValueError(f"gemv takes at most {BLOCK_M} rows, got {rows.shape[0]}")
    n, k = weight.shape
    out = torch.empty(rows.shape[0], n, device=x.device, dtype=x.dtype)
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned[grid](rows, weight, out, rows.shape[0], n, k, BLOCK_M=BLOCK_M)
    else:
        _gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](rows, weight, out, rows.shape[0], n, k, BLOCK_M=BLOCK_M,
                                                          **config)
    return out.reshape(*x.shape[:-1], n)


def best_configs() -> dict:
    """The configuration the autotuner chose per (M, N, K) so far."""
    return {str(key[:3]): str(config) for key, config in getattr(_autotuned, "cache", {}).items()}


if __name__ == "__main__":
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cpu" if interpreted else "cuda"
    dtype = torch.float16 if interpreted else torch.bfloat16  # the interpreter (numpy) mishandles bf16
    torch.manual_seed(0)
    for m, n, k in ((1, 48, 96), (5, 40, 200), (16, 64, 256)):
        x = torch.randn(m, k, device=device, dtype=dtype)
        weight = torch.randn(n, k, device=device, dtype=dtype)
        got = gemv(x, weight, dict(BLOCK_N=16, BLOCK_K=32) if interpreted else None)
        torch.testing.assert_close(got.float(), F.linear(x.float(), weight.float()), rtol=2e-2, atol=5e-2)
        print(f"M={m} N={n} K={k}: matches F.linear")
