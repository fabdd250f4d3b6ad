"""Collation through the processor for both LLM kinds (tiny offline checkpoints from instructblip.testing)."""

from __future__ import annotations

import random

import pytest
import torch

from instructblip.data.collate import Collator, make_loader
from instructblip.data.mixture import MixtureDataset, MixtureSource
from instructblip.data.record import Record
from instructblip.data.shards import Example, read_shards
from instructblip.data.templates import render, render_evaluation
from instructblip.errors import ConfigError
from instructblip.processing import InstructBlipProcessor
from instructblip.testing import make_tiny_checkpoint

KINDS = ("llama", "t5")


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: InstructBlipProcessor.from_pretrained(make_tiny_checkpoint(root / kind, llm=kind)) for kind in KINDS}


@pytest.fixture()
def examples(shards):
    """Three tasks through real shards: a VQA, a caption and a multi-turn conversation, each with a seed."""
    records = [
        shards.vqa_record("vqav2", 0),
        Record(dataset="coco_caption", task="caption", id="cap_1", split="train",
               answers=["a red cube on a table", "a cube"]),
        Record(dataset="llava_conversation", task="conversation", id="llava_1", split="train", conversation=[
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cube on a long table."},
            {"from": "human", "value": "Which color?"}, {"from": "gpt", "value": "Red."}]),
    ]
    path = shards.write("mixed-000000.tar", [shards.sample(r) for r in records])
    return [example._replace(seed=1000 + i) for i, example in enumerate(read_shards(path))]


def label_texts(processor, labels) -> list[str]:
    return processor.tokenizer.batch_decode([[t for t in row if t != -100] for row in labels.tolist()],
                                            skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_training_batch_is_the_processors_batch_of_the_rendered_texts(processors, examples, kind):
    processor = processors[kind]
    batch = Collator(processor, "train", augment=False)(examples)
    meta = batch.pop("meta")
    expected_texts = [render(e.record, random.Random(e.seed)) for e in examples]
    assert list(zip(meta["instructions"], meta["targets"])) == expected_texts
    expected = processor.training_batch([e.images[0] for e in examples], meta["instructions"], meta["targets"])
    assert batch.keys() == expected.keys()
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert meta["datasets"] == ["vqav2", "coco_caption", "llava_conversation"]
    assert meta["ids"] == ["vqav2_0", "cap_1", "llava_1"]
    assert meta["references"][0] == ["cube", "cube", "ball"]
    assert batch["pixel_values"].shape[:2] == (3, 3)
    # the loss sees exactly the targets, for both kinds of LLM
    assert [t.strip() for t in label_texts(processor, batch["labels"])] == meta["targets"]
    if processor.llm_kind == "decoder_only":
        assert batch["labels"].shape == batch["input_ids"].shape
        mask = batch["attention_mask"]
        assert torch.all(mask[:, 0] == 1), "decoder-only training rows are right-padded"
        assert torch.all(batch["labels"][mask == 0] == -100)
    else:
        assert "decoder_attention_mask" in batch
        assert torch.all(batch["labels"][batch["decoder_attention_mask"] == 0] == -100)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_batch_uses_fixed_prompts_and_the_llms_padding_side(processors, examples, kind):
    processor = processors[kind]
    collate = Collator(processor, "generate")
    batch = collate(examples)
    meta = batch.pop("meta")
    assert meta["instructions"] == [render_evaluation(e.record).instruction for e in examples]
    assert "labels" not in batch
    assert collate(examples)["input_ids"].tolist() == batch["input_ids"].tolist()
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max(), "the fixture's prompts must differ in length to test padding"
    side = "left" if processor.llm_kind == "decoder_only" else "right"
    if side == "left":
        assert torch.all(mask[:, -1] == 1) and not torch.all(mask[:, 0] == 1)
    else:
        assert torch.all(mask[:, 0] == 1) and not torch.all(mask[:, -1] == 1)


def test_validate_mode_is_a_loss_batch_with_fixed_prompts(processors, examples):
    batch = Collator(processors["llama"], "validate")(examples)
    assert batch["meta"]["instructions"] == [render_evaluation(e.record).instruction for e in examples]
    assert "labels" in batch


def test_draws_follow_the_example_seed(processors, examples):
    collate = Collator(processors["llama"], "train", augment=False)
    first = collate(examples)["meta"]["instructions"]
    assert collate(examples)["meta"]["instructions"] == first
    draws = {tuple(collate([e._replace(seed=s) for e in examples])["meta"]["instructions"]) for s in range(10)}
    assert len(draws) > 1, "other seeds draw other templates"


def test_video_examples_become_frame_stacks(processors, shards):
    video = Record(dataset="msvd_qa", task="video_qa", id="clip_1", split="test", question="what moves?",
                   answers=["ball"], num_frames=4)
    frames = {f"frame{i}.jpg": shards.image_bytes(i) for i in range(4)}
    path = shards.write("msvd-000000.tar", [shards.sample(video, **frames)])
    batch = Collator(processors["t5"], "generate")(list(read_shards(path)))
    assert batch["pixel_values"].shape[:3] == (1, 4, 3)


def test_mixture_through_a_multi_worker_loader(processors, shards):
    sources = [MixtureSource("vqav2", tuple(shards.dataset("vqav2", 2, 4)), 100),
               MixtureSource("okvqa", tuple(shards.dataset("okvqa", 2, 4)), 25)]
    mixture = MixtureDataset(sources, {"vqav2": 0.5, "okvqa": 0.5}, seed=0, shuffle_buffer=4, samples_per_epoch=16)
    loader = make_loader(mixture, Collator(processors["llama"], "train"), batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    assert all(b["input_ids"].shape[0] == 4 and len(b["meta"]["datasets"]) == 4 for b in batches)
    assert {d for b in batches for d in b["meta"]["datasets"]} == {"vqav2", "okvqa"}


def test_unknown_mode_is_rejected(processors):
    with pytest.raises(ConfigError, match="unknown collate mode 'eval'; allowed: train, validate, generate"):
        Collator(processors["llama"], "eval")


def test_plain_tuples_are_accepted(processors, examples):
    as_tuples = [(e.images, e.record) for e in examples]
    batch = Collator(processors["t5"], "generate")(as_tuples)
    assert batch["input_ids"].shape[0] == 3 and isinstance(examples[0], Example)
