"""OCR-VQA (``dataset.json``: ASIN -> ``{"imageURL", "questions": [5], "answers": [5], "title", "authorName",
"genre", "split"}``; ``split`` 1/2/3 = train/val/test).

The official ``loadDataset.py`` downloads each cover into ``images/<ASIN><ext>`` (.jpg, or .png/.gif as the URL
says); covers directly in ``<images>`` are found too. One record per (question, answer) pair, id ``<ASIN>_<k>``; a cover that is missing or unreadable skips its
pairs (listed, unlike LAVIS which drops them silently). ``split=`` takes train/val/test (or 1/2/3).
No OCR ships with the dataset, so ``ocr_tokens`` stays empty.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, MISSING_IMAGE, SkipRecord, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import check_split, find_dir, find_files, load_json, media_root
from instructblip.data.record import Record

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
SUFFIXES = (".jpg", ".png", ".gif", ".jpeg")


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    split = {"1": "train", "2": "val", "3": "test"}.get(str(split), split)
    check_split(dataset, split, tuple(SPLIT_CODES))
    path = find_files(dataset, src, ["dataset.json"], subdirs=("", "ocr_vqa", "OCR-VQA"))["dataset.json"]
    folder = find_dir(dataset, [media_root(src, images)], ["images", ""], "images")
    books = [(asin, row) for asin, row in load_json(path).items()
             if not isinstance(row, dict) or row.get("split") == SPLIT_CODES[split]]
    total = sum(len(row.get("questions") or [None]) if isinstance(row, dict) else 1 for _, row in books)
    return Source(_items(dataset, split, books, folder), total)


def _cover(folder: Path, asin: str):
    for suffix in SUFFIXES:
        if (folder / f"{asin}{suffix}").is_file():
            return image_member(folder / f"{asin}{suffix}")
    raise SkipRecord(MISSING_IMAGE, str(folder / f"{asin}.jpg"))


def _items(dataset, split, books, folder: Path):
    for asin, row in books:
        questions = row.get("questions") if isinstance(row, dict) else None
        answers = row.get("answers") if isinstance(row, dict) else None
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            yield Skip(str(asin), BAD_FIELD, "questions/answers missing or of different lengths")
            continue
        for k, (question, answer) in enumerate(zip(questions, answers)):
            record = Record(
                dataset=dataset,
                task="vqa",
                id=f"{asin}_{k}",
                split=split,
                image_id=str(asin),
                question=question,
                answers=[answer],
                extra={key: row.get(key) for key in ("title", "authorName", "genre")},
            )
            yield Sample(record, lambda asin=asin: _cover(folder, asin))
