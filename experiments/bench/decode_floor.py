"""How fast can one decode step of the Vicuna-7B LLM be? The matrix products alone, against the memory's bandwidth.

A decode step at small batch reads every weight of the LLM once: its speed is set by how much of the memory's
bandwidth the matrix-vector products reach. This probe times only those products of one step (each layer's
attention and MLP projections, then the LM head; no norms, RoPE, attention or cache), replayed as one CUDA graph
so that no launch overhead counts, in two layouts:

- ``separate``: q, k, v, o, gate, up, down as seven products per layer, as transformers' ``LlamaDecoderLayer`` runs
  them;
- ``fused``: q/k/v as one product and gate/up as one (four per layer), as a decode path with concatenated weights
  would.

``--triton``: each layout also with its products through ``instructblip.model.gemv`` (a Triton kernel, autotuned
per shape, what ``decoding.kernels=triton`` runs) instead of cuBLAS. ``--inductor``: the whole chain compiled by
``torch.compile(mode="max-autotune-no-cudagraphs")``, whose autotuning weighs its own Triton matrix kernels against cuBLAS per shape (what the graphed
decode step's compiled forward would get from that mode). Each is first checked against cuBLAS's chain.

Beside them, a device-to-device copy gives the bandwidth the card reaches at all. From each layout's step time it
reports the bandwidth reached, its fraction of the copy's, and the greedy tokens/s that step time alone would allow
(the image encoding and prefill not counted). The weights are random bf16, one set per
layer, so nothing is served from the L2 cache.

    python experiments/bench/decode_floor.py --device cuda --batch-sizes 1,16
    python experiments/bench/decode_floor.py --size tiny --device cpu      # the flow, on a CPU (no graph)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from instructblip.model import graphs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, environment, released_config, small_config  # noqa: E402


def projections(width: int, intermediate: int, layers: int, vocab: int, fused: bool, device: str):
    """Per layer, the (out, in) weights a decode step multiplies by, in the order it does; then the LM head."""
    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02

    shapes = ([(3 * width, width), (width, width), (2 * intermediate, width), (width, intermediate)] if fused else
              [(width, width)] * 4 + [(intermediate, width)] * 2 + [(width, intermediate)])
    return [[weight(*shape) for shape in shapes] for _ in range(layers)], weight(vocab, width)


def decode_products(x: torch.Tensor, layer_weights, head: torch.Tensor, fused: bool, linear=F.linear) -> torch.Tensor:
    """The step's products; each output feeds the next product of the same input width (the data flow's shape)."""
    hidden = x
    for weights in layer_weights:
        if fused:
            qkv_w, o_w, gate_up_w, down_w = weights
            qkv = linear(hidden, qkv_w)
            hidden = hidden + linear(qkv[..., : hidden.shape[-1]], o_w)
            gate_up = linear(hidden, gate_up_w)
            hidden = hidden + linear(gate_up[..., : down_w.shape[1]], down_w)
        else:
            q_w, k_w, v_w, o_w, gate_w, up_w, down_w = weights
            q, _, _ = linear(hidden, q_w), linear(hidden, k_w), linear(hidden, v_w)
            hidden = hidden + linear(q, o_w)
            gate, _ = linear(hidden, gate_w), linear(hidden, up_w)
            hidden = hidden + linear(gate, down_w)
    return linear(hidden, head)


def time_replays(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, each timed with CUDA events (host timer on a CPU)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def graphed(fn, device: str):
    """``fn`` captured as one CUDA graph (its replay), or ``fn`` itself off CUDA."""
    if not device.startswith("cuda"):
        return fn
    graphs.warm_up(fn)  # cuBLAS (or Triton's autotuner) picks its kernels outside the capture
    graph, _ = graphs.record(fn)
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="released", choices=["tiny", "cpu", "released"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layouts", default="separate,fused")
    parser.add_argument("--triton", action="store_true", help="also run the products through a Triton kernel")
    parser.add_argument("--inductor", action="store_true", help="also the chain compiled with max-autotune")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    layouts = args.layouts.split(",")
    if not layouts or set(layouts) - {"separate", "fused"}:
        parser.error(f"--layouts {args.layouts!r}: choose from separate, fused")
    # each implementation: a function of (x, layer weights, head, fused) giving the step's output
    implementations = {"cublas": decode_products}
    if args.triton:
        from instructblip.model.gemv import best_configs, gemv

        implementations["triton"] = functools.partial(decode_products, linear=gemv)
    if args.inductor:
        implementations["inductor"] = torch.compile(decode_products, mode="max-autotune-no-cudagraphs", dynamic=False)

    text = (released_config("llama") if args.size == "released" else small_config(args.size, "llama")).text_config
    width, intermediate, layers, vocab = (text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                                          text.vocab_size)
    weight_bytes = 2 * (layers * (4 * width * width + 3 * width * intermediate) + vocab * width)

    # the card's bandwidth at all: a copy of 4 GiB (read and write) on a GPU, 64 MiB on a CPU
    elements = (2 << 30) if cuda else (32 << 20)
    source = torch.empty(elements, dtype=torch.bfloat16, device=args.device)
    target = torch.empty_like(source)
    copy_s = time_replays(lambda: target.copy_(source), args.device, args.repeats)
    copy_bandwidth = 2 * source.numel() * source.element_size() / copy_s
    del source, target

    rows = []
    for fused in (layout == "fused" for layout in layouts):
        layer_weights, head = projections(width, intermediate, layers, vocab, fused, args.device)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.randn(batch, width, device=args.device, dtype=torch.bfloat16)
            with torch.no_grad():
                reference = decode_products(x, layer_weights, head, fused).double()
            for name, products in implementations.items():
                with torch.no_grad():
                    # the same chain as cuBLAS's, to bf16 rounding over its 7 products a layer
                    # in float64: the random chain's values grow large enough to overflow a float32 norm
                    agreement = F.cosine_similarity(products(x, layer_weights, head, fused).double(), reference, -1)
                    if agreement.min() < 0.999:
                        raise AssertionError(f"{name}: the chain's output departs from cuBLAS's ({agreement})")
                    step = graphed(lambda: products(x, layer_weights, head, fused), args.device)
                    seconds = time_replays(step, args.device, args.repeats)
                bandwidth = weight_bytes / seconds
                rows.append(dict(
                    layout="fused" if fused else "separate", products=name, batch=batch, step_ms=1000 * seconds,
                    bandwidth_gb_s=bandwidth / 1e9, of_copy_bandwidth=bandwidth / copy_bandwidth,
                    tokens_per_s_ceiling=batch / seconds,
                ))
                print(f"{rows[-1]['layout']:>8} {name:>8} batch {batch:>3}: {1000 * seconds:.3f} ms per step, "
                      f"{bandwidth / 1e9:.0f} GB/s ({bandwidth / copy_bandwidth:.2f} of the copy's)",
                      file=sys.stderr, flush=True)
        del layer_weights, head
    emit(dict(
        benchmark="decode_floor", size=args.size, weight_gb=weight_bytes / 1e9,
        copy_bandwidth_gb_s=copy_bandwidth / 1e9, floor_ms_at_copy_bandwidth=1000 * weight_bytes / copy_bandwidth,
        timing=f"median of {args.repeats} calls" + (", graph replays, CUDA events" if cuda else ""),
        environment=environment(args.device), rows=rows,
        **({"triton_configs": best_configs()} if args.triton else {}),
    ))


if __name__ == "__main__":
    main()
