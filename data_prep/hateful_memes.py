"""Hateful Memes (``data/{train,dev_seen,dev_unseen,test_seen,test_unseen}.jsonl``, images ``data/img/``).

Native, one JSON per line: ``{"id", "img": "img/42953.png", "label" (0/1; absent in unlabeled test files),
"text"}``. Records are binary classification: ``text`` = the meme text, ``label``, ``answers`` = the label's
verbalisers (["yes", "true"] hateful, ["no", "false"] not). The paper's held-out split is ``dev_seen``.
Phase-1 file names ``dev`` and ``test`` are accepted too.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip, safe_key
from data_prep.sources import check_split, find_files, read_jsonl, require
from instructblip.data.record import Record

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen", "dev", "test")
VERBALISERS = {1: ["yes", "true"], 0: ["no", "false"]}


def records(dataset: str, src: Path, split: str) -> Source:
    check_split(dataset, split, SPLITS)
    name = f"{split}.jsonl"
    path = find_files(dataset, src, [name], subdirs=("data", "", "hateful_memes", "hateful_memes/data"))[name]
    lines = read_jsonl(path)
    return Source(_items(dataset, split, lines, path.parent), len(lines))


def _items(dataset, split, lines, base: Path):
    for number, row, _raw in lines:
        if not isinstance(row, dict):
            yield Skip(f"line{number}", BAD_FIELD, f"line {number} is not a JSON object")
            continue
        record_id = safe_key(row.get("id", f"line{number}"))
        problem = require(row, ["id", "img", "text"])
        label = row.get("label")
        if not problem and label is not None and label not in (0, 1):
            problem = f"label {label!r} is not 0 or 1"
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        record = Record(
            dataset=dataset,
            task="classification",
            id=record_id,
            split=split,
            image_id=row["img"],
            text=row["text"],
            label=label,
            answers=list(VERBALISERS[label]) if label is not None else [],
        )
        path = base / row["img"]
        yield Sample(record, lambda path=path: image_member(path))
