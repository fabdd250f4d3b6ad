"""Web CapFilt (BLIP's ``ccs_synthetic_filtered_large.json``: 14M ``{"url", "caption"}`` for CC3M+CC12M+SBU).

The images are not distributed: they are fetched from the URLs, in practice with img2dataset
(``--url_col url --caption_col caption --output_format files``), which writes ``<shard>/<key>.jpg`` beside a
``<key>.json`` holding the ``url``. The converter matches each caption to its downloaded image through that url;
a url that was never downloaded (dead links are common) is skipped as a missing image and listed.
``images=`` is the img2dataset output folder (default: ``<src>/images``). One record per caption row; ``id`` is
the row number in the caption file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from data_prep import Source
from data_prep.media import BAD_FIELD, MISSING_IMAGE, SkipRecord, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json
from instructblip.data.record import Record

FILE = "ccs_synthetic_filtered_large.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, ("train",))
    path = find_files(dataset, src, [FILE], subdirs=("", "annotations"))[FILE]
    folder = Path(images) if images is not None else find_dir(dataset, [src], ["images"], "img2dataset output")
    if not folder.is_dir():
        find_dir(dataset, [folder], [""], "img2dataset output")
    rows = load_json(path)
    return Source(_items(dataset, split, rows, _downloaded(folder)), len(rows))


def _downloaded(folder: Path) -> dict[str, tuple[str, Path]]:
    """url -> (img2dataset key, image path) from the per-image ``<key>.json`` sidecars."""
    index: dict[str, tuple[str, Path]] = {}
    sidecars = tqdm(sorted(folder.rglob("*.json")), desc="web_capfilt: reading img2dataset sidecars", unit="file")
    for sidecar in sidecars:
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
        if not isinstance(meta, dict) or not meta.get("url") or meta.get("status", "success") != "success":
            continue
        for suffix in IMAGE_SUFFIXES:
            image = sidecar.with_suffix(suffix)
            if image.is_file():
                index[meta["url"]] = (sidecar.stem, image)
                break
    return index


def _items(dataset, split, rows, downloaded):
    width = max(9, len(str(len(rows))))
    for position, row in enumerate(rows):
        record_id = f"{position:0{width}d}"
        if not isinstance(row, dict) or not row.get("url") or not row.get("caption"):
            yield Skip(record_id, BAD_FIELD, "missing field(s) url/caption")
            continue
        hit = downloaded.get(row["url"])
        record = Record(
            dataset=dataset,
            task="caption",
            id=record_id,
            split=split,
            image_id=hit[0] if hit else None,
            answers=[row["caption"].strip()],
            extra={"url": row["url"]},
        )
        if hit is None:
            yield Sample(record, lambda url=row["url"]: _not_downloaded(url))
        else:
            yield Sample(record, lambda path=hit[1]: image_member(path))


def _not_downloaded(url: str):
    raise SkipRecord(MISSING_IMAGE, f"not downloaded: {url}")
