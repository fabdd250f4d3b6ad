"""FSDP2 for InstructBLIP, applied from the outside (torchtitan style): the model code knows nothing of it.

Used by ``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``): the LightningModule calls :func:`parallelize`
from ``configure_model`` after freezing. Every transformer block of the model (the ViT blocks, the Q-Former
layers, the LLM decoder layers: the elements of its ``nn.ModuleList``s) becomes its own ``fully_shard`` unit, and
so does the LLM's output head; the root takes the rest (embeddings, ``ln_vision``, query tokens, projection).
Units are all-frozen or all-trainable by construction (a block belongs to one tower), so no gradient memory is
spent on frozen weights; the one exception is the last Q-Former layer, whose text branch (no output depends on it,
see ``InstructBlip.unused_parameter_names``) is frozen inside a trained layer, a mixed group as the root is.

Mixed precision is FSDP2's: parameters all-gathered in the trainer's compute dtype (bf16 under bf16-mixed; fp32
under 32-true), gradients reduced in fp32, sharded master weights in fp32. The frozen towers stay fp32 *sharded*
(1/N each) rather than bf16-cast, because one ``fully_shard`` group (the root) holds both frozen and trainable
tensors and FSDP2 needs one storage dtype per group.

``generate`` and ``rank`` are not ``forward``: they are registered as FSDP forward methods so that calling them
all-gathers the root's parameters first. Only the entry points are: a registered method that ``forward`` calls
(``encode_images`` was one) nests a second pre/post-forward pair inside the root's, whose end leaves the root's state
idle, so that the outer post-forward frees the root's parameters, which FSDP2 otherwise keeps from forward to
backward; torch 2.11's FSDP2 then never gathered them again for backward (its pre-backward hook finds the loss
only in outputs ``tree_flatten`` walks, and the model returns a plain dataclass), and backward read freed memory:
an illegal memory access on the H200, a segfault on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost elements of the model's ``nn.ModuleList``s that hold parameters (its blocks/layers).

    A ModuleList inside a block (T5's ``layer`` list) does not make units of its own: one unit per block.
    """
    candidates = [
        child for module in model.modules() if isinstance(module, nn.ModuleList)
        for child in module if any(True for _ in child.parameters())
    ]
    candidates.sort(key=lambda m: sum(1 for _ in m.modules()), reverse=True)
    chosen: list[nn.Module] = []
    inside: set[int] = set()
    for block in candidates:
        if id(block) in inside:
            continue
        chosen.append(block)
        inside.update(id(m) for m in block.modules())
    return chosen


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """``torch.compile`` every transformer block in place (regional compilation, as torchtitan does).

    The blocks of one tower run the same code, so they share one compiled graph (torch compiles a block's code
    once and passes each block's weights in as inputs): compile time is that of a few blocks, not of a 7B model,
    and a graph break in one place costs one block, not the step. Apply before :func:`parallelize`, so FSDP's
    hooks stay outside the compiled regions. ``mode`` is torch.compile's; ``"reduce-overhead"`` (each block a CUDA
    graph) failed on an H200: the ViT's blocks share one compiled function, whose next replay overwrote the output
    the following block still read.
    """
    # A tower's blocks are not all alike (Q-Former layers with and without cross-attention, the last one computing
    # the queries alone), and each kind compiles once per grad mode, train/eval and input shape: torch's default of
    # 8 graphs per function would leave the later Q-Former layers running eagerly (seen on an H200 at batch 16).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in transformer_blocks(model):
        block.compile(backend=backend, mode=mode)
    return model


def output_head_unit(model: nn.Module) -> list[nn.Module]:
    """The modules of the LLM output head's own FSDP unit: the head, with the input embeddings when the two share
    their weight (one parameter cannot belong to two units). Left in the root, the head's bf16 weight was freed
    before the backward pass read it (CUDA, torch 2.11; the loss applies the head after the LLM body)."""
    llm = getattr(model, "llm", None)
    head = llm.hf_model.get_output_embeddings() if llm is not None else None
    if head is None:
        return []
    embeddings = llm.hf_model.get_input_embeddings()
    return [embeddings, head] if embeddings.weight is head.weight else [head]


def compute_dtype(trainer) -> torch.dtype | None:
    """The dtype the trainer's precision computes in (bf16-mixed: bf16; 32-true: None, the stored fp32): what FSDP
    all-gathers the parameters in (a bf16 gather would meet fp32 activations outside autocast) and what the
    whole-step modes autocast to."""
    precision = str(getattr(trainer, "precision", "bf16-mixed"))
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])


def autocast_forward(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run ``module``'s forward (and so its backward) under autocast to ``dtype`` on its parameters' device, its
    output handed back in fp32 (``stage.module.qformer_autocast``: the Q-Former under a 32-true trainer, what
    follows it, the projection and the frozen LLM, staying fp32). The weights stay fp32 master weights; the
    instance's ``forward`` is replaced, so the state dict and the checkpoints keep their names."""
    forward = module.forward

    def autocast(*args, **kwargs):
        device = next(module.parameters()).device.type
        with torch.autocast(device, dtype=dtype):
            return forward(*args, **kwargs).float()

    module.forward = autocast
    return module


def parallelize(model: nn.Module, trainer) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = trainer.strategy.device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(trainer), reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    head_unit = output_head_unit(model)
    if head_unit:
        fully_shard(head_unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in ("generate", "rank"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model
