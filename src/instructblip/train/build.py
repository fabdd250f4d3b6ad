"""Building the plain model a stage trains, from the ``model`` config group.

``load_model`` is what ``conf/model/*.yaml`` point their ``_target_`` at (``_partial_: true``: the LightningModule
calls it in ``configure_model``). The model comes from ``pretrained`` (a Hugging Face InstructBLIP directory, a LAVIS
``.pth`` or a checkpoint this project wrote, through ``InstructBlip.from_pretrained``) with config ``overrides``
(``instruction_aware``, ``num_query_tokens``, ``cross_attention_frequency``, ...). ``tiny``: when set and
``pretrained`` does not exist yet, a tiny random checkpoint is written there first (``make_tiny_checkpoint``), so
the smoke run and the tests need nothing on disk. ``init_from``: trainable weights written by an earlier stage
(``trainable.safetensors``, or a resume ``.ckpt``) loaded on top, e.g. instruction tuning from a stage-2 run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from instructblip.errors import CheckpointError, ConfigError


def load_model(
    pretrained: str,
    name: str = "",
    llm_kind: str | None = None,
    overrides: dict[str, Any] | None = None,
    tiny: dict[str, Any] | None = None,
    init_from: str | None = None,
):
    from instructblip.model.instructblip import InstructBlip

    if pretrained in (None, "", "???"):
        raise ConfigError(f"model.pretrained is not set for model {name!r}: give the checkpoint to start from")
    path = Path(str(pretrained)).expanduser()
    if tiny is not None:
        def write_tiny() -> None:
            from instructblip.testing import make_tiny_checkpoint

            if not (path / "config.json").exists():
                options = dict(tiny)
                make_tiny_checkpoint(path, options.pop("llm", "llama"), **options)

        rank_zero_first(write_tiny)
    if not path.exists():
        raise CheckpointError(f"model.pretrained={path} does not exist (model {name!r})")
    model = InstructBlip.from_pretrained(str(path), **dict(overrides or {}))
    kind = getattr(getattr(model, "processor", None), "llm_kind", None)
    if llm_kind is not None and kind is not None and kind != llm_kind:
        raise ConfigError(f"model {name!r} says llm_kind={llm_kind!r} but {path} holds a {kind!r} LLM")
    if init_from:
        load_trainable_weights(model, init_from)
    return model


def rank_zero_first(make) -> None:
    """Run ``make`` on global rank 0 while the other ranks wait (files every rank then reads: the tiny checkpoint,
    the generated shards); just run it outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_rank() == 0:
            make()
        dist.barrier()
    else:
        make()


def read_trainable_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from ``trainable.safetensors`` or a resume ``.ckpt`` (its ``state_dict``, ``model.`` prefix cut)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model.init_from={path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"model.init_from={path}: not a readable checkpoint ({error})") from None
    state = checkpoint.get("state_dict", checkpoint)
    return {key.removeprefix("model."): value for key, value in state.items()}


@torch.no_grad()
def load_trainable_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors of ``path`` into ``model`` by name; shapes must match. Returns the names loaded."""
    weights = read_trainable_file(path)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    # stage-1 heads, and the Q-Former text branch when the model has none (BLIP-2 stage 2), have no place by design
    from instructblip.train.stage1 import STAGE1_HEADS

    droppable = tuple(f"{head}." for head in STAGE1_HEADS) + ("qformer.embeddings.word_embeddings",
                                                               "qformer.embeddings.position_embeddings")
    weights = {k: v for k, v in weights.items() if k in params or not (
        k.startswith(droppable) or k in STAGE1_HEADS or ".text_ffn." in k)}
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensors have no place in the model, e.g. {unknown[:3]}")
    for key, value in weights.items():
        if params[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} is {tuple(value.shape)}, the model has {tuple(params[key].shape)} "
                "(was it trained with other model sizes?)"
            )
        params[key].copy_(value.to(params[key].dtype))
    return sorted(weights)
