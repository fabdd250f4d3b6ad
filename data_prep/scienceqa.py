"""ScienceQA, image subset (``problems.json`` + ``pid_splits.json``, in ``data/scienceqa/`` of the repo).

Native: pid -> ``{"question", "choices", "answer" (index), "hint", "image" ("image.png" or null), "lecture",
"solution", "subject", "topic", "category", "skill", "grade", "task", "split"}``. Only problems with an image are
converted (the paper's IMG set; the others are counted as filtered). ``context`` = the hint (the textual context
the paper includes when present); lecture and solution stay in ``extra``. Images:
``images/<split>/<pid>/image.png`` beside problems.json (or under ``src``).
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Filtered, Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json, multiple_choice
from instructblip.errors import DataError

SPLITS = ("train", "val", "test", "trainval", "minitrain", "minival", "minitest")
NO_IMAGE = "no image (outside the IMG subset)"
EXTRA = ("lecture", "solution", "subject", "topic", "category", "skill", "grade", "task")


def records(dataset: str, src: Path, split: str) -> Source:
    check_split(dataset, split, SPLITS)
    paths = find_files(dataset, src, ["problems.json", "pid_splits.json"],
                       subdirs=("", "data/scienceqa", "scienceqa", "data"))
    base = paths["problems.json"].parent
    pid_splits = load_json(paths["pid_splits.json"])
    if split not in pid_splits:
        raise DataError(f"{dataset}: {paths['pid_splits.json']} has no {split!r} list")
    folder = find_dir(dataset, [base, src], ["images"], "images")
    pids = [str(pid) for pid in pid_splits[split]]
    return Source(_items(dataset, split, pids, load_json(paths["problems.json"]), folder), len(pids))


def _items(dataset, split, pids, problems, folder: Path):
    for pid in pids:
        row = problems.get(pid)
        if not isinstance(row, dict):
            yield Skip(pid, BAD_FIELD, "pid listed in pid_splits.json but not in problems.json")
            continue
        if not row.get("image"):
            yield Filtered(NO_IMAGE)
            continue
        record = multiple_choice(dataset, split, pid, row, context=(row.get("hint") or "").strip() or None,
                                 extra={key: row.get(key) for key in EXTRA})
        if isinstance(record, str):
            yield Skip(pid, BAD_FIELD, record)
            continue
        # the problem's own split folder (trainval/mini* splits list pids of train/val/test)
        path = folder / (row.get("split") or split) / pid / row["image"]
        yield Sample(record, lambda path=path: image_member(path))
