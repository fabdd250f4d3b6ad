"""The task registry reproduces the paper's split of the 26 datasets (reference/instructblip_lavis.md §3.1)."""

from __future__ import annotations

from collections import Counter

import data_prep
from instructblip.data import registry
from instructblip.data.registry import CATEGORIES, FULLY_HELD_OUT_CATEGORIES

PAPER = {name: registry.DATASETS[name] for name in registry.PAPER_DATASETS}

HELD_OUT = {"nocaps", "flickr30k", "gqa", "vsr", "iconqa", "vizwiz", "scienceqa", "textvqa", "msvd_qa", "msrvtt_qa",
            "ivqa", "visdial", "hateful_memes"}


def test_26_datasets_13_held_in_13_held_out_11_categories():
    assert len(PAPER) == 26
    assert {name for name, info in PAPER.items() if info.held_out} == HELD_OUT
    assert sum(not info.held_out for info in PAPER.values()) == 13
    assert {info.category for info in PAPER.values()} == set(CATEGORIES) and len(CATEGORIES) == 11
    assert all(info.world == "real" for info in PAPER.values())


def test_four_categories_are_fully_held_out_and_the_others_are_not():
    held_in_categories = {info.category for info in PAPER.values() if not info.held_out}
    assert set(FULLY_HELD_OUT_CATEGORIES) == set(CATEGORIES) - held_in_categories
    assert set(FULLY_HELD_OUT_CATEGORIES) == {"visual reasoning", "video question answering",
                                              "visual conversational question answering", "image classification"}
    members = Counter(info.category for info in PAPER.values())
    assert members["image question generation"] == 3 and members["llava-instruct-150k"] == 3
    assert members["video question answering"] == 3 and members["visual reasoning"] == 3


def test_metrics_methods_and_splits_as_the_paper_assigns_them():
    metric = {name: info.metric for name, info in PAPER.items() if info.held_out}
    assert metric == {"nocaps": "cider", "flickr30k": "cider", "gqa": "accuracy", "vsr": "accuracy",
                      "iconqa": "accuracy", "vizwiz": "vqa_accuracy", "scienceqa": "accuracy",
                      "textvqa": "vqa_accuracy", "msvd_qa": "accuracy", "msrvtt_qa": "accuracy",
                      "ivqa": "ivqa_accuracy", "visdial": "mrr", "hateful_memes": "auroc"}
    for name in ("vqav2", "okvqa", "aokvqa"):
        assert PAPER[name].metric == "vqa_accuracy"
    ranked = {name for name, info in PAPER.items() if info.method == "rank"}
    assert ranked == {"scienceqa", "iconqa", "hateful_memes", "visdial", "msvd_qa", "msrvtt_qa"}
    assert all(info.train_split is None and info.eval_split for info in PAPER.values() if info.held_out)
    assert all(info.train_split for info in PAPER.values() if not info.held_out)
    assert PAPER["gqa"].eval_split == "testdev_balanced" and PAPER["hateful_memes"].eval_split == "dev_seen"
    assert PAPER["vqav2"].train_split == "train2014"  # the train split alone (LAVIS adds val)
    assert {name for name, info in PAPER.items() if info.video} == {"msvd_qa", "msrvtt_qa", "ivqa"}
    assert {info.answer_length for info in PAPER.values()} == {"short", "long"}


def test_every_registered_paper_dataset_has_a_converter():
    assert set(data_prep.FAMILIES) == set(PAPER)
    for name in PAPER:
        module = data_prep.family_module(name)
        assert hasattr(module, "records"), name
