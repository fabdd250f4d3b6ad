"""Training callbacks the config wires in (``conf/callbacks/default.yaml``).

* :func:`batch_samples` / :func:`batch_tokens`: what Lightning's ``ThroughputMonitor`` counts (samples/s and
  tokens/s: the LLM text tokens of the batch, padding excluded).
* :class:`ExportOnTrainEnd`: at the end of ``fit`` writes the small sharing file (the trainable weights only, as
  safetensors) and the Hugging Face export (``model.save_pretrained``) next to the resume checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


def batch_samples(batch) -> int:
    return len(batch["dataset"]) if isinstance(batch, dict) else len(batch)


def batch_tokens(batch) -> int:
    if isinstance(batch, dict):
        mask = batch.get("attention_mask", batch.get("text_attention_mask"))
        if mask is not None:
            tokens = int(mask.sum())
            if "decoder_attention_mask" in batch:
                tokens += int(batch["decoder_attention_mask"].sum())
            return tokens
    return batch_samples(batch)  # validation batches (records): count samples, never fewer than the samples


class ExportOnTrainEnd(pl.Callback):
    """``<dirpath>/trainable.safetensors`` and, when ``huggingface`` is true, ``<dirpath>/hf/`` at the end of fit."""

    def __init__(self, dirpath: str, huggingface: bool = True):
        self.dirpath, self.huggingface = Path(dirpath), huggingface

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from instructblip.train.checkpointing import export_huggingface, save_trainable

        path = save_trainable(pl_module, self.dirpath / "trainable.safetensors", trainer)
        if trainer.is_global_zero:
            rank_zero_info(f"trainable weights: {path}")
            if self.huggingface and hasattr(pl_module.model, "save_pretrained"):
                rank_zero_info(f"Hugging Face export: {export_huggingface(pl_module, self.dirpath / 'hf', path)}")
