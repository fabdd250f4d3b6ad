"""GQA (``questions1.2/{split}_questions.json``: a dict questionId -> ``{"imageId", "question", "answer",
"fullAnswer", "isBalanced", "types", "groups", ...}``; ``train_all`` is split into
``train_all_questions/train_all_questions_{0..9}.json``).

Splits as the files name them: ``{train,val,testdev,test,challenge}_{balanced,all}`` and ``submission_all``. The
paper's held-out split is ``testdev_balanced`` (12,578 questions). Records: ``answers`` = [answer] (none for
test/challenge/submission), ``extra`` keeps fullAnswer, isBalanced and the question types. Images:
``<images>/images/<imageId>.jpg``.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip, safe_key
from data_prep.sources import MissingFilesError, candidate_dirs, check_split, find_dir, find_files, load_json, \
    media_root, require
from instructblip.data.record import Record

SPLITS = tuple(f"{part}_{kind}" for part in ("train", "val", "testdev", "test", "challenge")
               for kind in ("balanced", "all")) + ("submission_all",)
SUBDIRS = ("", "questions1.2", "questions")
LABELLED = ("train", "val", "testdev")


def _question_files(dataset: str, src: Path, split: str) -> list[Path]:
    if split != "train_all":
        name = f"{split}_questions.json"
        return [find_files(dataset, src, [name], subdirs=SUBDIRS)[name]]
    dirs = candidate_dirs(src, [f"{sub}/train_all_questions".lstrip("/") for sub in SUBDIRS])
    for directory in dirs:
        parts = sorted(directory.glob("train_all_questions_*.json"),
                       key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        if parts:
            return parts
    raise MissingFilesError(f"{dataset}: missing train_all_questions_*.json (looked in "
                            f"{', '.join(str(d) for d in dirs)})")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, SPLITS)
    files = _question_files(dataset, src, split)
    folder = find_dir(dataset, [media_root(src, images)], ["images"], "images")
    if len(files) == 1:  # one file: load it now, so the progress bar knows the total
        questions = load_json(files[0])
        return Source(_items(dataset, split, [questions], folder), len(questions))
    return Source(_items(dataset, split, (load_json(path) for path in files), folder), None)


def _items(dataset, split, question_dicts, folder: Path):
    labelled = split.split("_")[0] in LABELLED
    for questions in question_dicts:
        for question_id, row in questions.items():
            record_id = safe_key(question_id)
            if not isinstance(row, dict):
                yield Skip(record_id, BAD_FIELD, "question entry is not an object")
                continue
            problem = require(row, ["imageId", "question"] + (["answer"] if labelled else []))
            if problem:
                yield Skip(record_id, BAD_FIELD, problem)
                continue
            record = Record(
                dataset=dataset,
                task="vqa",
                id=record_id,
                split=split,
                image_id=str(row["imageId"]),
                question=row["question"],
                answers=[row["answer"]] if row.get("answer") is not None else [],
                extra={"fullAnswer": row.get("fullAnswer"), "isBalanced": row.get("isBalanced"),
                       "types": row.get("types")},
            )
            path_ = folder / f"{row['imageId']}.jpg"
            yield Sample(record, lambda path_=path_: image_member(path_))
