"""Converters: a dataset's native files -> WebDataset shards of :class:`instructblip.data.record.Record`.

The converter interface
-----------------------
One module per dataset family, ``data_prep/<family>.py``. :data:`FAMILIES` maps each registry name to its module;
a name ``shapesworld_<task>`` maps to ``data_prep/shapesworld.py`` by convention. A module exposes ONE of:

``records(dataset, src, split, **options) -> Source``
    Finds the official files under ``src`` *eagerly* (a :class:`~data_prep.sources.MissingFilesError` naming the
    files and where it looked, before anything is written), validates ``split``, and returns
    ``Source(items, total)``: ``items`` an iterator of :class:`~data_prep.shards.Sample` /
    :class:`~data_prep.shards.Skip` / :class:`~data_prep.shards.Filtered` in a deterministic order, ``total`` the
    number of items when known (for the progress bar). :func:`convert` writes the shards with
    :func:`data_prep.shards.write_shards`.

``convert(src, out, split, shard_size, *, dataset, **options) -> ShardSummary``
    The module writes its shards itself, with :func:`data_prep.shards.write_shards` (ShapesWorld, which generates
    its samples rather than reading files; ``src`` may be None there).

``options`` are the extra ``key=value`` arguments of ``instructblip-prep`` (``num_frames``, ``images``,
``videos``, ...); a keyword the function does not take is an error naming the ones it does (``progress``, the
progress-bar switch, is passed only to a ``convert`` that takes it). ``split`` is a split
name as the dataset's own files spell it; None means the registry's split (the train split of a held-in dataset,
the evaluation split of a held-out one).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Iterator, NamedTuple

from instructblip.errors import ConfigError

# registry name -> data_prep module (family)
FAMILIES: dict[str, str] = {
    "coco_caption": "karpathy",
    "flickr30k": "karpathy",
    "web_capfilt": "capfilt",
    "nocaps": "nocaps",
    "textcaps": "textvqa",
    "textvqa": "textvqa",
    "vqav2": "vqa",
    "okvqa": "vqa",
    "vqav2_qg": "vqa",
    "okvqa_qg": "vqa",
    "aokvqa": "aokvqa",
    "aokvqa_qg": "aokvqa",
    "ocr_vqa": "ocr_vqa",
    "llava_conversation": "llava",
    "llava_detail": "llava",
    "llava_complex_reasoning": "llava",
    "gqa": "gqa",
    "vsr": "vsr",
    "iconqa": "iconqa",
    "vizwiz": "vizwiz",
    "scienceqa": "scienceqa",
    "hateful_memes": "hateful_memes",
    "visdial": "visdial",
    "msvd_qa": "video_qa",
    "msrvtt_qa": "video_qa",
    "ivqa": "video_qa",
}

SHAPESWORLD_PREFIX = "shapesworld_"
DEFAULT_SHARD_SIZE = 1000


class Source(NamedTuple):
    items: Iterator
    total: int | None


def family_module(dataset: str):
    """The converter module of ``dataset``; ConfigError listing the known names for an unknown one."""
    if dataset.startswith(SHAPESWORLD_PREFIX):
        return importlib.import_module("data_prep.shapesworld")
    if dataset not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"unknown dataset {dataset!r}; known: {known}, shapesworld_<task>")
    return importlib.import_module(f"data_prep.{FAMILIES[dataset]}")


def default_split(dataset: str) -> str:
    from instructblip.data import registry

    if dataset.startswith(SHAPESWORLD_PREFIX):
        importlib.import_module("instructblip.shapesworld.tasks")  # registers the ShapesWorld datasets

    info = registry.DATASETS.get(dataset)
    split = None if info is None else (info.eval_split if info.held_out else info.train_split)
    if split is None:
        raise ConfigError(f"{dataset}: no default split in the registry; pass split=NAME")
    return split


def _check_options(dataset: str, function, options: dict) -> None:
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    fixed = {"dataset", "src", "out", "split", "shard_size", "progress"}
    allowed = sorted(name for name in parameters if name not in fixed)
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ConfigError(
            f"{dataset}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )


def convert(
    dataset: str,
    src,
    out,
    split: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    **options,
):
    """Convert one split of one dataset; returns the :class:`~data_prep.shards.ShardSummary`."""
    from data_prep.shards import write_shards

    module = family_module(dataset)
    if split is None:
        split = default_split(dataset)
    if hasattr(module, "records"):
        if src is None:
            raise ConfigError(f"{dataset}: src=DIR is required (the folder the dataset's download unpacks to)")
        _check_options(dataset, module.records, options)
        source = module.records(dataset, Path(src), split, **options)
        return write_shards(
            source.items, out, dataset, split, shard_size=shard_size, total=source.total, options=options,
            progress=progress,
        )
    _check_options(dataset, module.convert, options)
    if "progress" in inspect.signature(module.convert).parameters:
        options["progress"] = progress
    return module.convert(
        None if src is None else Path(src), Path(out), split, shard_size, dataset=dataset, **options
    )
