"""VQAv2 and OK-VQA in the VQA format, and their question-generation variants (``vqav2_qg``, ``okvqa_qg``).

Native files (question file + annotation file per split, joined on ``question_id``):

- VQAv2: ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json``; splits
  train2014, val2014 (annotated), test2015, test-dev2015 (questions only);
- OK-VQA v1.1: ``OpenEnded_mscoco_{split}_questions.json`` + ``mscoco_{split}_annotations.json``; train2014, val2014.

VQA records keep all 10 human answers in order, repeats included (the metric needs the counts). QG records turn
the pair around: ``question`` is the target and ``answers`` holds the one answer the question must lead to (VQAv2's
``multiple_choice_answer``; OK-VQA's most frequent answer, first one on ties). Each split is converted on its own:
the LAVIS instruct config's train+val concatenation is not repeated. Images: COCO ``<images>/train2014/
COCO_train2014_%012d.jpg`` (``test-dev2015`` questions use ``test2015/``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import as_int, check_split, coco_file, find_dir, find_files, load_json, media_root, require
from instructblip.data.record import Record
from instructblip.errors import ConfigError

SUBDIRS = ("", "Questions", "Annotations", "questions", "annotations")
LAYOUT = {
    "vqav2": ("v2_OpenEnded_mscoco_{}_questions.json", "v2_mscoco_{}_annotations.json",
              ("train2014", "val2014", "test2015", "test-dev2015")),
    "okvqa": ("OpenEnded_mscoco_{}_questions.json", "mscoco_{}_annotations.json", ("train2014", "val2014")),
}
ANNOTATED = ("train2014", "val2014")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    base = dataset.removesuffix("_qg")
    question_file, annotation_file, splits = LAYOUT[base]
    check_split(dataset, split, splits)
    qg = dataset.endswith("_qg")
    if qg and split not in ANNOTATED:
        raise ConfigError(f"{dataset}: question generation needs answers; split {split!r} has none "
                          f"(allowed: {', '.join(ANNOTATED)})")
    names = [question_file.format(split)] + ([annotation_file.format(split)] if split in ANNOTATED else [])
    paths = find_files(dataset, src, names, subdirs=SUBDIRS)
    image_dir = "test2015" if split == "test-dev2015" else split
    find_dir(dataset, [media_root(src, images)], [image_dir], "COCO image")
    questions = load_json(paths[names[0]]).get("questions", [])
    annotations = None
    if len(names) > 1:
        annotations = {a.get("question_id"): a for a in load_json(paths[names[1]]).get("annotations", [])
                       if isinstance(a, dict)}
    items = _items(dataset, base, qg, split, image_dir, questions, annotations, media_root(src, images))
    return Source(items, len(questions))


def _qg_answer(base: str, annotation: dict, answers: list[str]) -> str:
    if base == "vqav2" and annotation.get("multiple_choice_answer"):
        return annotation["multiple_choice_answer"]
    return Counter(answers).most_common(1)[0][0]


def _items(dataset, base, qg, split, image_dir, questions, annotations, root: Path):
    for position, row in enumerate(questions):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        problem = require(row, ["question_id", "question", "image_id"])
        record_id = str(row.get("question_id", f"row{position}"))
        if not problem and as_int(row["image_id"]) is None:
            problem = f"image_id {row['image_id']!r} is not a COCO id"
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        answers: list[str] = []
        extra: dict = {}
        if annotations is not None:
            annotation = annotations.get(row["question_id"])
            if annotation is None:
                yield Skip(record_id, BAD_FIELD, "no annotation for this question_id")
                continue
            answers = [a["answer"] for a in annotation.get("answers") or [] if isinstance(a, dict) and "answer" in a]
            if not answers:
                yield Skip(record_id, BAD_FIELD, "annotation has no answers")
                continue
            extra = {k: annotation[k] for k in ("question_type", "answer_type", "multiple_choice_answer")
                     if k in annotation}
            if base == "okvqa":
                extra["raw_answers"] = [a.get("raw_answer") for a in annotation["answers"] if isinstance(a, dict)]
        if qg:
            answers = [_qg_answer(base, annotation, answers)]
        record = Record(
            dataset=dataset,
            task="qg" if qg else "vqa",
            id=record_id,
            split=split,
            image_id=str(row["image_id"]),
            question=row["question"],
            answers=answers,
            extra=extra,
        )
        path = root / coco_file(image_dir, row["image_id"])
        yield Sample(record, lambda path=path: image_member(path))
