"""Caption converters: COCO (Karpathy), Flickr30K (Karpathy), NoCaps, Web CapFilt, TextCaps."""

from __future__ import annotations

import pytest

from conftest import check, convert, garbage, jpeg, write_json
from data_prep.media import BAD_FIELD, MISSING_IMAGE, UNREADABLE_IMAGE


def _sentences(*captions):
    return [{"raw": c, "tokens": c.lower().split(), "imgid": 0, "sentid": i} for i, c in enumerate(captions)]


def test_coco_caption_karpathy_train_plus_restval(src, out):
    a = jpeg(src / "train2014/COCO_train2014_000000000001.jpg")
    b = jpeg(src / "val2014/COCO_val2014_000000000002.jpg")
    jpeg(src / "val2014/COCO_val2014_000000000003.jpg")
    garbage(src / "train2014/COCO_train2014_000000000005.jpg")
    jpeg(src / "train2014/COCO_train2014_000000000006.jpg")

    def row(cocoid, filepath, split, *captions):
        return {"filepath": filepath, "filename": f"COCO_{filepath}_{cocoid:012d}.jpg", "imgid": cocoid,
                "cocoid": cocoid, "split": split, "sentids": [0], "sentences": _sentences(*captions)}

    write_json(src / "dataset_coco.json", {"dataset": "coco", "images": [
        row(1, "train2014", "train", "A cat on a mat. ", "A cat."),
        row(2, "val2014", "restval", "Two dogs."),
        row(3, "val2014", "val", "Not in this split."),
        row(4, "train2014", "train", "Image file missing."),
        row(5, "train2014", "train", "Unreadable image."),
        row(6, "train2014", "train"),  # no sentences
    ]})
    convert("coco_caption", src, out, split="train+restval")
    check(out, "coco_caption", "train+restval", {
        "1": {"task": "caption", "split": "train", "image_id": "1", "answers": ["A cat on a mat.", "A cat."],
              "image": ("jpg", a)},
        "2": {"task": "caption", "split": "restval", "image_id": "2", "answers": ["Two dogs."], "image": ("jpg", b)},
    }, skipped={"4": MISSING_IMAGE, "5": UNREADABLE_IMAGE, "6": BAD_FIELD})


def test_flickr30k_karpathy_test(src, out):
    a = jpeg(src / "flickr30k-images/1000092795.jpg")
    write_json(src / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentids": [0, 1],
         "sentences": _sentences("Two young guys.", "Men outside.")},
        {"filename": "1000268201.jpg", "imgid": 1, "split": "train", "sentids": [2], "sentences": _sentences("x")},
        {"filename": "1001.jpg", "imgid": 2, "split": "test", "sentids": [3], "sentences": _sentences("gone")},
        {"imgid": 3, "split": "test", "sentids": [4], "sentences": _sentences("no filename")},
    ]})
    convert("flickr30k", src, out)  # registry default: test
    check(out, "flickr30k", "test", {
        "1000092795": {"task": "caption", "split": "test", "image_id": "1000092795",
                       "answers": ["Two young guys.", "Men outside."], "image": ("jpg", a)},
    }, skipped={"1001": MISSING_IMAGE, "row3": BAD_FIELD})


def test_nocaps_val_all_ten_captions_and_domain(src, out):
    a = jpeg(src / "validation/0013ea2087020901.jpg")
    garbage(src / "validation/00a1.jpg")
    images = [
        {"id": 0, "open_images_id": "0013ea2087020901", "height": 6, "width": 8, "file_name": "0013ea2087020901.jpg",
         "coco_url": "u", "license": 0, "date_captured": "", "domain": "out-domain"},
        {"id": 1, "open_images_id": "00a1", "file_name": "00a1.jpg", "domain": "in-domain"},
        {"id": 2, "open_images_id": "00a2", "file_name": "00a2.jpg", "domain": "near-domain"},
        {"id": 3, "open_images_id": "00a3", "domain": "near-domain"},  # no file_name
    ]
    captions = [f"caption {k}" for k in range(10)]
    annotations = [{"image_id": i, "id": 10 * i + k, "caption": c}
                   for i in (0, 1, 2, 3) for k, c in enumerate(captions)]
    write_json(src / "nocaps_val_4500_captions.json", {"licenses": [], "info": {}, "images": images,
                                                       "annotations": annotations})
    convert("nocaps", src, out, split="val")
    samples = check(out, "nocaps", "val", {
        "0": {"task": "caption", "image_id": "0", "answers": captions, "image": ("jpg", a)},
    }, skipped={"1": UNREADABLE_IMAGE, "2": MISSING_IMAGE, "3": BAD_FIELD})
    assert samples["0"][0].extra == {"open_images_id": "0013ea2087020901", "domain": "out-domain"}


def test_web_capfilt_matches_img2dataset_downloads_by_url(src, out):
    a = jpeg(src / "images/00000/000000000.jpg")
    write_json(src / "images/00000/000000000.json", {"url": "http://a/1.jpg", "key": "000000000",
                                                      "status": "success", "caption": "a dog"})
    garbage(src / "images/00000/000000002.jpg")
    write_json(src / "images/00000/000000002.json", {"url": "http://a/3.jpg", "key": "000000002",
                                                      "status": "success"})
    write_json(src / "ccs_synthetic_filtered_large.json", [
        {"url": "http://a/1.jpg", "caption": "a dog running on grass"},
        {"url": "http://a/2.jpg", "caption": "dead link"},
        {"url": "http://a/3.jpg", "caption": "broken download"},
        {"url": "http://a/4.jpg"},
    ])
    convert("web_capfilt", src, out)
    check(out, "web_capfilt", "train", {
        "000000000": {"task": "caption", "split": "train", "image_id": "000000000",
                      "answers": ["a dog running on grass"], "image": ("jpg", a)},
    }, skipped={"000000001": MISSING_IMAGE, "000000002": UNREADABLE_IMAGE, "000000003": BAD_FIELD})


def _textvqa_ocr(src, split, tokens_by_image):
    write_json(src / f"TextVQA_Rosetta_OCR_v0.2_{split}.json", {
        "dataset_name": "textvqa", "data": [{"image_id": k, "ocr_tokens": v, "ocr_info": [{"word": w,
                                             "bounding_box": {}} for w in v]} for k, v in tokens_by_image.items()]})


def test_textcaps_one_record_per_image_with_all_references_and_ocr(src, out):
    a = jpeg(src / "train_images/0a1.jpg")
    garbage(src / "train_images/0a2.jpg")
    refs = ["a sign reads stop", "stop sign", "red sign", "a stop sign", "sign on a pole"]

    def row(image_id, caption, refs):
        return {"image_id": image_id, "image_name": image_id, "image_path": f"train/{image_id}.jpg",
                "image_classes": ["Sign"], "image_width": 8, "image_height": 6, "flickr_original_url": "",
                "flickr_300k_url": "", "set_name": "train", "caption_id": 1, "caption_str": caption,
                "caption_tokens": caption.split(), "reference_strs": refs, "reference_tokens": []}

    write_json(src / "TextCaps_0.1_train.json", {"dataset_type": "train", "dataset_name": "textcaps",
                                                 "dataset_version": "0.1", "data": [
        row("0a1", refs[0], refs), row("0a1", refs[1], refs), row("0a2", "x", ["x"]), row("0a3", "y", ["y"]),
        {"caption_str": "no image id"},
    ]})
    _textvqa_ocr(src, "train", {"0a1": ["STOP", "ahead"]})
    _textvqa_ocr(src, "val", {})
    convert("textcaps", src, out, split="train")
    check(out, "textcaps", "train", {
        "0a1": {"task": "caption", "image_id": "0a1", "answers": refs, "ocr_tokens": ["STOP", "ahead"],
                "image": ("jpg", a)},
    }, skipped={"0a2": UNREADABLE_IMAGE, "0a3": MISSING_IMAGE, "row4": BAD_FIELD})


def test_textcaps_without_ocr_file_names_it_and_the_way_out(src, out):
    write_json(src / "TextCaps_0.1_val.json", {"data": []})
    with pytest.raises(FileNotFoundError, match=r"TextVQA_Rosetta_OCR_v0.2_train.json.*ocr=false"):
        convert("textcaps", src, out, split="val")
    (src / "train_images").mkdir()
    convert("textcaps", src, out, split="val", ocr=False)
