"""Collation: a list of :class:`~instructblip.data.shards.Example` -> the model batch, through the processor that
inference uses too (so training and inference tokenise and pad identically for both LLM kinds).

``Collator(processor, mode)`` is the DataLoader's ``collate_fn``; it runs inside the DataLoader workers. Modes:

* ``"train"``: template and target drawn per example (:func:`~instructblip.data.templates.render`) with a
  ``random.Random`` seeded by the example's ``seed`` (the mixture draws it; examples without one use the collator's
  own stream, seeded from ``seed``, rank and worker); ``processor.training_batch`` with the training image
  transform;
* ``"validate"``: the fixed evaluation prompt and first reference, ``processor.training_batch`` (a loss on held-in
  validation data), evaluation image transform;
* ``"generate"``: the fixed evaluation prompt, ``processor.generation_batch`` (left-padded for decoder-only LLMs).

The batch is the processor's dict of tensors plus ``batch["meta"]``, a dict of per-example lists that travel
alongside the tensors: ``datasets`` (the mixture source, else the record's dataset), ``ids``, ``tasks``,
``instructions``, ``targets``, ``references`` (every reference answer), ``candidates`` (choices or dialog candidates,
None where the task has none) and ``records``. Pop it before calling the model: ``meta = batch.pop("meta");
model(**batch)``.
"""

from __future__ import annotations

import os
import random
from typing import Any, Sequence

import torch
import webdataset as wds

from instructblip.data.mixture import derive_seed
from instructblip.data.shards import Example
from instructblip.data.templates import render, render_evaluation
from instructblip.errors import ConfigError, DataError

COLLATE_MODES = ("train", "validate", "generate")


class Collator:
    """``collate_fn`` turning examples into the model batch; see the module docstring."""

    def __init__(self, processor: Any, mode: str = "train", *, seed: int = 0, augment: bool | None = None) -> None:
        if mode not in COLLATE_MODES:
            raise ConfigError(f"unknown collate mode {mode!r}; allowed: {', '.join(COLLATE_MODES)}")
        self.processor = processor
        self.mode = mode
        self.seed = seed
        self.augment = (mode == "train") if augment is None else augment
        self._fallback_rng: random.Random | None = None
        self._fallback_pid: int | None = None

    def _rng_for(self, example: Example) -> random.Random:
        if example.seed is not None:
            return random.Random(example.seed)
        if self._fallback_rng is None or self._fallback_pid != os.getpid():
            # first call in this process (the main one or a DataLoader worker): a stream per (rank, worker)
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            self._fallback_rng = random.Random(derive_seed("collate", self.seed, rank, worker))
            self._fallback_pid = os.getpid()
        return self._fallback_rng

    def __call__(self, examples: Sequence[Example | tuple]) -> dict[str, Any]:
        if not examples:
            raise DataError("cannot collate an empty list of examples")
        examples = [item if isinstance(item, Example) else Example(*item) for item in examples]
        images, instructions, targets = [], [], []
        for example in examples:
            record = example.record
            is_video = record.num_frames is not None or len(example.images) > 1
            images.append(list(example.images) if is_video else example.images[0])
            if self.mode == "train":
                instruction, target = render(record, self._rng_for(example))
            else:
                instruction, target = render_evaluation(record)
            instructions.append(instruction)
            targets.append(target)
        if self.mode == "generate":
            batch = self.processor.generation_batch(images, instructions)
        else:
            batch = self.processor.training_batch(images, instructions, targets, train_transform=self.augment)
        batch["meta"] = {
            "datasets": [ex.source or ex.record.dataset for ex in examples],
            "ids": [ex.record.id for ex in examples],
            "tasks": [ex.record.task for ex in examples],
            "instructions": instructions,
            "targets": targets,
            "references": [list(ex.record.answers) for ex in examples],
            "candidates": [ex.record.choices or ex.record.candidates for ex in examples],
            "records": [ex.record for ex in examples],
        }
        return batch


def make_loader(
    dataset: torch.utils.data.IterableDataset,
    collator: Collator,
    batch_size: int,
    num_workers: int = 4,
    *,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader for a mixture or a :func:`~instructblip.data.shards.read_shards` pipeline: batches are built in
    the workers by ``collator``; workers persist across epochs (the mixture's shared epoch reaches them)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
