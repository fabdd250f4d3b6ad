"""Visual Spatial Reasoning (cambridgeltl/visual-spatial-reasoning ``data/splits/{zeroshot,random}/
{train,dev,test}.jsonl``; the Hugging Face copies hold the same ``{split}.jsonl`` at their root).

Native, one JSON per line: ``{"image", "image_link", "caption", "label" (0/1), "relation", "subj", "obj", ...}``.
``variant=zeroshot`` (default; the paper's 1,222-statement test split) or ``variant=random``. Records are binary
classification: ``text`` = the statement, ``label``, ``answers`` = the label's verbalisers (["yes", "true"] or
["no", "false"], as the paper ranks/compares them); ``id`` = the line number. Images are COCO 2017 pictures:
``<images>/images/<image>`` (the repo's download folder; also ``data/images/`` when ``src`` is the repo root),
``trainval2017/``, or the ``train2017/`` / ``val2017/`` folder the ``image_link`` names.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, MISSING_IMAGE, SkipRecord, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, media_root, read_jsonl, require
from instructblip.data.record import Record
from instructblip.errors import ConfigError

SPLITS = ("train", "dev", "test")
VARIANTS = ("zeroshot", "random")
# the repo's data/README puts the images in data/images/ (or all of COCO 2017 in data/trainval2017/)
IMAGE_DIRS = ("images", "trainval2017", "data/images", "data/trainval2017", "train2017", "val2017")
VERBALISERS = {1: ["yes", "true"], 0: ["no", "false"]}


def records(dataset: str, src: Path, split: str, images: str | None = None, variant: str = "zeroshot") -> Source:
    check_split(dataset, split, SPLITS)
    if variant not in VARIANTS:
        raise ConfigError(f"{dataset}: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    name = f"{split}.jsonl"
    subdirs = (f"data/splits/{variant}", f"splits/{variant}", variant, "")
    path = find_files(dataset, src, [name], subdirs=subdirs)[name]
    root = media_root(src, images)
    find_dir(dataset, [root], IMAGE_DIRS, "COCO 2017 image")
    lines = read_jsonl(path)
    return Source(_items(dataset, split, lines, root), len(lines))


def _image(root: Path, row: dict):
    folders = list(IMAGE_DIRS)
    link = row.get("image_link") or ""
    if "/" in link:
        folders.insert(0, link.rstrip("/").split("/")[-2])
    for folder in folders:
        if (root / folder / row["image"]).is_file():
            return image_member(root / folder / row["image"])
    raise SkipRecord(MISSING_IMAGE, f"{row['image']} (looked in {', '.join(str(root / f) for f in folders)})")


def _items(dataset, split, lines, root: Path):
    for number, row, _raw in lines:
        record_id = f"{number:06d}"
        if not isinstance(row, dict):
            yield Skip(record_id, BAD_FIELD, f"line {number} is not a JSON object")
            continue
        problem = require(row, ["image", "caption", "label"])
        if not problem and row["label"] not in (0, 1):
            problem = f"label {row['label']!r} is not 0 or 1"
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        record = Record(
            dataset=dataset,
            task="classification",
            id=record_id,
            split=split,
            image_id=row["image"],
            text=row["caption"],
            label=int(row["label"]),
            answers=list(VERBALISERS[int(row["label"])]),
            extra={key: row.get(key) for key in ("relation", "subj", "obj")},
        )
        yield Sample(record, lambda row=row: _image(root, row))
