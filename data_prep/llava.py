"""LLaVA-Instruct-150K, as three datasets: ``conversation_58k.json``, ``detail_23k.json``,
``complex_reasoning_77k.json`` (the Hugging Face dataset liuhaotian/LLaVA-Instruct-150K).

Native: a JSON list of ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``; the first human
turn holds LLaVA's ``<image>`` placeholder (kept as is: the templates drop it, the model prepends the image).
Every turn of a conversation is kept (LAVIS keeps only the first pair). Images: COCO
``<images>/train2017/<image>``.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, image_member
from data_prep.shards import Sample, Skip, safe_key
from data_prep.sources import check_split, find_dir, find_files, load_json, media_root
from instructblip.data.record import Record

FILES = {
    "llava_conversation": "conversation_58k.json",
    "llava_detail": "detail_23k.json",
    "llava_complex_reasoning": "complex_reasoning_77k.json",
}


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, ("train",))
    name = FILES[dataset]
    path = find_files(dataset, src, [name], subdirs=("", "LLaVA-Instruct-150K"))[name]
    folder = find_dir(dataset, [media_root(src, images)], ["train2017"], "COCO train2017 image")
    rows = load_json(path)
    return Source(_items(dataset, split, rows, folder), len(rows))


def _turns(conversation) -> list[dict[str, str]] | None:
    if not isinstance(conversation, list) or not conversation:
        return None
    turns = []
    for turn in conversation:
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(
            turn.get("value"), str
        ):
            return None
        turns.append({"from": turn["from"], "value": turn["value"]})
    return turns if any(t["from"] == "gpt" for t in turns) else None


def _items(dataset, split, rows, folder: Path):
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        record_id = safe_key(row.get("id") or f"row{position}")
        turns = _turns(row.get("conversations"))
        if not row.get("image") or turns is None:
            detail = "missing field(s) ['image']" if not row.get("image") else (
                "conversations is not a list of human/gpt turns with a gpt answer")
            yield Skip(record_id, BAD_FIELD, detail)
            continue
        record = Record(
            dataset=dataset,
            task="conversation",
            id=record_id,
            split=split,
            image_id=row["image"],
            conversation=turns,
        )
        path = folder / row["image"]
        yield Sample(record, lambda path=path: image_member(path))
