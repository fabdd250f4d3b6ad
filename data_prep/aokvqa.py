"""A-OKVQA (``aokvqa_v1p0_{train,val,test}.json``) and its question-generation variant ``aokvqa_qg``.

Native: a JSON list of ``{"question_id" (string), "image_id" (COCO 2017 id), "question", "choices" (4),
"correct_choice_idx", "direct_answers" (10), "difficult_direct_answer", "rationales", "split"}``; test has no
answers. Records keep the 10 direct answers with repeats (``answers``), the choices and ``answer_index`` (MC), and
``difficult_direct_answer`` in ``extra`` so the evaluation can drop those questions as the official scorer does
(LAVIS does not). QG: ``answers`` = [the correct choice], ``question`` the target. Images: COCO 2017
``<images>/{split}2017/%012d.jpg``.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import as_int, check_split, find_dir, find_files, load_json, media_root, require
from instructblip.data.record import Record
from instructblip.errors import ConfigError

SPLITS = ("train", "val", "test")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, SPLITS)
    qg = dataset.endswith("_qg")
    if qg and split == "test":
        raise ConfigError(f"{dataset}: question generation needs answers; split 'test' has none "
                          "(allowed: train, val)")
    name = f"aokvqa_v1p0_{split}.json"
    path = find_files(dataset, src, [name], subdirs=("", "aokvqa", "datasets/aokvqa"))[name]
    folder = find_dir(dataset, [media_root(src, images)], [f"{split}2017"], "COCO 2017 image")
    rows = load_json(path)
    return Source(_items(dataset, qg, split, rows, folder), len(rows))


def _items(dataset, qg, split, rows, folder: Path):
    labelled = split != "test"
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        record_id = str(row.get("question_id", f"row{position}"))
        keys = ["question_id", "image_id", "question", "choices"]
        problem = require(row, keys + (["direct_answers", "correct_choice_idx"] if labelled else []))
        choices = row.get("choices") or []
        index = row.get("correct_choice_idx")
        if not problem and as_int(row["image_id"]) is None:
            problem = f"image_id {row['image_id']!r} is not a COCO id"
        if not problem and labelled and not (isinstance(index, int) and 0 <= index < len(choices)):
            problem = f"correct_choice_idx {index!r} is not an index into {len(choices)} choices"
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        if qg:
            answers = [choices[index]]
        else:
            answers = list(row.get("direct_answers") or [])
        record = Record(
            dataset=dataset,
            task="qg" if qg else "vqa",
            id=record_id,
            split=split,
            image_id=str(row["image_id"]),
            question=row["question"],
            answers=answers,
            choices=list(choices),
            answer_index=index if labelled else None,
            extra={"difficult_direct_answer": row.get("difficult_direct_answer"),
                   "rationales": row.get("rationales", [])},
        )
        path = folder / f"{int(row['image_id']):012d}.jpg"
        yield Sample(record, lambda path=path: image_member(path))
