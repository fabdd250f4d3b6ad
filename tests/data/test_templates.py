"""Instruction templates: coverage of every task family, fixed evaluation prompts, seeded training draws."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from instructblip.data.record import Record
from instructblip.data.registry import DATASETS
from instructblip.data.templates import (
    CONVERSATION_FAMILY,
    EVALUATION_PROMPTS,
    TEMPLATES,
    evaluation_template,
    missing_fields,
    render,
    render_evaluation,
    render_options,
    template_family,
)
from instructblip.errors import DataError


def record_for(dataset: str, task: str, split: str = "train") -> Record:
    """A complete record of ``task`` (every field its templates may use)."""
    common = dict(dataset=dataset, task=task, id=f"{dataset}-1", split=split)
    by_task = {
        "caption": dict(answers=["a cat on a mat", "a small cat", "cat sleeping"]),
        "vqa": dict(question="What color is the bus?", answers=["red", "red", "white"]),
        "qg": dict(question="What color is the bus?", answers=["red", "red", "white"]),
        "mc": dict(question="Which animal is shown?", choices=["cat", "dog", "cow"], answer_index=1,
                   answers=["dog"], context="A farm."),
        "classification": dict(text="look at this", label=1, answers=["yes"]),
        "dialog": dict(question="is it sunny", caption="a park", candidates=["yes", "no"], answer_index=0,
                       dialog_history=[{"question": "any people", "answer": "two"}]),
        "conversation": dict(conversation=[
            {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A vase."},
            {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Is it full?"}, {"from": "gpt", "value": "Yes, of flowers."},
        ]),
        "video_qa": dict(question="what is the man doing?", answers=["dance"], num_frames=4),
    }
    return Record(**common, **by_task[task])


ALL_TASKS = ["caption", "vqa", "qg", "mc", "classification", "dialog", "conversation", "video_qa"]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_every_family_has_10_to_15_distinct_templates_that_fill(family):
    templates = TEMPLATES[family]
    assert 10 <= len(templates) <= 15, f"{family}: {len(templates)} templates (the paper gives 10-15 per task)"
    assert len(set(templates)) == len(templates), f"{family} repeats a template"
    fields = {name for t in templates for _, name, _, _ in string.Formatter().parse(t) if name}
    values = {name: f"<{name}>" for name in fields}
    for template in templates:
        text = template.format(**values)
        assert "{" not in text and text.strip()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_renders_for_training_and_evaluation(task):
    record = record_for("some_dataset", task)
    family = template_family(record)
    assert family == CONVERSATION_FAMILY or family in TEMPLATES
    instruction, target = render(record, random.Random(0))
    assert instruction and target
    assert "{" not in instruction
    prompt, reference = render_evaluation(record)
    assert prompt and reference


def test_every_registered_dataset_has_a_family_and_a_fixed_prompt():
    assert len(DATASETS) >= 26
    for name, info in DATASETS.items():
        record = record_for(name, info.task, info.eval_split or "val")
        assert render_evaluation(record).instruction, name
        if info.held_out and info.world == "real":
            assert name in EVALUATION_PROMPTS, f"held-out {name} needs its paper zero-shot prompt"


def test_short_answer_families_mix_short_and_open_wording():
    for family in ("caption_short", "vqa"):
        says_short = [t for t in TEMPLATES[family] if any(w in t.lower() for w in ("short", "brief", "few words"))]
        assert 0 < len(says_short) < len(TEMPLATES[family]), family


def test_paper_zero_shot_prompts_are_rendered_exactly():
    textvqa = Record(dataset="textvqa", task="vqa", id="1", split="val", question="what brand is it?",
                     answers=["nikon"], ocr_tokens=["nikon", "d90"])
    assert render_evaluation(textvqa).instruction == "OCR tokens: nikon, d90. Question: what brand is it? Short answer:"
    scienceqa = record_for("scienceqa", "mc", "test")
    assert render_evaluation(scienceqa).instruction == (
        "Context: A farm. Question: Which animal is shown? Options: (a) cat (b) dog (c) cow. Answer:"
    )
    no_context = Record(**{**scienceqa.__dict__, "context": ""})
    assert render_evaluation(no_context).instruction == (
        "Question: Which animal is shown? Options: (a) cat (b) dog (c) cow. Answer:"
    )
    nocaps = record_for("nocaps", "caption", "val")
    assert render_evaluation(nocaps) == ("A short image description:", "a cat on a mat")
    gqa = record_for("gqa", "vqa", "testdev")
    assert render_evaluation(gqa).instruction == "Question: What color is the bus? Short answer:"
    memes = record_for("hateful_memes", "classification", "dev_seen")
    assert render_evaluation(memes).instruction == (
        'This is an image with: "look at this" written on it. Is it hateful? Answer:'
    )
    visdial = record_for("visdial", "dialog", "val")
    assert render_evaluation(visdial) == (
        "Dialog history: a park. any people? two.\n Question: is it sunny Short answer:", "yes"
    )


def test_evaluation_prompts_are_the_same_in_another_process():
    # the paper's datasets only: other tests may have registered ShapesWorld in this process, not in the child
    names = sorted(name for name, info in DATASETS.items() if info.world == "real")
    here = {name: render_evaluation(record_for(name, DATASETS[name].task)).instruction for name in names}
    assert here == {name: render_evaluation(record_for(name, DATASETS[name].task)).instruction for name in names}
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_templates import record_for;"
        "from instructblip.data.registry import DATASETS;"
        "from instructblip.data.templates import render_evaluation;"
        "names = sys.argv[2].split(',');"
        "print(json.dumps({n: render_evaluation(record_for(n, DATASETS[n].task)).instruction for n in names}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), ",".join(names)], capture_output=True, text=True,
        check=True, env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == here


def test_training_draws_are_seeded_and_cover_the_family():
    record = record_for("vqav2", "vqa")
    draws = [render(record, random.Random(seed)) for seed in range(300)]
    assert draws == [render(record, random.Random(seed)) for seed in range(300)]
    instructions = {d.instruction for d in draws}
    assert len(instructions) == len(TEMPLATES["vqa"]), "300 seeded draws should reach all 10 VQA templates"
    targets = [d.target for d in draws]
    # the target is drawn among the references with their multiplicity ("red" twice, "white" once)
    assert set(targets) == {"red", "white"}
    assert targets.count("red") > targets.count("white")


def test_template_index_is_deterministic_and_checked():
    record = record_for("coco_caption", "caption")
    assert render(record, 3) == ("An image that shows", "a cat on a mat")
    with pytest.raises(DataError, match="out of range"):
        render(record, len(TEMPLATES["caption_short"]))


def test_ocr_tokens_and_options_are_stated():
    textcaps = Record(dataset="textcaps", task="caption", id="1", split="train", answers=["a stop sign"],
                      ocr_tokens=["stop", "ahead"])
    instruction, _ = render(textcaps, random.Random(1))
    assert instruction.startswith("OCR tokens: stop, ahead. ")
    assert render_options(["x", "y", "z"]) == "(a) x (b) y (c) z"
    mc = record_for("aokvqa_mc", "mc")
    instruction, target = render(mc, random.Random(2))
    assert "(a) cat (b) dog (c) cow" in instruction and target == "dog"
    assert instruction.startswith("Context: A farm. ")


def test_question_generation_targets_the_question():
    record = record_for("vqav2_qg", "qg")
    for seed in range(20):
        instruction, target = render(record, random.Random(seed))
        assert target == "What color is the bus?"
        assert "red" in instruction or "white" in instruction


def test_conversation_turns_become_context_plus_question():
    record = record_for("llava_conversation", "conversation")
    seen = {}
    for seed in range(60):
        instruction, target = render(record, random.Random(seed))
        seen[target] = instruction
        assert "<image>" not in instruction
    assert set(seen) == {"A vase.", "Blue.", "Yes, of flowers."}, "every gpt turn is a possible target"
    assert seen["A vase."] == "What is on the table?"
    assert seen["Yes, of flowers."] == (
        "Human: What is on the table? Assistant: A vase. Human: What color is it? Assistant: Blue. "
        "Human: Is it full? Assistant:"
    )
    assert render_evaluation(record) == ("What is on the table?", "A vase.")


def test_missing_fields_name_what_the_task_needs():
    bare = Record(dataset="vqav2", task="vqa", id="1", split="train")
    assert missing_fields(bare, need_target=False) == ["question"]
    assert missing_fields(bare, need_target=True) == ["question", "answers"]
    unlabeled = Record(dataset="vizwiz", task="vqa", id="1", split="test", question="what is this?")
    assert missing_fields(unlabeled, need_target=False) == []
    assert missing_fields(Record(dataset="x", task="poetry", id="1", split="t"), need_target=False)
    with pytest.raises(DataError, match="unknown task 'poetry'"):
        template_family(Record(dataset="x", task="poetry", id="1", split="t"))


def test_unlisted_datasets_fall_back_to_the_family_default():
    record = record_for("shapes_count", "vqa")
    assert evaluation_template(record) == TEMPLATES["vqa"][0]


def test_classification_without_a_named_question_asks_a_neutral_one():
    record = record_for("shapes_binary", "classification")
    assert "Does the text match the image?" in render_evaluation(record).instruction
    assert "hateful" not in render_evaluation(record).instruction
