"""NoCaps (``nocaps_val_4500_captions.json``; test: ``nocaps_test_image_info.json``, no captions).

Native: COCO-style ``{"images": [{"id", "open_images_id", "file_name", "domain", ...}], "annotations":
[{"image_id", "id", "caption"}]}``, 10 captions per val image. One record per image: ``id`` and ``image_id`` are
the integer id the official GT uses; ``extra`` keeps ``open_images_id`` and ``domain`` (in/near/out-domain, for
the per-domain CIDEr). Images: Open Images ``<images>/validation/<file_name>`` (test: ``test/``), or directly
in ``<images>``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json, media_root
from instructblip.data.record import Record

FILES = {"val": "nocaps_val_4500_captions.json", "test": "nocaps_test_image_info.json"}
IMAGE_DIRS = {"val": ("validation", "val", "images"), "test": ("test", "images")}


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, tuple(FILES))
    path = find_files(dataset, src, [FILES[split]], subdirs=("", "annotations"))[FILES[split]]
    data = load_json(path)
    captions: dict = defaultdict(list)
    for annotation in data.get("annotations", []):
        if annotation.get("caption") is not None:
            captions[annotation.get("image_id")].append(annotation["caption"].strip())
    root = media_root(src, images)
    folder = find_dir(dataset, [root], IMAGE_DIRS[split] + ("",), "Open Images")
    rows = data.get("images", [])
    return Source(_items(dataset, split, rows, captions, folder), len(rows))


def _items(dataset, split, rows, captions, folder: Path):
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        missing = [k for k in ("id", "file_name") if row.get(k) is None]
        if missing or (split == "val" and not captions.get(row["id"])):
            detail = f"missing field(s) {missing}" if missing else "no caption annotations"
            yield Skip(str(row.get("id", f"row{position}")), BAD_FIELD, detail)
            continue
        record = Record(
            dataset=dataset,
            task="caption",
            id=str(row["id"]),
            split=split,
            image_id=str(row["id"]),
            answers=captions.get(row["id"], []),
            extra={"open_images_id": row.get("open_images_id"), "domain": row.get("domain")},
        )
        path = folder / row["file_name"]
        yield Sample(record, lambda path=path: image_member(path))
