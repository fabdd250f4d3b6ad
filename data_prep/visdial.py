"""Visual Dialog v1.0 (``visdial_1.0_{train,val,test}.json``; dense relevance
``visdial_1.0_val_dense_annotations.json``).

Native: ``{"version", "split", "data": {"questions": [str], "answers": [str], "dialogs": [{"image_id", "caption",
"dialog": [{"question", "answer", "answer_options" (100), "gt_index"}]}]}}`` (indices into the string lists).
One record per round, id ``<image_id>_<round>`` (round 1-based): the round's ``question``, the earlier rounds as
``dialog_history`` (a fresh list per round; LAVIS appends one mutated dict), ``caption``, the 100 ``candidates``,
``answer_index`` (gt_index) and ``answers`` = [the ground-truth answer]; ``relevance`` = the 100 dense scores on
the one densely annotated round per val image, when the dense file is present. Test dialogs have options only on
their last round: one record per dialog. Images: train = COCO ``<images>/train2014/``, ``val2014/``; val
``VisualDialog_val2018/VisualDialog_val2018_%012d.jpg``; test ``VisualDialog_test2018/...``.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, MISSING_IMAGE, SkipRecord, image_member
from data_prep.shards import Sample, Skip
from data_prep.sources import as_int, check_split, coco_file, find_dir, find_files, load_json, media_root
from instructblip.data.record import Record

SPLITS = ("train", "val", "test")
DENSE = "visdial_1.0_val_dense_annotations.json"
IMAGE_DIRS = {"train": ("train2014", "val2014"), "val": ("VisualDialog_val2018",), "test": ("VisualDialog_test2018",)}


def records(dataset: str, src: Path, split: str, images: str | None = None) -> Source:
    check_split(dataset, split, SPLITS)
    name = f"visdial_1.0_{split}.json"
    path = find_files(dataset, src, [name], subdirs=("", f"visdial_1.0_{split}"))[name]
    root = media_root(src, images)
    find_dir(dataset, [root], IMAGE_DIRS[split], "image")
    relevance: dict[tuple[int, int], list[float]] = {}
    if split == "val":
        for directory in (path.parent, src):
            if (directory / DENSE).is_file():
                for row in load_json(directory / DENSE):
                    relevance[(row.get("image_id"), row.get("round_id"))] = list(row.get("gt_relevance") or [])
                break
    data = load_json(path).get("data", {})
    dialogs = data.get("dialogs", [])
    total = sum(1 if split == "test" else len(d.get("dialog") or [None]) for d in dialogs)
    items = _items(dataset, split, data.get("questions", []), data.get("answers", []), dialogs, relevance, root)
    return Source(items, total)


def _image(root: Path, split: str, image_id: int):
    if split == "train":
        candidates = [root / coco_file(folder, image_id) for folder in IMAGE_DIRS["train"]]
    else:
        folder = IMAGE_DIRS[split][0]
        candidates = [root / folder / f"{folder}_{image_id:012d}.jpg"]
    for path in candidates:
        if path.is_file():
            return image_member(path)
    raise SkipRecord(MISSING_IMAGE, " or ".join(str(p) for p in candidates))


def _text(strings: list[str], index, what: str) -> str:
    if not isinstance(index, int) or not 0 <= index < len(strings):
        raise IndexError(f"{what} index {index!r} out of range")
    return strings[index]


def _items(dataset, split, questions, answers, dialogs, relevance, root: Path):
    for position, dialog in enumerate(dialogs):
        image_id = as_int(dialog.get("image_id"))
        rounds = dialog.get("dialog")
        if image_id is None or not isinstance(rounds, list) or not rounds:
            yield Skip(f"dialog{position}", BAD_FIELD, "missing or bad image_id / dialog")
            continue
        history: list[dict[str, str]] = []
        broken = None  # a bad round breaks the history of every later round: those are skipped and listed too
        for number, turn in enumerate(rounds, start=1):
            record_id = f"{image_id}_{number:02d}"
            if broken:
                yield Skip(record_id, BAD_FIELD, broken)
                continue
            try:
                question = _text(questions, turn.get("question"), "question")
                answer = _text(answers, turn["answer"], "answer") if "answer" in turn else None
                options = turn.get("answer_options")
                candidates = [_text(answers, i, "answer_options") for i in options] if options else None
            except (IndexError, AttributeError, TypeError) as error:
                yield Skip(record_id, BAD_FIELD, str(error))
                broken = f"history broken at round {number}: {error}"
                continue
            if split == "test" and candidates is None:
                history.append({"question": question, "answer": answer or ""})
                continue
            gt_index = turn.get("gt_index")
            if split != "test" and (candidates is None or answer is None or not isinstance(gt_index, int)
                                    or not 0 <= gt_index < len(candidates)):
                yield Skip(record_id, BAD_FIELD, "round lacks answer, answer_options or a valid gt_index")
                history.append({"question": question, "answer": answer or ""})
                continue
            record = Record(
                dataset=dataset,
                task="dialog",
                id=record_id,
                split=split,
                image_id=str(image_id),
                question=question,
                answers=[answer] if answer is not None and split != "test" else [],
                caption=dialog.get("caption"),
                dialog_history=list(history),
                candidates=candidates,
                answer_index=gt_index if split != "test" else None,
                relevance=relevance.get((image_id, number)),
                extra={"round_id": number},
            )
            yield Sample(record, lambda image_id=image_id: _image(root, split, image_id))
            history.append({"question": question, "answer": answer or ""})
