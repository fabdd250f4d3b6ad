"""Matrix-vector products for decoding in Triton: ``F.linear(x, weight)`` for inputs of at most 16 rows.

A decode step at batch 1-16 reads every weight of the LLM once and does little else, so its time is the time its
linear layers take to stream their weights. On an H200 cuBLAS's kernels for these shapes reach about 71% of the
card's copy bandwidth (session 22, ``experiments/bench/decode_floor.py``). ``_gemv_kernel`` streams each weight
once, a block of rows per program, with the block sizes and the depth of its load pipeline autotuned per shape.

``decoding.kernels=triton`` routes the LLM's bias-free linear layers through it (``route_linear_layers``): their
class becomes ``GemvLinear``, which keeps the same parameters (the state dict is unchanged) and sends an input of at
most ``MAX_ROWS`` rows in bf16/fp16 on CUDA to the kernel, every other input to ``F.linear``. So the prefill and
training run as before, and only one-token decode steps change. The kernel is a ``torch.library`` custom op, so a
``torch.compile``d forward calls it as one opaque kernel and a CUDA graph captures its launch.

Importing this module needs Triton (torch's Linux wheels bring it). With ``TRITON_INTERPRET=1`` set
before the import, the kernel runs on the CPU through Triton's interpreter with one fixed configuration (fp16 only:
the interpreter mishandles bf16), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

MAX_ROWS = 16  # the kernel's rows of x, padded: tl.dot needs at least 16 in every dimension
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}

# (rows of the weight per program, columns per loop iteration, warps, pipeline stages)
CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
    for block_n, block_k, warps, stages in (
        (16, 128, 4, 3), (16, 256, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 8, 3), (16, 512, 4, 4),
        (16, 1024, 8, 2), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3),
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


_autotuned_kernel = triton.autotune(configs=CONFIGS, key=["M", "N", "K"])(_gemv_kernel)


@torch.library.custom_op("instructblip::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for x (..., K) of at most ``MAX_ROWS`` rows and weight (N, K), in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows.shape[0]}")
    n, k = weight.shape
    out = torch.empty(rows.shape[0], n, device=x.device, dtype=x.dtype)
    if INTERPRETED:
        block_n = INTERPRETER_CONFIG["BLOCK_N"]
        _gemv_kernel[(triton.cdiv(n, block_n),)](rows, weight.contiguous(), out, rows.shape[0], n, k,
                                                BLOCK_M=MAX_ROWS, **INTERPRETER_CONFIG)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned_kernel[grid](rows, weight.contiguous(), out, rows.shape[0], n, k, BLOCK_M=MAX_ROWS)
    return out.reshape(*x.shape[:-1], n)


@gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def best_configs() -> dict:
    """The configuration the autotuner chose per (M, N, K) so far."""
    return {str(key[:3]): str(config) for key, config in getattr(_autotuned_kernel, "cache", {}).items()}


class GemvLinear(nn.Linear):
    """An ``nn.Linear`` whose small inputs (at most ``MAX_ROWS`` rows, bf16/fp16, on the kernel's device) go through
    ``gemv``. It has no state of its own: ``route_linear_layers`` turns an ``nn.Linear`` into one and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.numel() <= MAX_ROWS * x.shape[-1]
        on_device = x.is_cuda or (INTERPRETED and x.device.type == "cpu")
        half = x.dtype == self.weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
        if small and on_device and half and self.bias is None:
            return gemv(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def route_linear_layers(model: nn.Module, through_gemv: bool) -> int:
    """Turn every bias-free ``nn.Linear`` of ``model`` into a ``GemvLinear`` (``through_gemv``) or back; returns
    how many changed. The class is swapped in place, so parameters, hooks and any wrapper holding the module stay
    as they are (a compiled forward recompiles on its guard of the module's class)."""
    source, target = (nn.Linear, GemvLinear) if through_gemv else (GemvLinear, nn.Linear)
    changed = 0
    for module in model.modules():
        if type(module) is source and module.bias is None:
            module.__class__ = target
            changed += 1
    return changed
