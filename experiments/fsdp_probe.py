"""FSDP2 on one GPU without Lightning: training steps of the tiny model under ``instructblip.train.parallelize``,
in variants, each reported as OK or with its error (the probe of the open ``trainer=fsdp`` GPU failure, issue 7).

    .venv/bin/python experiments/fsdp_probe.py      # a CUDA machine (gloo on a CPU-only one)
    FSDP_PROBE_ONLY="own" NO_CUDNN_SDP=1 python experiments/fsdp_probe.py   # variants whose name has "own",
                                                    # without cuDNN's attention backend for SDPA

Each variant runs in a process of its own: on the H200 an illegal memory access in one poisoned every variant after
it in the same process (session 18). Variants: ``parallelize`` as it is (the LLM head a unit of its own); with a
check that names any parameter whose storage FSDP freed before backward read it (the illegal access is a kernel
reading freed memory; the check raises a Python error naming the parameter first); with no unit freeing its
parameters after forward; the head left in the root, as before 2026-11-27 (on the H200 with torch 2.11 its bf16
weight was freed before backward read it); the full logits instead of the labelled positions; a full state dict
between the steps, as Lightning saves one; the root keeping its parameters after backward; the model built on the
CPU, moved by ``fully_shard`` and then by ``.to(device)``, as Lightning's ModelParallelStrategy does; Lightning's
autocast (``cache_enabled=False``, its bf16-mixed plugin's); what ``InstructBlipModule.training_step`` does with the
outputs between forward and backward (the per-dataset losses by a mask, the finiteness read on the host, the logged
copies); all three together; the data dimension of Lightning's 2-D device mesh; the GPU test's model (the tiny
checkpoint) alone, and with all of these; autograd's anomaly mode (a failing backward names its forward op). Every
variant passes on a CPU under torch 2.14. The H200's failure most likely came from torch 2.11's FSDP2, which found
the loss for its pre-backward hook only through ``tree_flatten``: with ``encode_images`` registered as a forward
method, the root freed its parameters after forward, and they were never gathered again (reproduced on a CPU by
emulating that hook, not yet confirmed on a GPU; ``parallelize`` no longer registers it; see
``tests/train/test_parallel.py::test_the_root_keeps_its_gathered_parameters_from_forward_to_backward``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
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
          from_checkpoint: bool = False, keep_after_forward: bool = False):
    """``like_lightning``: as Lightning's ModelParallelStrategy does it, the model is built on the CPU, moved by
    ``fully_shard`` and then given to ``.to(device)`` (its ``model_to_device`` after ``configure_model``).
    ``from_checkpoint``: the GPU test's model instead of the preset's. ``keep_after_forward``: no unit frees its
    gathered parameters after forward (backward then gathers nothing)."""
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
    if keep_after_forward:
        model.set_reshard_after_forward(False, recurse=True)
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


class FreedStorageError(RuntimeError):
    pass


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    """The address of the tensor's storage; None for an empty or freed storage, or a tensor without one (DTensor)."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None
    except RuntimeError:
        return None


def storage_check(model):
    """Saved-tensor hooks that name a parameter whose storage autograd saved and FSDP freed before backward read it:
    a Python error with the parameter's name instead of a kernel reading freed memory (an illegal memory access on
    CUDA). A saved tensor is matched to a parameter by its storage, views of it (``weight.t()``) included."""
    def pack(tensor):
        pointer = _storage_pointer(tensor)
        # outside their unit's forward FSDP's parameters are sharded DTensors (no storage); inside it, the gathered
        # plain tensors that autograd saves
        owner = next((name for name, param in model.named_parameters()
                      if pointer is not None and _storage_pointer(param) == pointer), None)
        return tensor, owner

    def unpack(packed):
        tensor, owner = packed
        needed = (tensor.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()))
                  ) * tensor.element_size() if tensor.numel() else 0
        if tensor.untyped_storage().nbytes() < needed:
            raise FreedStorageError(f"backward read {owner or 'a non-parameter tensor'} {tuple(tensor.shape)} "
                                    f"{tensor.dtype}: storage of {tensor.untyped_storage().nbytes()} bytes, needs {needed}")
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def run(mesh, name: str, steps: int = 2, return_logits: bool = False, anomaly: bool = False, save: bool = False,
        lightning_autocast: bool = False, module_ops: bool = False, check_storage: bool = False,
        **build_flags) -> None:
    print(f"== {name}", flush=True)
    try:
        model = build(mesh, **build_flags)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for step in range(steps):
            with torch.autograd.set_detect_anomaly(anomaly):
                batch = preset_training_batch(DEVICE, step)
                with contextlib.ExitStack() as stack:
                    if check_storage:
                        stack.enter_context(storage_check(model))
                    stack.enter_context(torch.autocast(DEVICE, torch.bfloat16, cache_enabled=not lightning_autocast))
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


# (name, Lightning's 2-D mesh?, flags): the variants closest to Lightning's failing step first, then session 15's
# head variants
LIGHTNING_STEP = dict(like_lightning=True, lightning_autocast=True, module_ops=True)
VARIANTS = [
    ("parallelize (the head a unit of its own)", False, {}),
    ("parallelize, freed parameter storage named before backward reads it", False, dict(check_storage=True)),
    ("parallelize, no unit frees its parameters after forward", False, dict(keep_after_forward=True)),
    ("parallelize on Lightning's 2-D mesh", True, {}),
    ("parallelize, the GPU test's model (the tiny checkpoint)", False, dict(from_checkpoint=True)),
    ("parallelize, Lightning's autocast (cache_enabled=False)", False, dict(lightning_autocast=True)),
    ("parallelize, the module's ops on the outputs before backward", False, dict(module_ops=True)),
    ("parallelize, built on the CPU and moved as Lightning does", False, dict(like_lightning=True)),
    ("parallelize, built and moved as Lightning does, its autocast and the module's ops", False, LIGHTNING_STEP),
    ("the GPU test's model on Lightning's 2-D mesh, built and moved as Lightning does, its autocast and the "
     "module's ops", True, dict(from_checkpoint=True, **LIGHTNING_STEP)),
    ("the head in the root", False, dict(head_in_root=True)),
    ("the head in the root, freed parameter storage named", False, dict(head_in_root=True, check_storage=True)),
    ("the head in the root, full logits", False, dict(head_in_root=True, return_logits=True)),
    ("the head in the root, a full state dict after each step", False, dict(head_in_root=True, save=True)),
    ("the head in the root, the root keeps its parameters after backward", False,
     dict(head_in_root=True, root_keeps_parameters=True)),
    ("parallelize, a full state dict after each step", False, dict(save=True)),
    ("parallelize, built and moved as Lightning does, anomaly mode", False, dict(like_lightning=True, anomaly=True)),
]


def run_variant(index: int) -> None:
    """One variant in this process (a CUDA illegal memory access poisons every later CUDA call of the process)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if os.environ.get("NO_CUDNN_SDP"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    name, lightning_mesh, flags = VARIANTS[index]
    if lightning_mesh:
        # what Lightning's ModelParallelStrategy builds: a 2-D (data, tensor) mesh, of which parallelize takes the
        # data dimension (a sub-mesh with process groups of its own)
        mesh = init_device_mesh(DEVICE, (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))["data_parallel"]
    else:
        mesh = init_device_mesh(DEVICE, (1,), mesh_dim_names=("data_parallel",))
    try:
        run(mesh, name, **flags)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        run_variant(int(sys.argv[2]))
        return
    only = os.environ.get("FSDP_PROBE_ONLY")
    for index, (name, _, _) in enumerate(VARIANTS):
        if only and only not in name:
            continue
        # each variant in a fresh process; a crashed one (no OK/FAILED line) is reported by its exit status
        status = subprocess.run([sys.executable, __file__, "--variant", str(index)]).returncode
        if status:
            print(f"== {name}: process exited with status {status}", flush=True)


if __name__ == "__main__":
    main()
