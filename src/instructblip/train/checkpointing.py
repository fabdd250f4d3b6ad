"""What a run writes besides Lightning's resume checkpoints.

Resume checkpoints (``checkpoints/step=N.ckpt``, ``last.ckpt``) are Lightning's ``ModelCheckpoint``: written
through ``fsspec`` transactions (a temporary file renamed into place, so a kill mid-write leaves the previous file
intact), the last ``k`` kept (``monitor=step``, ``mode=max``). The module trims them to the trainable weights and
adds the RNG states and counters; the DataModule adds the data position.

Here: the small sharing file (trainable weights as safetensors, written atomically the same way), the Hugging Face
export, and consolidation of a sharded (FSDP/DCP) checkpoint directory into one file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """A full CPU tensor from a plain or FSDP2-sharded (DTensor) parameter."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().to("cpu").contiguous()


def save_trainable(pl_module, path: str | Path, trainer=None) -> Path:
    """Write the trainable parameters (model parameter names) as safetensors; every rank joins the gather."""
    from safetensors.torch import save_file

    path = Path(path)
    params = dict(pl_module.model.named_parameters())
    state = {name: _gather_full(params[name]) for name in pl_module.trainable_names}
    if trainer is None or trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        save_file(state, tmp, metadata={"stage": str(getattr(pl_module, "stage", ""))})
        os.replace(tmp, path)
    return path


def export_huggingface(pl_module, out_dir: str | Path, trainable_file: str | Path | None = None) -> Path:
    """The Hugging Face layout (``model.save_pretrained``), loadable by transformers and ``from_pretrained``.

    A sharded (FSDP2) model cannot be written by one rank: then the model is rebuilt unsharded on this rank's CPU
    from its sources and the trained weights of ``trainable_file`` are loaded into it first.
    """
    out_dir = Path(out_dir)
    model = pl_module.model
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        from instructblip.train.build import load_trainable_weights

        if trainable_file is None:
            raise ValueError("a sharded model needs its trainable_file to be exported")
        model = pl_module.model_factory()
        load_trainable_weights(model, trainable_file)
    model.save_pretrained(str(out_dir))
    return out_dir


def consolidate(checkpoint_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """A sharded (DCP) checkpoint directory -> one ``.ckpt`` file, on CPU, no process group needed."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint_dir = Path(checkpoint_dir)
    out_file = Path(out_file or checkpoint_dir.with_suffix(".consolidated.ckpt"))
    dcp_to_torch_save(str(checkpoint_dir), str(out_file))
    meta = checkpoint_dir / "meta.pt"
    if meta.exists():  # Lightning keeps the non-tensor state (loops, counters) beside the shards
        merged = torch.load(str(out_file), map_location="cpu", weights_only=False)
        merged.update(torch.load(str(meta), map_location="cpu", weights_only=False))
        torch.save(merged, str(out_file))
    return out_file
