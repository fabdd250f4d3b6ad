"""FSDP2 on one GPU without Lightning: training steps of the tiny model under ``instructblip.train.parallelize``,
in variants, each reported as OK or with its error (the probe of the open ``trainer=fsdp`` GPU failure, issue 7).

    .venv/bin/python experiments/fsdp_probe.py      # a CUDA machine (gloo on a CPU-only one)
    FSDP_PROBE_ONLY="own" NO_CUDNN_SDP=1 python experiments/fsdp_probe.py   # variants whose name has "own",
                                                    # without cuDNN's attention backend for SDPA

Variants: ``parallelize`` as it is (the LLM head a unit of its own); the head left in the root, as before
2026-11-27 (on the H200 with torch 2.11 its bf16 weight was freed before backward read it); with autograd's
anomaly mode (a failing backward names its forward op); the full logits instead of the labelled positions; a full
state dict between the steps, as Lightning saves one; the root keeping its parameters after backward; the model
built on the CPU, moved by ``fully_shard`` and then by ``.to(device)``, as Lightning's ModelParallelStrategy does
(its GPU test still failed after the head change, while the probe's own steps ran); Lightning's autocast
(``cache_enabled=False``, its bf16-mixed plugin's); what ``InstructBlipModule.training_step`` does with the outputs
between forward and backward (the per-dataset losses by a mask, the finiteness read on the host, the logged
copies); all three together; the data dimension of Lightning's 2-D device mesh; the GPU test's model (the tiny
checkpoint) alone, and with all of these. (On a CPU, Lightning's own FSDP step, ``trainer=fsdp`` with bf16-mixed under gloo,
ran three steps on 2026-11-27, so what fails on the GPU is CUDA's side.)
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from instructblip.model.instructblip import InstructBlip
from instructblip.model.presets import get_preset
from instructblip.testing import preset_training_batch
from instructblip.train.module import freeze_unused, frozen_modules, frozen_towers_to_eval, select_trainable
from instructblip.train.parallelize import parallelize, transformer_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Holder:
    pass


def _trainer(mesh):
    """What ``parallelize`` reads of a Lightning trainer: the data-parallel mesh."""
    trainer = _Holder()
    trainer.strategy = _Holder()
    trainer.strategy.device_mesh = {"data_parallel": mesh}
    return trainer


def checkpoint_model() -> InstructBlip:
    """The GPU test's model: the tiny checkpoint ``make_tiny_checkpoint`` writes, read by ``from_pretrained``."""
    import tempfile

    from instructblip.testing import make_tiny_checkpoint

    path = os.path.join(tempfile.mkdtemp(), "tiny_checkpoint")
    make_tiny_checkpoint(path, "llama")
    return InstructBlip.from_pretrained(path)


def build(mesh, head_in_root: bool = False, root_keeps_parameters: bool = False, like_lightning: bool = False,
          from_checkpoint: bool = False):
    """``like_lightning``: as Lightning's ModelParallelStrategy does it, the model is built on the CPU, moved by
    ``fully_shard`` and then given to ``.to(device)`` (its ``model_to_device`` after ``configure_model``).
    ``from_checkpoint``: the GPU test's model instead of the preset's."""
    torch.manual_seed(0)
    model = checkpoint_model() if from_checkpoint else InstructBlip(get_preset("tiny-llama"))
    model = model.to("cpu" if like_lightning else DEVICE)
    select_trainable(model, ["query_tokens", "qformer", "projection", "vision.ln_vision"])
    freeze_unused(model)
    frozen = frozen_modules(model)
    if head_in_root:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    else:
        parallelize(model, _trainer(mesh))
    if root_keeps_parameters:
        model.set_reshard_after_backward(False)
    if like_lightning:
        model.to(DEVICE)
    model.train()
    frozen_towers_to_eval(model, frozen)
    return model


def save_like_lightning(model, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    get_model_state_dict(model, options=options)
    get_optimizer_state_dict(model, optimizer, options=options)


def like_the_module(output, batch) -> None:
    """What the Lightning module's training_step does with the outputs before Lightning's backward."""
    loss, per_sample = output.loss, output.per_sample_loss.detach()
    bool(torch.isfinite(loss.detach()))
    float(loss.detach().float())
    for name in ("a", "b"):
        rows = torch.tensor([name == "a", name == "b"], device=per_sample.device)
        float(per_sample[rows].mean())
    loss.detach().clone()  # Lightning's closure keeps a copy


def run(mesh, name: str, steps: int = 2, return_logits: bool = False, anomaly: bool = False, save: bool = False,
        lightning_autocast: bool = False, module_ops: bool = False, **build_flags) -> None:
    only = os.environ.get("FSDP_PROBE_ONLY")
    if only and only not in name:
        return
    print(f"== {name}", flush=True)
    try:
        model = build(mesh, **build_flags)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for step in range(steps):
            with torch.autograd.set_detect_anomaly(anomaly):
                batch = preset_training_batch(DEVICE, step)
                with torch.autocast(DEVICE, torch.bfloat16, cache_enabled=not lightning_autocast):
                    output = model(**batch, return_logits=return_logits)
                    if module_ops:
                        like_the_module(output, batch)
                loss = output.loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if save:
                save_like_lightning(model, optimizer)
            print(f"   step {step} loss {loss.item():.4f}", flush=True)
        print(f"== {name}: OK", flush=True)
    except Exception as error:  # noqa: BLE001 - every variant runs and reports
        traceback.print_exc(limit=-8)
        print(f"== {name}: FAILED {error!r}"[:400], flush=True)


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if os.environ.get("NO_CUDNN_SDP"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    mesh = init_device_mesh(DEVICE, (1,), mesh_dim_names=("data_parallel",))
    # what Lightning's ModelParallelStrategy builds: a 2-D (data, tensor) mesh, of which parallelize takes the data
    # dimension (a sub-mesh with process groups of its own)
    lightning_mesh = init_device_mesh(DEVICE, (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    try:
        # the variants closest to Lightning's failing step first (a variant that poisons the process with an illegal
        # memory access would fail every one after it); then session 15's head variants
        run(mesh, "parallelize (the head a unit of its own)")
        run(lightning_mesh["data_parallel"], "parallelize on Lightning's 2-D mesh")
        run(mesh, "parallelize, the GPU test's model (the tiny checkpoint)", from_checkpoint=True)
        run(mesh, "parallelize, Lightning's autocast (cache_enabled=False)", lightning_autocast=True)
        run(mesh, "parallelize, the module's ops on the outputs before backward", module_ops=True)
        run(mesh, "parallelize, built on the CPU and moved as Lightning does", like_lightning=True)
        run(mesh, "parallelize, built and moved as Lightning does, its autocast and the module's ops",
            like_lightning=True, lightning_autocast=True, module_ops=True)
        run(lightning_mesh["data_parallel"], "the GPU test's model on Lightning's 2-D mesh, built and moved as "
            "Lightning does, its autocast and the module's ops", from_checkpoint=True, like_lightning=True,
            lightning_autocast=True, module_ops=True)
        run(mesh, "the head in the root", head_in_root=True)
        run(mesh, "the head in the root, anomaly mode", head_in_root=True, anomaly=True)
        run(mesh, "the head in the root, full logits", head_in_root=True, return_logits=True)
        run(mesh, "the head in the root, a full state dict after each step", head_in_root=True, save=True)
        run(mesh, "the head in the root, the root keeps its parameters after backward", head_in_root=True,
            root_keeps_parameters=True)
        run(mesh, "parallelize, a full state dict after each step", save=True)
        run(mesh, "parallelize, built and moved as Lightning does, anomaly mode", like_lightning=True, anomaly=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
