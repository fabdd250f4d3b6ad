"""IconQA, multi-text-choice sub-task (``iconqa_data/problems.json`` + ``pid_splits.json``).

Native: ``problems.json`` maps pid -> ``{"question", "choices", "answer" (index), "ques_type", "grade", "label",
"split"}``; ``pid_splits.json`` lists the pids of ``choose_txt_{train,val,test}`` (the paper's held-out task,
6,316 test problems). Records: ``choices``, ``answer_index``, ``answers`` = [the correct choice]. Images:
``iconqa_data/iconqa/<split>/choose_txt/<pid>/image.png``.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json, multiple_choice
from instructblip.errors import DataError

SPLITS = ("train", "val", "test")
SUB_TASK = "choose_txt"


def records(dataset: str, src: Path, split: str) -> Source:
    check_split(dataset, split, SPLITS)
    paths = find_files(dataset, src, ["problems.json", "pid_splits.json"], subdirs=("", "iconqa_data"))
    base = paths["problems.json"].parent
    problems = load_json(paths["problems.json"])
    key = f"{SUB_TASK}_{split}"
    pid_splits = load_json(paths["pid_splits.json"])
    if key not in pid_splits:
        raise DataError(f"{dataset}: {paths['pid_splits.json']} has no {key!r} list")
    folder = find_dir(dataset, [base], [f"iconqa/{split}/{SUB_TASK}"], "image")
    pids = [str(pid) for pid in pid_splits[key]]
    return Source(_items(dataset, split, pids, problems, folder), len(pids))


def _items(dataset, split, pids, problems, folder: Path):
    for pid in pids:
        row = problems.get(pid)
        if not isinstance(row, dict):
            yield Skip(pid, BAD_FIELD, "pid listed in pid_splits.json but not in problems.json")
            continue
        record = multiple_choice(dataset, split, pid, row, extra={"grade": row.get("grade"), "label": row.get("label")})
        if isinstance(record, str):
            yield Skip(pid, BAD_FIELD, record)
            continue
        path = folder / pid / "image.png"
        yield Sample(record, lambda path=path: image_member(path))
