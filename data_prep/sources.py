"""Finding a dataset's official files under ``src`` (and its image/video folders), with one-line errors.

A converter names the files the dataset's download unpacks to and the folders they may sit in (the archive's
own top folder, or ``src`` itself); :func:`find_files` returns their paths or raises one :class:`MissingFilesError`
that names every missing file and every folder it looked in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from instructblip.errors import ConfigError, DataError


class MissingFilesError(DataError, FileNotFoundError):
    """Some of a dataset's official files are not where the download puts them."""


def _where(dirs: Sequence[Path]) -> str:
    return ", ".join(str(d) for d in dirs)


def candidate_dirs(src: Path, subdirs: Iterable[str]) -> list[Path]:
    """``src/sub`` for each sub ("" = src itself), keeping order, without duplicates."""
    seen: list[Path] = []
    for sub in subdirs:
        path = (src / sub) if sub else src
        if path not in seen:
            seen.append(path)
    return seen


def find_files(dataset: str, src: Path, names: Sequence[str], subdirs: Iterable[str] = ("",)) -> dict[str, Path]:
    """Path of each file name, looked up in ``src/<sub>`` for every sub; raises MissingFilesError listing all misses."""
    dirs = candidate_dirs(Path(src), subdirs)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        for directory in dirs:
            if (directory / name).is_file():
                found[name] = directory / name
                break
        else:
            missing.append(name)
    if missing:
        raise MissingFilesError(f"{dataset}: missing {', '.join(missing)} (looked in {_where(dirs)})")
    return found


def find_dir(dataset: str, roots: Sequence[Path], names: Sequence[str], what: str) -> Path:
    """The first existing ``root/name`` directory ("" = the root itself); raises MissingFilesError naming them all."""
    tried: list[Path] = []
    for root in roots:
        for name in names:
            path = (Path(root) / name) if name else Path(root)
            if path not in tried:
                tried.append(path)
            if path.is_dir():
                return path
    raise MissingFilesError(f"{dataset}: missing the {what} folder (looked for {_where(tried)})")


def check_split(dataset: str, split: str, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ConfigError(f"{dataset}: unknown split {split!r}; allowed: {', '.join(allowed)}")
    return split


def load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict | None, str]]:
    """(line number, parsed object or None, raw text) for every non-empty line; bad lines come back as None so the
    converter can skip and list them."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line), line))
            except json.JSONDecodeError:
                rows.append((number, None, line))
    return rows


def require(row: dict, keys: Sequence[str]) -> str | None:
    """None when every key is present and not None; else a detail naming the missing ones."""
    missing = [key for key in keys if row.get(key) is None]
    return f"missing field(s) {missing}" if missing else None


def multiple_choice(dataset: str, split: str, pid: str, row: dict, **fields):
    """The Record of a multiple-choice problem laid out as IconQA and ScienceQA lay theirs out (``question``,
    ``choices``, ``answer`` = the index of the correct choice), or a string saying what is wrong with the row."""
    from instructblip.data.record import Record

    problem = require(row, ["question", "choices", "answer"])
    if problem:
        return problem
    answer, choices = row["answer"], row["choices"]
    if not (isinstance(answer, int) and isinstance(choices, list) and 0 <= answer < len(choices)):
        return f"answer {answer!r} is not an index into {len(choices)} choices"
    return Record(dataset=dataset, task="mc", id=pid, split=split, image_id=pid, question=row["question"],
                  choices=list(choices), answer_index=answer, answers=[choices[answer]], **fields)


def media_root(src: Path, images: str | Path | None) -> Path:
    """Where the official image (or video) folders sit: ``images=`` when given (e.g. a shared COCO root holding
    train2014/, val2014/, train2017/ ...), else ``src``."""
    return Path(images) if images is not None else Path(src)


def coco_file(subdir: str, image_id) -> str:
    """COCO 2014/2015 naming: ``train2014/COCO_train2014_000000262148.jpg``."""
    return f"{subdir}/COCO_{subdir}_{int(image_id):012d}.jpg"


def as_int(value) -> int | None:
    """``int(value)`` for ints and digit strings, else None (the caller skips the record as a bad field)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None
