"""COCO Caption and Flickr30K with Karpathy's splits (``dataset_coco.json``, ``dataset_flickr30k.json``).

Native: ``{"images": [{"filepath"?, "filename", "imgid", "cocoid"?, "split", "sentences": [{"raw", ...}]}]}``,
``split`` one of train/restval/val/test (Karpathy's ``caption_datasets.zip``). One record per image with all its
reference captions in ``answers`` (not one per caption: the template draw picks a caption per epoch).
Images: COCO ``<images>/<filepath>/<filename>`` (train2014/, val2014/); Flickr30K ``<images>/flickr30k-images/``.
``split=train+restval`` is the usual 113,287-image training set; the record keeps each image's own split.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json, media_root
from instructblip.data.record import Record

FILES = {"coco_caption": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
SPLITS = ("train", "restval", "val", "test")
FLICKR_IMAGE_DIRS = ("flickr30k-images", "flickr30k_images")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    wanted = split.split("+")
    for part in wanted:
        check_split(dataset, part, SPLITS + ("train+restval",))
    path = find_files(dataset, src, [FILES[dataset]], subdirs=("", "caption_datasets", "annotations"))[FILES[dataset]]
    # (position in the file, row): a row too broken to have an id is listed as row<position>
    rows = [(position, row) for position, row in enumerate(load_json(path).get("images", []))
            if not isinstance(row, dict) or row.get("split") in wanted or "split" not in row]
    root = media_root(src, images)
    if dataset == "coco_caption":
        for folder in sorted({row["filepath"] for _, row in rows if isinstance(row, dict) and row.get("filepath")}):
            find_dir(dataset, [root], [folder], f"{folder} image")
        folder = None
    else:
        folder = find_dir(dataset, [root], FLICKR_IMAGE_DIRS, "flickr30k-images")
    return Source(_items(dataset, rows, root, folder), len(rows))


def _items(dataset, rows, root: Path, flickr_folder: Path | None):
    for position, row in rows:
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        filename = row.get("filename")
        record_id = str(row.get("cocoid") if dataset == "coco_caption" else Path(filename or "").stem) or ""
        sentences = row.get("sentences") or []
        captions = [s.get("raw", "").strip() for s in sentences if isinstance(s, dict) and s.get("raw")]
        missing = [k for k in ("filename", "split") if not row.get(k)]
        if dataset == "coco_caption":
            missing += [k for k in ("filepath", "cocoid") if row.get(k) is None]
        if missing or not captions:
            detail = f"missing field(s) {missing}" if missing else "no caption in 'sentences'"
            yield Skip(record_id or f"row{position}", BAD_FIELD, detail)
            continue
        path = (root / row["filepath"] / filename) if flickr_folder is None else (flickr_folder / filename)
        record = Record(
            dataset=dataset,
            task="caption",
            id=record_id,
            split=row["split"],
            image_id=record_id,
            answers=captions,
            extra={"filename": filename, "imgid": row.get("imgid")},
        )
        yield Sample(record, lambda path=path: image_member(path))
