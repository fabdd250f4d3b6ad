"""CUDA graphs for inference: a fixed-shape call recorded once, then replayed with one launch.

At small batch a generate call of a 7B model is launch-bound wherever it is not reading weights: the eager image
encoding (a 39-block vision encoder, the Q-Former) and the prompt's prefill each launch thousands of small kernels
from Python (on an H200 at batch 1, 25 ms and 24 ms of a 204 ms call, against a few ms of GPU work). Replaying them
as graphs leaves the GPU only its work. Greedy decoding's ``step="graphed"`` uses this for the prefill and the
decode step (``decoding._FixedStepGreedy``), and ``InstructBlip.generate_ids`` for the image encoding.

Two rules of capturing are kept here, so that callers need not repeat them. The call first runs once on a side
stream, taking the code paths a capture takes (``as_if_capturing``): kernels load and libraries choose their
algorithms outside the capture. And autocast's cache of cast weights is off while recording: a graph must record
the casts of the Q-Former's fp32 weights, not point at copies the cache frees when the caller's autocast ends.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable

import torch


@contextlib.contextmanager
def as_if_capturing():
    """Warm-up steps before a CUDA graph capture take the capture's code paths. transformers' LLMs decide by whether
    a capture runs: outside one they read the attention mask on the host and skip it when nothing is padded; inside
    one they always build it (``language.fixed_shapes`` asks the same). Without this, compiled blocks would first
    see the mask inside the capture and compile there, and kernels the capture needs would be loaded during it."""
    is_capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = is_capturing


@contextlib.contextmanager
def _autocast_without_cache():
    """The caller's CUDA autocast (on or off, its dtype) with the weight-cast cache off."""
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                        cache_enabled=False):
        yield


def warm_up(fn: Callable, *args):
    """``fn(*args)`` on a side stream as a capture will run it (what a capture asks to happen first); its result."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), as_if_capturing(), _autocast_without_cache():
        result = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return result


def record(fn: Callable, *args) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn(*args)`` recorded as a CUDA graph (nothing runs until a replay) and its output tensors, which each replay
    overwrites. Warm ``fn`` up first (``warm_up``)."""
    graph = torch.cuda.CUDAGraph()
    with _autocast_without_cache(), torch.cuda.graph(graph):
        output = fn(*args)
    return graph, output


class GraphedCall:
    """``fn`` over tensors (``None`` allowed, passed through) replayed as a CUDA graph, one per signature.

    A signature is the arguments' shapes and dtypes with the autocast and grad state. Its first call copies the
    arguments into buffers of its own, warms ``fn`` up on them, records it and replays; later calls copy the new
    arguments into those buffers and replay. ``fn`` must read nothing on the host and return one tensor: the
    caller gets a copy (the next replay overwrites the graph's). The last ``kept`` signatures are kept.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], kept: int = 4):
        self.fn, self.kept = fn, kept
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        key = (
            tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_grad_enabled(),
        )
        entry = self.graphs.pop(key, None)
        if entry is None:
            while len(self.graphs) >= self.kept:  # the oldest graph and buffers go before new ones are allocated
                self.graphs.popitem(last=False)
            buffers = [None if a is None else a.clone() for a in args]
            warm_up(self.fn, *buffers)
            entry = (buffers, *record(self.fn, *buffers))
        else:
            for buffer, value in zip(entry[0], args):
                if buffer is not None:
                    buffer.copy_(value)
        self.graphs[key] = entry
        _, graph, output = entry
        graph.replay()
        return output.clone()
