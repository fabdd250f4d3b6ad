"""Reading shards: WebDataset tar files -> :class:`Example` ``(images, record, seed)``, corrupt samples skipped and
counted.

Public pieces:

* :func:`read_shards` -- one non-resampled pass over one dataset's shards (evaluation, conversion checks). The shard
  list is split by node (rank) and then by DataLoader worker, so every shard, hence every sample, goes to exactly one
  (rank, worker). Splitting is per shard: give a dataset at least ``world_size * num_workers`` shards, or some
  consumers get nothing (they yield an empty stream; they do not fail).
* :func:`list_shards` -- ``DIR`` / ``DIR/pattern-{000000..000009}.tar`` / a list -> sorted shard paths.
* :class:`SkipCounter` -- counts of skipped samples per reason (:data:`SKIP_REASONS`), kept in a shared-memory
  tensor that the counter allocates when it is created in the main process. DataLoader workers (forked or spawned)
  write into the same memory, so ``counter.counts()`` read in the main process is the total over all workers,
  including skips after the last sample of a stream (which a "counts in the batch" scheme would lose). Under DDP
  every rank has its own counter; the training module sums them across ranks when it logs. Each reason's first
  few occurrences are also logged as warnings naming the shard and sample.
* :class:`ExampleDecoder` -- raw tar sample dict -> :class:`Example`, or None (skipped).

Skip reasons: ``unreadable_shard`` (cannot open), ``truncated_tar`` (the tar ends inside a member/header; counted once
per shard, the samples after the cut are not known and not counted), ``bad_tar`` (other tar structure errors, e.g.
a duplicate member), ``missing_json``, ``bad_json`` (not UTF-8 JSON object), ``bad_record`` (JSON that is not a
:class:`Record`: unknown fields or wrong types), ``missing_field`` (a field the record's task needs, see
:func:`instructblip.data.templates.missing_fields`), ``missing_image`` (no ``jpg``/``png``, or fewer frames than
``num_frames``), ``bad_image`` (PIL cannot decode it completely).

A tar cut exactly at a member boundary looks like a shorter, valid tar to Python's tarfile: those samples cannot be
noticed here (compare with the converter's summary counts).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import torch
import webdataset as wds
from PIL import Image

from instructblip.data.record import Record
from instructblip.data.templates import missing_fields
from instructblip.errors import DataError

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "unreadable_shard",
    "truncated_tar",
    "bad_tar",
    "missing_json",
    "bad_json",
    "bad_record",
    "missing_field",
    "missing_image",
    "bad_image",
)

#: How many warnings per reason and process a counter logs before it only counts.
WARNINGS_PER_REASON = 5

_FRAME_MEMBER = re.compile(r"^frame(\d+)\.(jpg|jpeg|png)$")


class Example(NamedTuple):
    """One decoded sample: ``images`` (one PIL image, or the T frames of a video, in order), its ``record``;
    ``seed``: a per-sample integer the training mixture draws, from which the collator seeds the template and
    target draw (None outside the training mixture); ``source``: the mixture dataset it was drawn from (None
    outside a mixture; otherwise the name per-dataset losses and counts are logged under)."""

    images: list[Image.Image]
    record: Record
    seed: int | None = None
    source: str | None = None


class SkipCounter:
    """Skipped samples per reason, shared by the process that creates it and its DataLoader workers.

    The counts live in a shared-memory tensor with one row per process (the creating process, then one per
    DataLoader worker id), so every process writes only its own row and needs no lock; torch's multiprocessing
    hands the same memory to forked and spawned workers alike. Create the counter in the main process *before* the
    DataLoader starts its workers (building the dataset does that). ``counts()`` returns ``{reason: n}`` for every
    reason in :data:`SKIP_REASONS`, summed over the rows; ``total()`` their sum.
    """

    #: DataLoader worker ids beyond this share rows (and could then lose a count in a race); far above practice.
    MAX_WORKERS = 256

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._counts = torch.zeros(1 + self.MAX_WORKERS, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self._warned: dict[str, int] = {}

    @staticmethod
    def _row() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % SkipCounter.MAX_WORKERS

    def add(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; allowed: {', '.join(SKIP_REASONS)}")
        self._counts[self._row(), SKIP_REASONS.index(reason)] += 1
        warned = self._warned.get(reason, 0)
        if warned < WARNINGS_PER_REASON:
            self._warned[reason] = warned + 1
            more = " (further ones are only counted)" if warned + 1 == WARNINGS_PER_REASON else ""
            where = f"{self.name}: " if self.name else ""
            log.warning("skipped a sample, %s%s: %s%s", where, reason, detail, more)

    def counts(self) -> dict[str, int]:
        return dict(zip(SKIP_REASONS, self._counts.sum(0).tolist()))

    def total(self) -> int:
        return sum(self.counts().values())

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.counts().items() if v}
        return f"SkipCounter({self.name!r}, {nonzero})"


# ------------------------------------------------------------------------------------------------ tar-level errors


class CountingHandler:
    """webdataset exception handler for the tar stages: counts the error under its reason and continues.

    A truncated member makes webdataset report twice (the member read, then the tar stream); both name the same
    file object, so the second report of the same source is not counted again."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter
        self._last_truncated: str | None = None

    def __call__(self, exn: Exception) -> bool:
        reason = _tar_reason(exn)
        source = _source_of(exn)
        if reason == "truncated_tar":
            if source is not None and source == self._last_truncated:
                return True
            self._last_truncated = source
        self.counter.add(reason, f"{source or '?'}: {type(exn).__name__}: {_first_arg(exn)}")
        return True


def _tar_reason(exn: Exception) -> str:
    if isinstance(exn, (tarfile.ReadError, tarfile.HeaderError, EOFError, zlib.error)):
        return "truncated_tar"
    if isinstance(exn, tarfile.TarError):
        return "bad_tar"
    if isinstance(exn, OSError):  # gopen / open failed (missing file, permissions, a failing pipe: url)
        return "unreadable_shard"
    return "bad_tar"


def _first_arg(exn: Exception) -> str:
    if isinstance(exn, OSError) and exn.strerror:
        return exn.strerror
    return str(exn.args[0]) if exn.args else ""


def _source_of(exn: Exception) -> str | None:
    """The file object (or url) an exception came from, as webdataset attaches it: member-level errors append
    ``" @ <fileobj>"`` to the message, stream-level ones append ``(stream, url)`` to the args."""
    args = exn.args
    if isinstance(exn, OSError) and exn.filename:
        return str(exn.filename)
    if len(args) >= 3 and isinstance(args[-1], str):
        return str(args[-2]) if args[-2] is not None else args[-1]
    if args and isinstance(args[0], str) and " @ " in args[0]:
        return args[0].rsplit(" @ ", 1)[1]
    return None


# ------------------------------------------------------------------------------------------------ sample decoding


class ExampleDecoder:
    """Raw webdataset sample (``{"__key__", "jpg"|"png"|"frameN.jpg", "json"}``) -> :class:`Example`; returns None
    and counts the reason for a corrupt one (``wds.map`` drops None). ``require_target``: training needs a target."""

    def __init__(self, counter: SkipCounter, require_target: bool = False) -> None:
        self.counter = counter
        self.require_target = require_target

    def __call__(self, sample: dict[str, Any]) -> Example | None:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        raw_json = sample.get("json")
        if raw_json is None:
            self.counter.add("missing_json", where)
            return None
        try:
            data = json.loads(raw_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self.counter.add("bad_json", f"{where}: {err}")
            return None
        if not isinstance(data, dict):
            self.counter.add("bad_json", f"{where}: a JSON {type(data).__name__}, expected an object")
            return None
        try:
            record = Record.from_json(data)
        except (ValueError, TypeError) as err:
            reason = "missing_field" if "lacks required" in str(err) else "bad_record"
            self.counter.add(reason, f"{where}: {err}")
            return None
        missing = missing_fields(record, need_target=self.require_target)
        if missing:
            self.counter.add("missing_field", f"{where}: task {record.task!r} needs {', '.join(missing)}")
            return None
        members = _image_members(sample, record)
        if isinstance(members, str):
            self.counter.add("missing_image", f"{where}: {members}")
            return None
        images = []
        for name in members:
            try:
                images.append(_decode_image(sample[name]))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                self.counter.add("bad_image", f"{where}.{name}: {err}")
                return None
        return Example(images, record)

    def map_or_none(self, samples: Iterable[dict[str, Any]]) -> Iterator[Example | None]:
        """Pipeline stage that keeps the None of a skipped sample in the stream (for callers that watch it)."""
        for sample in samples:
            yield self(sample)


def _image_members(sample: dict[str, Any], record: Record) -> list[str] | str:
    """Member names holding the image(s), in order; a string says what is missing."""
    frames = sorted(
        ((int(m.group(1)), key) for key in sample if (m := _FRAME_MEMBER.match(key))), key=lambda item: item[0]
    )
    if frames or record.num_frames:
        expected = record.num_frames or len(frames)
        indices = [index for index, _ in frames]
        if indices != list(range(expected)):
            return f"frames {indices} present, expected frame0..frame{expected - 1}"
        return [key for _, key in frames]
    for key in ("jpg", "jpeg", "png"):
        if key in sample:
            return [key]
    present = sorted(k for k in sample if not k.startswith("__"))
    return f"no jpg/png/frameN.jpg member (members: {present})"


def _decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode fully now: a truncated JPEG fails here, in the reader, not later in the transform
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------------ shard lists


def list_shards(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard paths from a directory (its ``*.tar``, sorted), a brace pattern (``a-{000000..000009}.tar``), a glob,
    a ``::``-separated string, or a list of paths. Raises :class:`DataError` naming the source when nothing matches."""
    if not isinstance(source, (str, os.PathLike)):
        shards = [str(item) for item in source]
    elif Path(source).is_dir():
        shards = sorted(str(p) for p in Path(source).glob("*.tar"))
    else:
        shards = []
        for pattern in wds.shardlists.expand_urls(str(source)):
            shards.extend(sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern])
    if not shards:
        raise DataError(f"no shards found at {source!s} (expected a directory with .tar files, a pattern or a list)")
    return shards


# ------------------------------------------------------------------------------------------------ the reader


def read_shards(
    source: str | os.PathLike | Iterable[str],
    counter: SkipCounter | None = None,
    *,
    require_target: bool = False,
    split: bool = True,
) -> wds.DataPipeline:
    """One pass over ``source``'s shards in order, yielding :class:`Example`; corrupt samples skipped and counted
    in ``counter`` (a new one if None; the pipeline keeps it as ``.skip_counter``).

    ``split=True`` (default) gives each shard to exactly one (rank, DataLoader worker) via webdataset's
    ``split_by_node`` then ``split_by_worker``; ranks come from ``RANK``/``WORLD_SIZE`` or an initialised
    ``torch.distributed``. Use it as a ``torch.utils.data.IterableDataset`` (``DataLoader(pipeline, batch_size=...,
    collate_fn=Collator(...))``) or iterate it directly.
    """
    shards = list_shards(source)
    if counter is None:
        counter = SkipCounter(shards[0] if len(shards) == 1 else f"{len(shards)} shards from {shards[0]}")
    handler = CountingHandler(counter)
    stages: list[Any] = [wds.SimpleShardList(shards)]
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [
        wds.tarfile_to_samples(handler=handler),
        wds.map(ExampleDecoder(counter, require_target=require_target)),
    ]
    pipeline = wds.DataPipeline(*stages)
    pipeline.skip_counter = counter
    return pipeline
