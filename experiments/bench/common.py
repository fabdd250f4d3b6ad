"""What the benchmarks share: model sizes, building both implementations from the same weights, inputs, timing.

Both sides are built from one seeded ``transformers.InstructBlipForConditionalGeneration``: ours is loaded from its
state dict through the project's Hugging Face loader, so any difference in the timings is implementation, not
weights. Every benchmark checks the two agree before it times them.

Timing (``time_sides``): every side is warmed up, then the sides take turns, repeat after repeat (the order flips
every round), so a change of machine load hits all of them alike. Each call is measured twice: wall-clock time and
the process's CPU time (``time.process_time``). On a shared CPU the benchmark process runs one intra-op thread
(``setup_device``): its CPU time then barely moves with the load of other processes, while its wall time does; CPU
ratios are computed from CPU time, GPU ratios from wall time (after ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

# Sizes by flag. "tiny" is the test suite's model; "cpu" keeps the real proportions (vision > LLM width > Q-Former,
# a 32k vocabulary) at a size a 2-core CPU times in seconds; the released ones need a GPU.
SIZES = {
    "tiny": dict(
        image_size=28, patch_size=14, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
        qformer_width=32, qformer_layers=2, qformer_heads=4, qformer_intermediate=64, num_query_tokens=4,
        llm_width=32, llm_layers=2, llm_heads=4, llm_intermediate=64, vocab_size=512,
    ),
    "cpu": dict(
        image_size=112, patch_size=14, vision_width=256, vision_layers=6, vision_heads=4, vision_mlp=1024,
        qformer_width=128, qformer_layers=4, qformer_heads=4, qformer_intermediate=512, num_query_tokens=32,
        llm_width=256, llm_layers=4, llm_heads=4, llm_intermediate=688, vocab_size=32064,
    ),
    "released": None,  # the Vicuna-7B / FlanT5-XL configurations (see released_config)
}


def released_config(llm: str):
    from transformers import InstructBlipConfig, LlamaConfig, T5Config

    if llm == "llama":
        text = LlamaConfig(
            vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, pad_token_id=32000,
            bos_token_id=2, eos_token_id=2, tie_word_embeddings=False,
        )
        image_token = 32001
    else:
        text = T5Config(
            vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
            num_decoder_layers=24, feed_forward_proj="gated-gelu", dense_act_fn="gelu", is_gated_act=True,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
        image_token = 32100
    return InstructBlipConfig(
        vision_config={}, qformer_config={"vocab_size": 30523}, text_config=text.to_dict(),
        num_query_tokens=32, image_token_index=image_token,
    )


def small_config(size: str, llm: str):
    from transformers import InstructBlipConfig, LlamaConfig, T5Config

    s = SIZES[size]
    if llm == "llama":
        text = LlamaConfig(
            vocab_size=s["vocab_size"], hidden_size=s["llm_width"], intermediate_size=s["llm_intermediate"],
            num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"],
            num_key_value_heads=s["llm_heads"], rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2,
            eos_token_id=2, tie_word_embeddings=False,
        )
    else:
        text = T5Config(
            vocab_size=s["vocab_size"], d_model=s["llm_width"], d_ff=s["llm_intermediate"],
            d_kv=s["llm_width"] // s["llm_heads"], num_heads=s["llm_heads"], num_layers=s["llm_layers"],
            num_decoder_layers=s["llm_layers"], feed_forward_proj="gated-gelu", dense_act_fn="gelu",
            is_gated_act=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    return InstructBlipConfig(
        vision_config=dict(
            hidden_size=s["vision_width"], intermediate_size=s["vision_mlp"], num_hidden_layers=s["vision_layers"],
            num_attention_heads=s["vision_heads"], image_size=s["image_size"], patch_size=s["patch_size"],
        ),
        qformer_config=dict(
            hidden_size=s["qformer_width"], num_hidden_layers=s["qformer_layers"],
            num_attention_heads=s["qformer_heads"], intermediate_size=s["qformer_intermediate"], vocab_size=30523,
        ),
        text_config=text.to_dict(),
        num_query_tokens=s["num_query_tokens"],
        image_token_index=s["vocab_size"] - 1,
    )


@dataclass
class Pair:
    theirs: torch.nn.Module  # transformers.InstructBlipForConditionalGeneration
    ours: torch.nn.Module  # instructblip.InstructBlip
    config: object  # the transformers InstructBlipConfig


def build_pair(size: str, llm: str, device: str, seed: int = 0, share_llm: bool = True) -> Pair:
    """Both implementations with identical weights, frozen parts frozen (and in bf16 on CUDA) on ``device``.

    ``share_llm``: ours runs transformers' own (frozen) LLM module object, so a 7B pair costs one LLM, not two,
    and builds in seconds. A side that compiles the model in place (``instructblip.train.parallelize
    .compile_blocks``) needs ``share_llm=False``: ours then gets its own copy of the same weights.
    """
    import copy

    from transformers import InstructBlipForConditionalGeneration

    from instructblip.checkpoint.hf import build_from_hf

    config = released_config(llm) if size == "released" else small_config(size, llm)
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        theirs = InstructBlipForConditionalGeneration(config)
    theirs.eval()
    freeze_like_lavis(theirs)
    if device.startswith("cuda"):  # frozen towers in bf16, trainable parts fp32 (ours does this by its dtype policy)
        theirs.vision_model.to(torch.bfloat16)
        theirs.vision_model.post_layernorm.float()
        theirs.language_model.to(torch.bfloat16)
    # The same weights into ours, copied on the device (ours trains its own Q-Former, so nothing trainable is
    # shared); the LLM is transformers' module itself, or a copy of it.
    state = {
        k: v.detach().clone() for k, v in theirs.state_dict().items() if not k.startswith("language_model.")
    }
    language_model = theirs.language_model if share_llm else copy.deepcopy(theirs.language_model)
    ours = build_from_hf(config.to_dict(), state, device=device, language_model=language_model)
    del state
    return Pair(theirs=theirs, ours=ours, config=config)


def train_like_the_module(ours) -> None:
    """Ours in the modes ``instructblip.train.module`` trains it in: train mode, except the frozen towers other than
    the LLM (the vision trunk), which stay in eval mode (no dropout calls, as LAVIS); the frozen LLM keeps its
    dropout, as LAVIS and the module's default ``frozen_llm_dropout=true``."""
    from instructblip.train.module import frozen_modules, frozen_towers_to_eval

    ours.train()
    frozen_towers_to_eval(ours, frozen_modules(ours))


def freeze_like_lavis(theirs) -> None:
    """The trainable set of InstructBLIP: queries, Q-Former, projection and ln_vision (post_layernorm)."""
    theirs.vision_model.requires_grad_(False)
    theirs.vision_model.post_layernorm.requires_grad_(True)
    theirs.language_model.requires_grad_(False)


def synthetic_batch(config, batch: int, qformer_len: int, prompt_len: int, answer_len: int, device: str, seed: int = 0):
    """Our batch (text only) and transformers' (with ``<image>`` placeholders), training layout, right padded.

    ``prompt_len`` counts the visual tokens, as the issue's figures do (64 = 32 image tokens + 32 text tokens).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    queries = config.num_query_tokens
    size = config.vision_config.image_size
    text_len = max(prompt_len - queries, 1)
    high = min(vocab - 2, config.image_token_index)  # a random id must never be the <image> placeholder
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    qformer_ids = torch.randint(1000, 30000, (batch, qformer_len), generator=g)
    if config.use_decoder_only_language_model:
        ids = torch.randint(3, high, (batch, text_len + answer_len), generator=g)
        labels = ids.clone()
        labels[:, :text_len] = -100
        ours = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        image_ids = torch.full((batch, queries), config.image_token_index)
        theirs = dict(
            input_ids=torch.cat([image_ids, ids], 1),
            attention_mask=torch.ones(batch, queries + ids.shape[1], dtype=torch.long),
            labels=torch.cat([torch.full_like(image_ids, -100), labels], 1),
        )
    else:
        ids = torch.randint(3, high, (batch, text_len), generator=g)
        labels = torch.randint(3, high, (batch, answer_len), generator=g)
        ours = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        image_ids = torch.full((batch, queries), config.image_token_index)
        theirs = dict(
            input_ids=torch.cat([image_ids, ids], 1),
            attention_mask=torch.ones(batch, queries + ids.shape[1], dtype=torch.long),
            labels=labels,
        )
    shared = dict(
        pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=torch.ones_like(qformer_ids)
    )
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move({**shared, **ours}), move({**shared, **theirs})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup_device(device: str, threads: int | None) -> None:
    """One intra-op thread on CPU by default (timings robust to other processes on a shared machine); TF32 off on
    CUDA is left to torch's defaults. ``threads=0`` keeps torch's own choice."""
    if device == "cpu" and threads != 0:
        torch.set_num_threads(threads or 1)


@dataclass
class Timing:
    """Median seconds per call (wall and process CPU time) and every sample, for the JSON."""

    wall_s: float
    cpu_s: float
    wall_samples: list[float]
    cpu_samples: list[float]

    def primary(self, device: str) -> float:
        """The time ratios are computed from: CPU time on a CPU, wall time on a GPU."""
        return self.wall_s if device.startswith("cuda") else self.cpu_s

    def as_dict(self) -> dict:
        spread = lambda xs: (max(xs) - min(xs)) / statistics.median(xs) if xs else 0.0  # noqa: E731
        return dict(
            wall_s=self.wall_s, cpu_s=self.cpu_s, wall_spread=spread(self.wall_samples),
            cpu_spread=spread(self.cpu_samples),
        )


def time_sides(sides: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int) -> dict[str, Timing]:
    """Warm every side up, then time them in turns (order reversed every other round); medians per side."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    sync(device)
    walls: dict[str, list[float]] = {name: [] for name in sides}
    cpus: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            sync(device)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            sides[name]()
            sync(device)
            walls[name].append(time.perf_counter() - wall0)
            cpus[name].append(time.process_time() - cpu0)
    return {
        name: Timing(statistics.median(walls[name]), statistics.median(cpus[name]), walls[name], cpus[name])
        for name in names
    }


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


def first_call(name: str, step, device: str) -> tuple[dict, object]:
    """(facts, output) of a side's first call: its wall seconds (for a compiled side: its compilation) and, on
    CUDA, the peak memory of a second call run alone; printed at once, so a job stopped later still leaves them in
    its log. A side whose first call raises is reported (``({"error": ...}, None)``, traceback on stderr) for the
    caller to drop, so one broken side does not cost the others' figures."""
    sync(device)
    start = time.perf_counter()
    try:
        output = step()
    except Exception as error:  # noqa: BLE001 - any failure of one side is reported, the benchmark goes on
        traceback.print_exc()
        print(f"  {name}: FAILED ({error!r}); timing the other sides", file=sys.stderr, flush=True)
        return dict(error=repr(error)), None
    sync(device)
    seconds = time.perf_counter() - start
    peak = peak_memory_gib(step, device)
    print(f"  {name}: first call {seconds:.1f} s" + (f", peak {peak:.1f} GiB" if peak is not None else ""),
          file=sys.stderr, flush=True)
    return dict(first_call_s=seconds, **({} if peak is None else dict(peak_gib=peak))), output


def kernel_profile(step, device: str) -> dict:
    """Where a step's (or a generate call's) wall time goes on a GPU: one call under torch's profiler, its kernels'
    summed time against the call's wall time (the rest is the GPU waiting for the host), the number of kernel launches
    and of host-device synchronisations, and the kernels that take the most time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    syncs = {e.key: e.count for e in events if e.key in (
        "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")}
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return dict(
        profiled_wall_s=wall, kernel_s=kernel_s, gpu_busy=kernel_s / wall,
        kernel_launches=sum(e.count for e in kernels),
        sync_calls=syncs, top_kernels=[dict(name=e.key[:80], s=e.self_device_time_total / 1e6, count=e.count)
                                       for e in top],
    )


def op_profile(sides: dict[str, Callable], rounds: int = 6, steps: int = 10, top: int = 30) -> dict:
    """Where each side's CPU time goes, op by op: ``rounds`` rounds of ``steps`` calls of every side under torch's
    profiler, the sides' order reversed every other round (so a machine that slows down or speeds up during the run
    weighs on each side alike). Per side, the profiled milliseconds per call; per op (the ``top`` ops that differ
    most between the sides, or that take the most time when there is one side), each side's self CPU milliseconds
    and calls per call."""
    from torch.profiler import ProfilerActivity, profile

    self_ms = {name: {} for name in sides}
    calls = {name: {} for name in sides}
    order = list(sides)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            sides[name]()   # a call outside the profile: the first profiled call starts warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    sides[name]()
            for event in prof.key_averages():
                self_ms[name][event.key] = self_ms[name].get(event.key, 0.0) + event.self_cpu_time_total / 1e3
                calls[name][event.key] = calls[name].get(event.key, 0) + event.count
    per_call = rounds * steps
    ops = {key for name in sides for key in self_ms[name]}

    def weight(key: str) -> float:
        times = [self_ms[name].get(key, 0.0) for name in sides]
        return max(times) - min(times) if len(times) > 1 else times[0]

    return dict(
        rounds=rounds, steps_per_round=steps,
        total_ms={name: sum(self_ms[name].values()) / per_call for name in sides},
        ops={key: {name: dict(ms=self_ms[name].get(key, 0.0) / per_call, calls=calls[name].get(key, 0) / per_call)
                   for name in sides}
             for key in sorted(ops, key=weight, reverse=True)[:top]},
    )


def add_device_flags(parser) -> None:
    """The flags every model benchmark shares."""
    parser.add_argument("--size", default="cpu", choices=["tiny", "cpu", "released"])
    parser.add_argument("--llm", default="llama", choices=["llama", "t5"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0: torch's default)")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    import transformers

    env = dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=" ".join([_script_path(sys.argv[0]), *sys.argv[1:]]),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=device,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        load_average_1min=os.getloadavg()[0],
    )
    if device.startswith("cuda"):
        env["card"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _script_path(path: str) -> str:
    """The script as invoked, relative to the repository root when inside it."""
    here = Path(path).resolve()
    root = Path(__file__).resolve().parents[2]
    return str(here.relative_to(root)) if here.is_relative_to(root) else str(here)


def emit(result: dict) -> None:
    """One JSON object on stdout (the benchmarks' contract)."""
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
