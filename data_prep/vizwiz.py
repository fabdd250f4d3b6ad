"""VizWiz-VQA (2020+ release: ``Annotations/{train,val,test}.json``, images ``{train,val,test}/``).

Native: a JSON list of ``{"image": "VizWiz_val_00000001.jpg", "question", "answers": [{"answer",
"answer_confidence"}] x10, "answer_type", "answerable"}``; test has only image and question. One question per
image: ``id`` = the image file stem. ``answers`` = the 10 raw answers with repeats ("unanswerable" included);
``extra`` keeps answer_type and answerable.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip, safe_key
from data_prep.sources import check_split, find_dir, find_files, load_json, media_root, require
from instructblip.data.record import Record

SPLITS = ("train", "val", "test")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, SPLITS)
    name = f"{split}.json"
    path = find_files(dataset, src, [name], subdirs=("Annotations", "annotations", ""))[name]
    folder = find_dir(dataset, [media_root(src, images)], [split], "image")
    rows = load_json(path)
    return Source(_items(dataset, split, rows, folder), len(rows))


def _items(dataset, split, rows, folder: Path):
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        record_id = safe_key(Path(row.get("image") or f"row{position}").stem)
        problem = require(row, ["image", "question"] + ([] if split == "test" else ["answers"]))
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        record = Record(
            dataset=dataset,
            task="vqa",
            id=record_id,
            split=split,
            image_id=row["image"],
            question=row["question"],
            answers=[a["answer"] for a in row.get("answers") or [] if isinstance(a, dict) and "answer" in a],
            extra={key: row[key] for key in ("answer_type", "answerable") if key in row},
        )
        path = folder / row["image"]
        yield Sample(record, lambda path=path: image_member(path))
