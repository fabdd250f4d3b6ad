"""Dialog and conversation converters: Visual Dialog v1.0 (every round) and the three LLaVA-Instruct subsets."""

from __future__ import annotations

import pytest

from conftest import check, convert, garbage, jpeg, write_json
from data_prep.media import BAD_FIELD, MISSING_IMAGE, UNREADABLE_IMAGE


def _visdial(src, split, rounds=3):
    questions = [f"question {i}" for i in range(rounds)]
    answers = [f"answer {i}" for i in range(120)]

    def dialog(image_id, round_changes=None):
        turns = []
        for r in range(rounds):
            options = [(r + k) % 120 for k in range(100)]
            turn = {"question": r, "answer": options[7], "answer_options": options, "gt_index": 7}
            turn.update((round_changes or {}).get(r, {}))
            turns.append(turn)
        return {"image_id": image_id, "caption": f"caption {image_id}", "dialog": turns}

    return questions, answers, dialog


def test_visdial_val_every_round_with_its_own_history_and_dense_relevance(src, out):
    folder = "VisualDialog_val2018"
    a = jpeg(src / f"{folder}/{folder}_{185565:012d}.jpg")
    garbage(src / f"{folder}/{folder}_{2:012d}.jpg")
    c = jpeg(src / f"{folder}/{folder}_{4:012d}.jpg")
    questions, answers, dialog = _visdial(src, "val")
    write_json(src / "visdial_1.0_val.json", {"version": "1.0", "split": "val", "data": {
        "questions": questions, "answers": answers,
        "dialogs": [dialog(185565), dialog(2), dialog(3), dialog(4, {1: {"question": 99}})]}})
    relevance = [round(k / 100, 2) for k in range(100)]
    write_json(src / "visdial_1.0_val_dense_annotations.json",
               [{"image_id": 185565, "round_id": 2, "gt_relevance": relevance}])
    convert("visdial", src, out)  # registry default: val
    expected = {}
    history = []
    for r in range(3):
        options = [(r + k) % 120 for k in range(100)]
        expected[f"185565_{r + 1:02d}"] = {
            "task": "dialog", "image_id": "185565", "question": f"question {r}", "answers": [f"answer {options[7]}"],
            "caption": "caption 185565", "dialog_history": list(history),
            "candidates": [f"answer {i}" for i in options], "answer_index": 7,
            "relevance": relevance if r == 1 else None, "image": ("jpg", a)}
        history.append({"question": f"question {r}", "answer": f"answer {options[7]}"})
    expected["4_01"] = {**expected["185565_01"], "image_id": "4", "caption": "caption 4", "relevance": None,
                        "image": ("jpg", c)}
    skipped = {f"2_{r:02d}": UNREADABLE_IMAGE for r in (1, 2, 3)}
    skipped.update({f"3_{r:02d}": MISSING_IMAGE for r in (1, 2, 3)})
    skipped.update({"4_02": BAD_FIELD, "4_03": BAD_FIELD})  # round 2's question index is bad: round 3 loses history
    samples = check(out, "visdial", "val", expected, skipped)
    assert len(samples["185565_03"][0].candidates) == 100


def test_visdial_test_keeps_only_the_round_with_options(src, out):
    folder = "VisualDialog_test2018"
    a = jpeg(src / f"{folder}/{folder}_{9:012d}.jpg")
    write_json(src / "visdial_1.0_test.json", {"version": "1.0", "split": "test", "data": {
        "questions": ["is it sunny", "any people"], "answers": ["yes", "no"] + [f"opt {k}" for k in range(100)],
        "dialogs": [{"image_id": 9, "caption": "a beach", "dialog": [
            {"question": 0, "answer": 0}, {"question": 1, "answer_options": list(range(2, 102))}]}]}})
    convert("visdial", src, out, split="test")
    check(out, "visdial", "test", {"9_02": {
        "task": "dialog", "image_id": "9", "question": "any people", "caption": "a beach",
        "dialog_history": [{"question": "is it sunny", "answer": "yes"}],
        "candidates": [f"opt {k}" for k in range(100)], "image": ("jpg", a)}}, {})


@pytest.mark.parametrize("dataset,file_name", [
    ("llava_conversation", "conversation_58k.json"),
    ("llava_detail", "detail_23k.json"),
    ("llava_complex_reasoning", "complex_reasoning_77k.json"),
])
def test_llava_keeps_every_turn(src, out, dataset, file_name):
    a = jpeg(src / "train2017/000000033471.jpg")
    garbage(src / "train2017/000000000002.jpg")
    turns = [{"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
             {"from": "gpt", "value": "The bus in the image is white and red."},
             {"from": "human", "value": "What feature can be seen on the back of the bus?"},
             {"from": "gpt", "value": "The back of the bus features an advertisement."}]
    write_json(src / file_name, [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": turns},
        {"id": "000000000002", "image": "000000000002.jpg", "conversations": turns},
        {"id": "000000000003", "image": "000000000003.jpg", "conversations": turns},
        {"id": "000000000004", "image": "000000033471.jpg", "conversations": [{"from": "human", "value": "hi"}]},
    ])
    convert(dataset, src, out)  # registry default: train
    check(out, dataset, "train", {"000000033471": {
        "task": "conversation", "image_id": "000000033471.jpg", "conversation": turns, "image": ("jpg", a)}},
        {"000000000002": UNREADABLE_IMAGE, "000000000003": MISSING_IMAGE, "000000000004": BAD_FIELD})
