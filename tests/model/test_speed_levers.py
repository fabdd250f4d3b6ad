"""The speed levers give the plain path's results: the labelled-positions loss (``forward(return_logits=False)``)
and the lean greedy decoding loop (``instructblip.model.decoding``), against our full-logits path and against
transformers' ``generate`` (tiny random checkpoints, float32). Timing lives in experiments/bench/, not here."""

from __future__ import annotations

import pytest
import torch

from instructblip.model import decoding
from instructblip.testing import to_transformers_batch
from instructblip.train.module import per_sample_loss

from conftest import LLM_KINDS, PROMPTS  # noqa: E402  (tests/model/conftest.py)

ANSWERS = ["a red square on the left", "three"]


def _training_batch(model, images):
    batch = model.processor.training_batch(images, PROMPTS, ANSWERS)
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts[0] != counts[1], "rows with different answer lengths exercise the per-row means"
    return batch


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_labelled_positions_loss_equals_full_logits_loss(kind, our_models, images):
    model = our_models[kind]
    batch = _training_batch(model, images)
    with torch.no_grad():
        full = model(**batch)
        lean = model(**batch, return_logits=False)
    assert lean.logits is None
    # Same math on the same rows; the LM head's matmul runs over fewer rows, so the sums may round differently.
    assert lean.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    expected = per_sample_loss(full.logits, batch["labels"], kind == "llama")
    torch.testing.assert_close(lean.per_sample_loss, expected, rtol=1e-6, atol=1e-6)


def test_labelled_positions_loss_gives_the_same_gradients(our_models, images):
    model = our_models["llama"]
    batch = _training_batch(model, images)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "the tiny model should have a trainable Q-Former"
    grads = []
    for flags in ({}, {"return_logits": False}):
        model.zero_grad(set_to_none=True)
        model(**batch, **flags).loss.backward()
        grads.append([p.grad.clone() for p in trainable])
    model.zero_grad(set_to_none=True)
    for plain, lean in zip(*grads):
        torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-7)


def test_row_without_labels_has_zero_per_sample_loss(our_models, images):
    model = our_models["llama"]
    batch = _training_batch(model, images)
    batch["labels"][1] = -100
    with torch.no_grad():
        out = model(**batch, return_logits=False)
    assert out.per_sample_loss[1].item() == 0.0
    assert out.per_sample_loss[0].item() > 0.0


def _transformers_greedy(ours, hf, batch, **settings):
    with torch.no_grad():
        out = hf.generate(**to_transformers_batch(ours, batch), do_sample=False, length_penalty=1.0,
                          **settings)
    return out[:, batch["input_ids"].shape[1] + ours.config.num_query_tokens :]


@pytest.fixture
def lean_only(our_models, monkeypatch):
    """The LLaMA model with transformers' generate disabled: a greedy call must go through the lean loop."""
    model = our_models["llama"]

    def refuse(*args, **kwargs):
        raise AssertionError("greedy decoding fell back to transformers' generate")

    monkeypatch.setattr(model.llm.hf_model, "generate", refuse)
    yield model
    model.llm.decoding_options = {}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_loop_gives_transformers_token_ids(cache, lean_only, hf_models, images):
    """Left-padded prompts of different lengths, repetition penalty over prompt and answer, a minimum length."""
    ours, hf = lean_only, hf_models["llama"]
    ours.llm.decoding_options = {"cache": cache}
    batch = ours.processor.generation_batch(images, PROMPTS)
    assert batch["attention_mask"].min() == 0
    settings = dict(num_beams=1, max_new_tokens=10, min_new_tokens=3, repetition_penalty=1.4)
    eos, pad = ours.processor.tokenizer.eos_token_id, ours.processor.pad_token_id
    actual = ours.generate_ids(batch, **settings)
    expected = _transformers_greedy(ours, hf, batch, eos_token_id=eos, pad_token_id=pad, **settings)
    assert actual.tolist() == expected.tolist()


def test_greedy_loop_stops_and_pads_like_transformers(lean_only, hf_models, images):
    """An EOS that rows reach at different steps: finished rows get the pad id, the loop stops when all are done."""
    ours, hf = lean_only, hf_models["llama"]
    batch = ours.processor.generation_batch(images, PROMPTS)
    pad = ours.processor.pad_token_id
    free = ours.generate_ids(batch, num_beams=1, max_new_tokens=8, min_new_tokens=0, repetition_penalty=1.0)
    # Declare as EOS a token that row 0 produces early and row 1 produces later or never.
    eos = next(int(t) for t in free[0, 1:] if int(t) not in free[1, :2].tolist())
    settings = dict(
        num_beams=1, max_new_tokens=8, min_new_tokens=1, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=pad
    )
    actual = ours.generate_ids(batch, **settings)
    expected = _transformers_greedy(ours, hf, batch, **settings)
    assert actual.tolist() == expected.tolist()
    first_eos = actual[0].tolist().index(eos)
    assert all(t == pad for t in actual[0, first_eos + 1 :].tolist())


def test_loop_handles_only_what_it_reproduces(our_models):
    hf_model = our_models["llama"].llm.hf_model
    greedy = dict(num_beams=1, do_sample=False, max_new_tokens=5, num_return_sequences=1)
    assert decoding.handles(hf_model, greedy)
    assert not decoding.handles(hf_model, {**greedy, "num_beams": 3})
    assert not decoding.handles(hf_model, {**greedy, "do_sample": True})
    assert not decoding.handles(hf_model, {**greedy, "num_return_sequences": 2})
    assert not decoding.handles(hf_model, {**greedy, "no_repeat_ngram_size": 2})
