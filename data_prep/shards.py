"""The shard writer every converter uses: records in, WebDataset tar shards and a summary file out.

How to use it (a converter, or ShapesWorld)::

    from data_prep.shards import Sample, Skip, Filtered, write_shards
    from data_prep.media import image_member, pil_member, video_members, SkipRecord, BAD_FIELD

    def items():
        for row in rows:                                   # a deterministic order: shard boundaries depend on it
            if "question" not in row:
                yield Skip(id=str(row["id"]), reason=BAD_FIELD, detail="no 'question'")
                continue
            record = Record(dataset="vqav2", task="vqa", id=str(row["id"]), split="val2014", ...)
            path = images / row["file"]
            yield Sample(record, lambda path=path: image_member(path))   # loaded lazily; may raise SkipRecord
            # in-memory images: Sample(record, pil_member(image)); videos: lambda: video_members(path, 4)

    summary = write_shards(items(), out_dir, dataset="vqav2", split="val2014", shard_size=1000, total=len(rows))

What it guarantees:

- shards ``{out}/{dataset}-{split}-{index:06d}.tar``, ``shard_size`` samples each (the last one may be smaller),
  written with webdataset's ``TarWriter``: per sample ``{id}.json`` (``Record.to_json()``) plus its media members
  (``{id}.jpg`` / ``{id}.png`` / ``{id}.frame0.jpg`` ...), see ``instructblip.data.record``;
- each shard is written under ``{name}.tmp`` and renamed when complete, so a shard name on disk is always a
  complete shard. A rerun reads the keys of the complete shards, does not load their media again, and writes only
  the missing shards; because the converter's order is deterministic, shard boundaries stay the same;
- a skipped record (a :class:`Skip` from the converter, or a :class:`~data_prep.media.SkipRecord` raised while
  loading its media) is counted per reason and listed with its id and detail in the summary; a :class:`Filtered`
  notice counts records the dataset's definition excludes (e.g. ScienceQA questions without an image), without
  listing them; nothing is dropped silently;
- ``{out}/{dataset}-{split}-summary.json``: the counts (read, written, reused from earlier runs, skipped and
  filtered per reason), the shard names, and every skipped record;
- a tqdm progress bar over the records.

Record ids become WebDataset keys: they must be non-empty and contain no ``.`` (the key ends at the first dot) and
no ``/``; :func:`safe_key` makes one from any string.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

from tqdm import tqdm

from data_prep.media import BAD_FIELD, SkipRecord
from instructblip.data.record import Record

MEDIA_MEMBER = re.compile(r"^(jpg|png|frame\d+\.jpg)$")


@dataclass
class Sample:
    """One record and its media members: a dict ``{"jpg": bytes}``, or a callable returning one (loaded lazily,
    so a rerun does not read the images of shards already written). The callable may raise SkipRecord."""

    record: Record
    media: Union[dict[str, bytes], Callable[[], dict[str, bytes]]]


@dataclass(frozen=True)
class Skip:
    """A record the converter cannot build (a bad or missing field): counted and listed in the summary."""

    id: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Filtered:
    """A record outside the dataset's definition (not an error): counted per reason, not listed."""

    reason: str


Item = Union[Sample, Skip, Filtered]


@dataclass
class ShardSummary:
    dataset: str
    split: str
    shard_size: int
    records_read: int = 0
    written: int = 0
    reused: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    skipped_records: list[dict[str, str]] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "shard_size": self.shard_size,
            "records_read": self.records_read,
            "written": self.written,
            "reused": self.reused,
            "skipped": self.skipped,
            "filtered": self.filtered,
            "shards": self.shards,
            "options": self.options,
            "skipped_records": self.skipped_records,
        }

    def line(self) -> str:
        """One human line: what was written, what was skipped and why."""
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items())) or "none"
        text = (
            f"{self.dataset}/{self.split}: {self.written} records in {len(self.shards)} shard"
            f"{'' if len(self.shards) == 1 else 's'} "
            f"({self.reused} kept from an earlier run), skipped {self.num_skipped} ({skipped})"
        )
        if self.filtered:
            text += ", filtered " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.filtered.items()))
        return text


def safe_key(text: str) -> str:
    """A WebDataset key from any string: ``.``, ``/`` and whitespace become ``_``."""
    key = re.sub(r"[./\\\s]", "_", str(text))
    if not key:
        raise ValueError("empty record id")
    return key


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def summary_path(out: str | Path, dataset: str, split: str) -> Path:
    return Path(out) / f"{dataset}-{split}-summary.json"


def _complete_shards(out: Path, dataset: str, split: str) -> dict[int, set[str]]:
    """Index -> sample keys of every complete shard already in ``out`` (the rename makes a name complete)."""
    found: dict[int, set[str]] = {}
    pattern = re.compile(re.escape(f"{dataset}-{split}-") + r"(\d{6})\.tar$")
    for path in out.glob(f"{dataset}-{split}-*.tar"):
        match = pattern.match(path.name)
        if not match:
            continue
        try:
            with tarfile.open(path, "r:") as tar:
                keys = {name.split(".", 1)[0] for name in tar.getnames() if name.endswith(".json")}
        except (tarfile.TarError, OSError):
            continue  # unreadable: written again below under the same name
        found[int(match.group(1))] = keys
    return found


def _check_key(record: Record) -> str | None:
    if not record.id or "." in record.id or "/" in record.id:
        return f"record id {record.id!r} is not a WebDataset key (empty, or contains '.' or '/')"
    return None


class _ShardSequence:
    """Opens shards in index order, skipping indices already complete; temp name, then atomic rename."""

    def __init__(self, out: Path, dataset: str, split: str, shard_size: int, complete: set[int]):
        self.out, self.dataset, self.split, self.shard_size = out, dataset, split, shard_size
        self.complete = complete
        self.index = -1
        self.writer = None  # a webdataset.TarWriter while a shard is open
        self.count = 0
        self.written_names: list[str] = []

    def _open_next(self) -> None:
        import webdataset as wds

        self.index += 1
        while self.index in self.complete:
            self.index += 1
        self.tmp = self.out / (shard_name(self.dataset, self.split, self.index) + ".tmp")
        # mtime fixed: the same records give byte-identical shards
        self.writer = wds.TarWriter(str(self.tmp), mtime=0)
        self.count = 0

    def write(self, sample: dict) -> None:
        if self.writer is None:
            self._open_next()
        self.writer.write(sample)
        self.count += 1
        if self.count == self.shard_size:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        final = self.out / shard_name(self.dataset, self.split, self.index)
        self.tmp.replace(final)
        self.written_names.append(final.name)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.tmp.unlink(missing_ok=True)


def write_shards(
    items: Iterable[Item],
    out: str | Path,
    dataset: str,
    split: str,
    shard_size: int = 1000,
    total: int | None = None,
    options: dict | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Write ``items`` (Sample | Skip | Filtered, in a deterministic order) as shards; return the summary (also
    written to ``{out}/{dataset}-{split}-summary.json``). See the module docstring for the guarantees."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    # imported here, not at module level: webdataset imports torch (seconds), and a converter's missing-file
    # error should come at once; imported before the progress bar starts so the bar's rate stays honest
    import webdataset  # noqa: F401
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{dataset}-{split}-*.tar.tmp"):
        stale.unlink()  # left by an interrupted run; its records are written again
    complete = _complete_shards(out, dataset, split)
    done_keys = set().union(*complete.values()) if complete else set()
    summary = ShardSummary(dataset=dataset, split=split, shard_size=shard_size, options=dict(options or {}))
    skipped: Counter[str] = Counter()
    filtered: Counter[str] = Counter()

    def skip(record_id: str, reason: str, detail: str) -> None:
        skipped[reason] += 1
        summary.skipped_records.append({"id": record_id, "reason": reason, "detail": detail})

    shards = _ShardSequence(out, dataset, split, shard_size, set(complete))
    bar = tqdm(total=total, desc=f"{dataset}/{split}", unit="rec", disable=not progress, dynamic_ncols=True)
    try:
        for item in items:
            summary.records_read += 1
            bar.update(1)
            if isinstance(item, Filtered):
                filtered[item.reason] += 1
                continue
            if isinstance(item, Skip):
                skip(item.id, item.reason, item.detail)
                continue
            record = item.record
            problem = _check_key(record)
            if problem:
                skip(str(record.id), BAD_FIELD, problem)
                continue
            if record.id in done_keys:
                summary.reused += 1
                continue
            try:
                media = item.media() if callable(item.media) else item.media
            except SkipRecord as error:
                skip(record.id, error.reason, error.detail)
                continue
            bad = [name for name in media if not MEDIA_MEMBER.match(name)]
            if bad:
                raise ValueError(f"{dataset}: media member names {bad} are not jpg, png or frameN.jpg")
            shards.write({"__key__": record.id, **media, "json": record.to_json()})
            summary.written += 1
        shards.close()
    except BaseException:
        shards.abort()
        raise
    finally:
        bar.close()
    summary.written += summary.reused
    summary.skipped = dict(sorted(skipped.items()))
    summary.filtered = dict(sorted(filtered.items()))
    summary.shards = sorted(set(shards.written_names) | {shard_name(dataset, split, i) for i in complete})
    summary_path(out, dataset, split).write_text(json.dumps(summary.to_dict(), indent=1, ensure_ascii=False))
    return summary
