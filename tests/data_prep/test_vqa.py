"""Question-answering converters: VQAv2, OK-VQA, A-OKVQA (and their QG variants), OCR-VQA, GQA, TextVQA, VizWiz."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from conftest import check, convert, garbage, jpeg, png, write_json
from data_prep.media import BAD_FIELD, MISSING_IMAGE, UNREADABLE_IMAGE
from instructblip.errors import ConfigError

TEN = ["watching", "watching", "spectating", "watching", "looking", "watching", "watching", "viewing",
       "watching", "spectating"]


def _vqa_files(src, prefix_q, prefix_a, split, okvqa=False):
    """Question ids 1..4 on images 11..14: 11 fine, 12 unreadable, 13 missing, 14 fine; qid 5 has no question
    text; qid 6 has no annotation; the 7th entry is not an object."""
    images = {}
    images[11] = jpeg(src / f"{split}/COCO_{split}_{11:012d}.jpg")
    garbage(src / f"{split}/COCO_{split}_{12:012d}.jpg")
    images[14] = jpeg(src / f"{split}/COCO_{split}_{14:012d}.jpg")
    questions = [{"image_id": 10 + q, "question": f"What is {q}?", "question_id": q} for q in (1, 2, 3, 4, 6)]
    questions.append({"image_id": 11, "question_id": 5})
    questions.append(["not", "an", "object"])
    write_json(src / f"{prefix_q}{split}_questions.json", {"info": {}, "task_type": "Open-Ended",
                                                             "data_type": "mscoco", "license": {},
                                                             "data_subtype": split, "questions": questions})

    def answers(values):
        rows = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(values)]
        if okvqa:
            for row in rows:
                row["raw_answer"] = row["answer"].upper()
        return rows

    annotations = [{"question_id": q, "image_id": 10 + q, "question_type": "what are the", "answer_type": "other",
                    "answers": answers(TEN if q == 1 else ["two"] * 5 + ["2"] * 5), "multiple_choice_answer":
                    "watching" if q == 1 else "2"} for q in (1, 2, 3, 4, 5)]
    if okvqa:
        for annotation in annotations:
            annotation.pop("multiple_choice_answer")
            annotation["question_type"] = "one"
    write_json(src / f"{prefix_a}{split}_annotations.json", {"info": {}, "license": {}, "data_type": "mscoco",
                                                               "data_subtype": split, "annotations": annotations})
    return images


@pytest.mark.parametrize("dataset,prefix_q,prefix_a", [
    ("vqav2", "v2_OpenEnded_mscoco_", "v2_mscoco_"),
    ("okvqa", "OpenEnded_mscoco_", "mscoco_"),
])
def test_vqa_format_keeps_all_ten_answers_and_its_qg_variant_reverses_the_pair(src, out, dataset, prefix_q, prefix_a):
    okvqa = dataset == "okvqa"
    images = _vqa_files(src, prefix_q, prefix_a, "val2014", okvqa=okvqa)
    skipped = {"2": UNREADABLE_IMAGE, "3": MISSING_IMAGE, "5": BAD_FIELD, "6": BAD_FIELD, "row6": BAD_FIELD}
    convert(dataset, src, out, split="val2014")
    samples = check(out, dataset, "val2014", {
        "1": {"task": "vqa", "image_id": "11", "question": "What is 1?", "answers": TEN, "image": ("jpg", images[11])},
        "4": {"task": "vqa", "image_id": "14", "question": "What is 4?", "answers": ["two"] * 5 + ["2"] * 5,
              "image": ("jpg", images[14])},
    }, skipped)
    assert samples["1"][0].extra["question_type"] == ("one" if okvqa else "what are the")
    if okvqa:
        assert samples["1"][0].extra["raw_answers"] == [a.upper() for a in TEN]

    convert(f"{dataset}_qg", src, out, split="val2014")
    check(out, f"{dataset}_qg", "val2014", {
        # VQAv2: multiple_choice_answer; OK-VQA: the most frequent answer, the first one on ties
        "1": {"task": "qg", "question": "What is 1?", "answers": ["watching"], "image": ("jpg", images[11])},
        "4": {"task": "qg", "question": "What is 4?", "answers": ["2" if not okvqa else "two"],
              "image": ("jpg", images[14])},
    }, skipped)


def test_vqav2_test_dev_uses_test2015_images_and_qg_refuses_unlabelled_splits(src, out):
    image = jpeg(src / "test2015/COCO_test2015_000000000007.jpg")
    write_json(src / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
               {"questions": [{"image_id": 7, "question": "Why?", "question_id": 70}]})
    convert("vqav2", src, out, split="test-dev2015")
    check(out, "vqav2", "test-dev2015", {"70": {"question": "Why?", "image_id": "7", "image": ("jpg", image)}}, {})
    with pytest.raises(ConfigError, match="question generation needs answers"):
        convert("vqav2_qg", src, out, split="test-dev2015")
    with pytest.raises(ConfigError, match="unknown split 'val'; allowed: train2014, val2014"):
        convert("vqav2", src, out, split="val")


def test_aokvqa_direct_answers_choices_and_qg(src, out):
    a = jpeg(src / "val2017/000000299207.jpg")
    garbage(src / "val2017/000000000002.jpg")
    direct = ["cab"] * 6 + ["taxi"] * 3 + ["bus"]

    def row(qid, image_id, **changes):
        base = {"split": "val", "image_id": image_id, "question_id": qid, "question": "What is the man awaiting?",
                "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
                "direct_answers": direct, "difficult_direct_answer": False, "rationales": ["r1", "r2", "r3"]}
        base.update(changes)
        return base

    rows = [row("22MexNkBPpdZGX6sxbxVBH", 299207), row("q2", 2), row("q3", 3), row("q4", 299207, question=None),
            row("q5", 299207, correct_choice_idx=7)]
    write_json(src / "aokvqa_v1p0_val.json", rows)
    skipped = {"q2": UNREADABLE_IMAGE, "q3": MISSING_IMAGE, "q4": BAD_FIELD, "q5": BAD_FIELD}
    convert("aokvqa", src, out, split="val")
    choices = ["skateboarder", "train", "delivery", "cab"]
    samples = check(out, "aokvqa", "val", {"22MexNkBPpdZGX6sxbxVBH": {
        "task": "vqa", "image_id": "299207", "question": "What is the man awaiting?", "answers": direct,
        "choices": choices, "answer_index": 3, "image": ("jpg", a)}}, skipped)
    assert samples["22MexNkBPpdZGX6sxbxVBH"][0].extra == {"difficult_direct_answer": False,
                                                          "rationales": ["r1", "r2", "r3"]}
    convert("aokvqa_qg", src, out, split="val")
    check(out, "aokvqa_qg", "val", {"22MexNkBPpdZGX6sxbxVBH": {
        "task": "qg", "question": "What is the man awaiting?", "answers": ["cab"], "choices": choices,
        "answer_index": 3, "image": ("jpg", a)}}, skipped)


def test_ocr_vqa_one_record_per_pair_and_covers_by_content(src, out):
    jpg = jpeg(src / "images/761183272.jpg")
    png_bytes = png(src / "images/0001.png")
    gif = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(gif, format="GIF")
    (src / "images/0002.gif").write_bytes(gif.getvalue())
    garbage(src / "images/0003.jpg")

    def book(questions, answers, split=1):
        return {"imageURL": "http://x/1.jpg", "questions": questions, "answers": answers, "title": "T",
                "authorName": "A", "genre": "G", "split": split}

    write_json(src / "dataset.json", {
        "761183272": book(["Who wrote this book?", "What is the title?"], ["Sandra Boynton", "Mom's Calendar"]),
        "0001": book(["Is this a comic?"], ["No"]),
        "0002": book(["Genre?"], ["Art"]),
        "0003": book(["Q?"], ["A"]),
        "0004": book(["Q?"], ["A"]),
        "0005": book(["Q1?", "Q2?"], ["only one"]),
        "0006": book(["Val question?"], ["x"], split=2),
    })
    convert("ocr_vqa", src, out, split="train")
    samples = check(out, "ocr_vqa", "train", {
        "761183272_0": {"question": "Who wrote this book?", "answers": ["Sandra Boynton"], "image_id": "761183272",
                        "image": ("jpg", jpg)},
        "761183272_1": {"question": "What is the title?", "answers": ["Mom's Calendar"], "image_id": "761183272",
                        "image": ("jpg", jpg)},
        "0001_0": {"question": "Is this a comic?", "answers": ["No"], "image_id": "0001", "image": ("png", png_bytes)},
        "0002_0": {"question": "Genre?", "answers": ["Art"], "image_id": "0002"},
    }, {"0003_0": UNREADABLE_IMAGE, "0004_0": MISSING_IMAGE, "0005": BAD_FIELD})
    media = samples["0002_0"][1]
    assert list(media) == ["jpg"]  # a GIF is re-encoded once as JPEG
    assert Image.open(io.BytesIO(media["jpg"])).format == "JPEG"
    assert samples["0001_0"][0].extra == {"title": "T", "authorName": "A", "genre": "G"}


def test_gqa_testdev_balanced(src, out):
    a = jpeg(src / "images/n161313.jpg")
    question = {"imageId": "n161313", "question": "Which room is it?", "answer": "bedroom",
                "fullAnswer": "It is a bedroom.", "isBalanced": True, "groups": {"global": "room", "local": "x"},
                "types": {"structural": "query", "semantic": "global", "detailed": "place"},
                "semantic": [], "semanticStr": "", "annotations": {}, "entailed": [], "equivalent": []}
    write_json(src / "questions1.2/testdev_balanced_questions.json", {
        "20644644": question,
        "201": {**question, "imageId": "n404"},
        "202": {k: v for k, v in question.items() if k != "answer"},
    })
    convert("gqa", src, out)  # registry default: testdev_balanced
    samples = check(out, "gqa", "testdev_balanced", {"20644644": {
        "task": "vqa", "image_id": "n161313", "question": "Which room is it?", "answers": ["bedroom"],
        "image": ("jpg", a)}}, {"201": MISSING_IMAGE, "202": BAD_FIELD})
    assert samples["20644644"][0].extra["fullAnswer"] == "It is a bedroom."


def test_textvqa_with_rosetta_ocr_tokens(src, out):
    a = jpeg(src / "train_images/003a8ae2ef43b901.jpg")
    answers = ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota", "dakota",
               "dakota", "dakota", "dakota"]

    def row(qid, image_id, **changes):
        base = {"question": "what is the brand of this camera?", "question_id": qid, "question_tokens": [],
                "image_id": image_id, "image_classes": ["Camera"], "image_width": 8, "image_height": 6,
                "flickr_original_url": "", "flickr_300k_url": "", "set_name": "val", "answers": answers}
        base.update(changes)
        return base

    write_json(src / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                               "dataset_version": "0.5.1", "data": [
        row(34602, "003a8ae2ef43b901"), row(34603, "ffff"), row(34604, "003a8ae2ef43b901", answers=None)]})
    write_json(src / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [
        {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["DAKOTA", "digital"], "ocr_info": []}]})
    convert("textvqa", src, out)  # registry default: val
    check(out, "textvqa", "val", {"34602": {
        "task": "vqa", "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
        "answers": answers, "ocr_tokens": ["DAKOTA", "digital"], "image": ("jpg", a)}},
        {"34603": MISSING_IMAGE, "34604": BAD_FIELD})


def test_vizwiz_val_answers_with_unanswerable(src, out):
    a = jpeg(src / "val/VizWiz_val_00000001.jpg")
    answers = ["night time"] * 5 + ["unanswerable"] * 2 + ["no", "night time cold medicine", "night time medicine"]

    def row(n, **changes):
        base = {"image": f"VizWiz_val_{n:08d}.jpg", "question": "Can you tell me what this medicine is please?",
                "answers": [{"answer": x, "answer_confidence": "yes"} for x in answers], "answer_type": "other",
                "answerable": 1}
        base.update(changes)
        return base

    write_json(src / "Annotations/val.json", [row(1), row(2), row(3, question=None)])
    convert("vizwiz", src, out, split="val")
    samples = check(out, "vizwiz", "val", {"VizWiz_val_00000001": {
        "task": "vqa", "image_id": "VizWiz_val_00000001.jpg",
        "question": "Can you tell me what this medicine is please?", "answers": answers, "image": ("jpg", a)}},
        {"VizWiz_val_00000002": MISSING_IMAGE, "VizWiz_val_00000003": BAD_FIELD})
    assert samples["VizWiz_val_00000001"][0].extra == {"answer_type": "other", "answerable": 1}
