"""Classification and multiple-choice converters: VSR, HatefulMemes, IconQA, ScienceQA (IMG subset)."""

from __future__ import annotations

from conftest import check, convert, garbage, jpeg, png, write_json, write_jsonl
from data_prep.media import BAD_FIELD, MISSING_IMAGE, UNREADABLE_IMAGE


def test_vsr_zeroshot_statements_with_verbalisers(src, out):
    a = jpeg(src / "images/000000017697.jpg")
    b = jpeg(src / "val2017/000000000002.jpg")  # found through image_link's folder
    garbage(src / "images/000000000003.jpg")

    def row(image, caption="The car is behind the suitcase.", label=1, folder="train2017"):
        return {"image": image, "image_link": f"http://images.cocodataset.org/{folder}/{image}", "caption": caption,
                "label": label, "relation": "behind", "subj": "car", "obj": "suitcase", "annotator_id": 0,
                "vote_true_validator_id": [], "vote_false_validator_id": []}

    write_jsonl(src / "data/splits/zeroshot/test.jsonl", [
        row("000000017697.jpg"), row("000000000002.jpg", "The cat is left of the dog.", 0, "val2017"),
        row("000000000003.jpg"), row("000000000004.jpg"), row("000000000005.jpg", label=None),
    ], extra_lines=["{not json", "[1, 2]"])
    write_jsonl(src / "data/splits/random/test.jsonl", [row("000000017697.jpg")])
    convert("vsr", src, out)  # registry default: test, variant zeroshot
    samples = check(out, "vsr", "test", {
        "000001": {"task": "classification", "image_id": "000000017697.jpg", "text": "The car is behind the suitcase.",
                   "label": 1, "answers": ["yes", "true"], "image": ("jpg", a)},
        "000002": {"task": "classification", "image_id": "000000000002.jpg", "text": "The cat is left of the dog.",
                   "label": 0, "answers": ["no", "false"], "image": ("jpg", b)},
    }, {"000003": UNREADABLE_IMAGE, "000004": MISSING_IMAGE, "000005": BAD_FIELD, "000006": BAD_FIELD,
        "000007": BAD_FIELD})
    assert samples["000001"][0].extra == {"relation": "behind", "subj": "car", "obj": "suitcase"}


def test_hateful_memes_dev_seen(src, out):
    a = png(src / "data/img/42953.png")
    b = png(src / "data/img/01235.png")
    garbage(src / "data/img/00007.png")
    write_jsonl(src / "data/dev_seen.jsonl", [
        {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color that matters"},
        {"id": 1235, "img": "img/01235.png", "label": 1, "text": "hateful text"},
        {"id": 7, "img": "img/00007.png", "label": 1, "text": "x"},
        {"id": 8, "img": "img/00008.png", "label": 0, "text": "x"},
        {"id": 9, "img": "img/00009.png", "label": 0},
    ])
    convert("hateful_memes", src, out)  # registry default: dev_seen
    check(out, "hateful_memes", "dev_seen", {
        "42953": {"task": "classification", "image_id": "img/42953.png", "label": 0, "answers": ["no", "false"],
                  "text": "its their character not their color that matters", "image": ("png", a)},
        "1235": {"task": "classification", "image_id": "img/01235.png", "label": 1, "answers": ["yes", "true"],
                 "text": "hateful text", "image": ("png", b)},
    }, {"7": UNREADABLE_IMAGE, "8": MISSING_IMAGE, "9": BAD_FIELD})


def test_iconqa_choose_txt_test(src, out):
    base = src / "iconqa_data"
    a = png(base / "iconqa/test/choose_txt/100/image.png")
    garbage(base / "iconqa/test/choose_txt/101/image.png")
    problem = {"question": "How likely is it that you will pick a black one?",
               "choices": ["certain", "unlikely", "impossible", "probable"], "answer": 2, "ques_type": "choose_txt",
               "grade": "grade1", "label": "S2", "split": "test"}
    write_json(base / "problems.json", {"100": problem, "101": problem, "102": problem, "103": {**problem, "answer": 9},
                                        "200": {**problem, "split": "train"}})
    write_json(base / "pid_splits.json", {"choose_txt_test": ["100", "101", "102", "103", "104"],
                                          "choose_txt_train": ["200"], "choose_img_test": []})
    convert("iconqa", src, out)  # registry default: test
    samples = check(out, "iconqa", "test", {"100": {
        "task": "mc", "image_id": "100", "question": problem["question"], "choices": problem["choices"],
        "answer_index": 2, "answers": ["impossible"], "image": ("png", a)}},
        {"101": UNREADABLE_IMAGE, "102": MISSING_IMAGE, "103": BAD_FIELD, "104": BAD_FIELD})
    assert samples["100"][0].extra == {"grade": "grade1", "label": "S2"}


def test_scienceqa_image_subset_with_hint_as_context(src, out):
    base = src / "data/scienceqa"
    a = png(base / "images/test/5/image.png")
    garbage(base / "images/test/6/image.png")
    problem = {"question": "Which of these states is farthest north?", "choices": ["West Virginia", "Louisiana"],
               "answer": 0, "hint": "Figure: a map.", "image": "image.png", "task": "closed choice",
               "grade": "grade2", "subject": "social science", "topic": "geography", "category": "Geography",
               "skill": "Read a map", "lecture": "Maps have four cardinal directions.", "solution": "Look north.",
               "split": "test"}
    write_json(base / "problems.json", {"5": problem, "6": problem, "7": problem, "8": {**problem, "image": None},
                                        "9": {**problem, "choices": None}, "10": {**problem, "hint": ""}})
    write_json(base / "pid_splits.json", {"train": [], "val": [], "test": ["5", "6", "7", "8", "9", "10"]})
    b = png(base / "images/test/10/image.png")
    convert("scienceqa", src, out, split="test")
    samples = check(out, "scienceqa", "test", {
        "5": {"task": "mc", "image_id": "5", "question": problem["question"], "choices": problem["choices"],
              "answer_index": 0, "answers": ["West Virginia"], "context": "Figure: a map.", "image": ("png", a)},
        "10": {"task": "mc", "image_id": "10", "question": problem["question"], "choices": problem["choices"],
               "answer_index": 0, "answers": ["West Virginia"], "image": ("png", b)},
    }, {"6": UNREADABLE_IMAGE, "7": MISSING_IMAGE, "9": BAD_FIELD},
        filtered={"no image (outside the IMG subset)": 1})
    assert samples["5"][0].extra["lecture"] == "Maps have four cardinal directions."
