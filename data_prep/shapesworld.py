"""ShapesWorld converter: generates a task dataset's samples (no native files) and writes them as shards.

``instructblip-prep dataset=shapesworld_<task> out=DIR split=train|val|test n=2000 seed=0`` writes ``n`` samples
of that task through the same shard writer as every real dataset: ``png`` images (lossless, so the ground truth
holds on the pixels) or ``frame0.jpg`` ... for the video task, and one :class:`~instructblip.data.record.Record`
each. Sample ``i`` is a pure function of (dataset, split, i, seed): a rerun with a larger ``n`` keeps the complete
shards and appends.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.media import frames_members, pil_member
from data_prep.shards import Sample, ShardSummary, write_shards
from instructblip.errors import ConfigError

SPLITS = ("train", "val", "test")


def samples(dataset: str, split: str, n: int, seed: int):
    from instructblip.shapesworld import tasks

    for index in range(n):
        record, images, _ = tasks.build(dataset, split, index, seed)
        media = frames_members(images) if isinstance(images, list) else pil_member(images)
        yield Sample(record, media)


def convert(src: Path | None, out: Path, split: str, shard_size: int, *, dataset: str, n: int = 1000,
            seed: int = 0, progress: bool = True) -> ShardSummary:
    from instructblip.shapesworld import tasks

    if dataset not in tasks.TASKS:
        raise ConfigError(f"unknown ShapesWorld dataset {dataset!r}; known: {', '.join(tasks.TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"{dataset}: split={split!r}; ShapesWorld splits are {', '.join(SPLITS)}")
    if int(n) < 1:
        raise ConfigError(f"{dataset}: n must be >= 1, got {n}")
    return write_shards(samples(dataset, split, int(n), int(seed)), out, dataset, split, shard_size=shard_size,
                        total=int(n), options={"n": int(n), "seed": int(seed)}, progress=progress)
