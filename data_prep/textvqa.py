"""TextVQA (``TextVQA_0.5.1_{split}.json``) and TextCaps (``TextCaps_0.1_{split}.json``), with the Rosetta OCR
tokens (``TextVQA_Rosetta_OCR_v0.2_{split}.json``) that the paper appends to scene-text instructions.

Native: ``{"dataset_type", "dataset_name", "dataset_version", "data": [...]}``. TextVQA rows are questions
(``question_id``, ``question``, ``image_id``, ``answers``: 10 strings, absent in test); TextCaps rows are single
captions (``image_id``, ``caption_str``, ``reference_strs``: the image's 5 captions; test rows have none).
TextCaps records are one per image with every reference caption. Images: ``<images>/train_images/<image_id>.jpg``
(train and val), ``<images>/test_images/`` (test). OCR: the Rosetta file of the same split (TextCaps train/val
images are TextVQA train/val images: both OCR files are read); ``ocr=false`` converts without OCR tokens.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json, media_root, require
from instructblip.data.record import Record

SPLITS = ("train", "val", "test")
OCR_FILE = "TextVQA_Rosetta_OCR_v0.2_{}.json"
SUBDIRS = ("", "TextVQA", "TextCaps", "annotations")


def _ocr_files(dataset: str, split: str) -> list[str]:
    if dataset == "textcaps" and split != "test":
        return [OCR_FILE.format("train"), OCR_FILE.format("val")]
    return [OCR_FILE.format(split)]


def records(dataset: str, src: Path, split: str, images: str | None = None, ocr: bool = True) -> Source:
    check_split(dataset, split, SPLITS)
    data_file = (f"TextVQA_0.5.1_{split}.json" if dataset == "textvqa" else f"TextCaps_0.1_{split}.json")
    names = [data_file] + (_ocr_files(dataset, split) if ocr else [])
    try:
        paths = find_files(dataset, src, names, subdirs=SUBDIRS)
    except FileNotFoundError as error:
        raise type(error)(f"{error}" + ("; pass ocr=false to convert without OCR tokens" if ocr else "")) from None
    tokens: dict[str, list[str]] | None = None
    if ocr:
        tokens = {}
        for name in names[1:]:
            for row in load_json(paths[name]).get("data", []):
                if row.get("image_id") is not None:
                    tokens[row["image_id"]] = list(row.get("ocr_tokens") or [])
    folder = find_dir(dataset, [media_root(src, images)], ["test_images" if split == "test" else "train_images"],
                      "image")
    rows = load_json(paths[data_file]).get("data", [])
    if dataset == "textvqa":
        return Source(_questions(dataset, split, rows, tokens, folder), len(rows))
    grouped = _group_captions(rows)
    return Source(_captions(dataset, split, grouped, tokens, folder), len(grouped))


def _questions(dataset, split, rows, tokens, folder: Path):
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        problem = require(row, ["question_id", "question", "image_id"] + ([] if split == "test" else ["answers"]))
        if problem:
            yield Skip(str(row.get("question_id", f"row{position}")), BAD_FIELD, problem)
            continue
        record = Record(
            dataset=dataset,
            task="vqa",
            id=str(row["question_id"]),
            split=split,
            image_id=row["image_id"],
            question=row["question"],
            answers=list(row.get("answers") or []),
            ocr_tokens=None if tokens is None else tokens.get(row["image_id"], []),
            extra={"image_classes": row.get("image_classes", [])},
        )
        path = folder / f"{row['image_id']}.jpg"
        yield Sample(record, lambda path=path: image_member(path))


def _group_captions(rows) -> list[tuple[str, list]]:
    """Caption rows -> [(image_id or a bad-row marker, [rows])] in first-appearance order."""
    groups: dict[str, list] = {}
    for position, row in enumerate(rows):
        key = (row.get("image_id") if isinstance(row, dict) else None) or f"\0row{position}"
        groups.setdefault(key, []).append(row)
    return list(groups.items())


def _captions(dataset, split, grouped, tokens, folder: Path):
    for image_id, rows in grouped:
        if image_id.startswith("\0"):
            yield Skip(image_id[1:], BAD_FIELD, "missing field(s) ['image_id']")
            continue
        references = next((list(r["reference_strs"]) for r in rows if r.get("reference_strs")), None)
        if references is None:
            references = [r["caption_str"] for r in rows if r.get("caption_str")]
        if split != "test" and not references:
            yield Skip(image_id, BAD_FIELD, "no caption_str / reference_strs")
            continue
        record = Record(
            dataset=dataset,
            task="caption",
            id=image_id,
            split=split,
            image_id=image_id,
            answers=references,
            ocr_tokens=None if tokens is None else tokens.get(image_id, []),
            extra={"image_classes": rows[0].get("image_classes", [])},
        )
        path = folder / f"{image_id}.jpg"
        yield Sample(record, lambda path=path: image_member(path))
