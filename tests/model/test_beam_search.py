"""The lean beam search (``instructblip.model.decoding.beam_search*``) against transformers' ``generate``.

Both sides load the same tiny checkpoint; transformers' ``InstructBlipForConditionalGeneration.generate`` is the
oracle and our ``generate_ids`` must give the same token ids without ever calling transformers' ``generate``.
The LLM's last normalisation is scaled down on both sides (``temperature``): the tiny random LLMs are very sure of
themselves, and flatter next-token distributions make the beams compete, so the scores, the repetition penalty and
the length penalty decide the result. EOS is declared to be a token that some rows produce early and others late
or never, so that rows finish at different steps and beams end while others go on.
"""

from __future__ import annotations

import pytest
import torch

from instructblip.model import decoding
from instructblip.model.instructblip import InstructBlip
from instructblip.testing import to_transformers_batch

from conftest import PROMPTS  # noqa: E402  (tests/model/conftest.py)

MAX_NEW = 6


def _final_norm(language_model):
    if hasattr(language_model, "decoder"):  # T5
        return language_model.decoder.final_layer_norm
    return language_model.model.norm


@pytest.fixture(scope="module")
def flat_pairs(tiny_dirs, images):
    """Per LLM kind: (ours, transformers, early_eos) from the same weights, logits scaled by 0.2 (tempered).

    ``early_eos``: a token that row 0's beam search produces early and row 1's does not produce at first; declared
    as EOS it makes rows finish at different steps."""
    from transformers import InstructBlipForConditionalGeneration

    pairs = {}
    for kind, path in tiny_dirs.items():
        hf = InstructBlipForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        ours = InstructBlip.from_pretrained(path).eval()
        with torch.no_grad():
            for language_model in (hf.language_model, ours.llm.hf_model):
                _final_norm(language_model).weight.mul_(0.2)
        batch = ours.processor.generation_batch(images, PROMPTS)
        free = ours.generate_ids(batch, num_beams=5, max_new_tokens=MAX_NEW, min_new_tokens=0,
                                 repetition_penalty=1.0, length_penalty=1.0)
        early = next(int(t) for t in free[0, 1:4] if int(t) not in free[1, :3].tolist())
        pairs[kind] = (ours, hf, early)
    return pairs


@pytest.fixture
def lean_only(flat_pairs, monkeypatch):
    """Transformers' generate disabled on our side: a beam search call must go through the lean loop."""

    def refuse(*args, **kwargs):
        raise AssertionError("beam search fell back to transformers' generate")

    for ours, _, _ in flat_pairs.values():
        monkeypatch.setattr(ours.llm.hf_model, "generate", refuse)
    yield flat_pairs
    for ours, _, _ in flat_pairs.values():
        ours.llm.decoding_options = {}


def _transformers_ids(ours, hf, batch, **settings):
    with torch.no_grad():
        out = hf.generate(**to_transformers_batch(ours, batch), do_sample=False, **settings)
    if ours.llm.kind == "decoder_only":
        return out[:, batch["input_ids"].shape[1] + ours.config.num_query_tokens :]
    return out[:, 1:]  # the decoder start token


def _ends_early(ids: torch.Tensor, eos: list[int]) -> bool:
    """Some row's best hypothesis ends (EOS) before the last column."""
    return bool(torch.isin(ids[:, :-1], torch.tensor(eos)).any())


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_beam_search_gives_transformers_token_ids(kind, lean_only, images):
    """Left-padded prompts of different lengths; the real EOS, one that rows reach at different steps, and two EOS
    ids; a minimum length, repetition penalties above and below 1, length penalties above, at and below 1."""
    ours, hf, early = lean_only[kind]
    batch = ours.processor.generation_batch(images, PROMPTS)
    if kind == "llama":
        assert batch["attention_mask"].min() == 0  # left padding in play
    eos, pad = ours.processor.tokenizer.eos_token_id, ours.processor.pad_token_id
    cases = [
        ([eos], dict(min_new_tokens=3, repetition_penalty=1.5, length_penalty=2.0)),
        ([early], dict(min_new_tokens=0, repetition_penalty=1.0, length_penalty=1.0)),
        ([early, eos], dict(min_new_tokens=0, repetition_penalty=0.7, length_penalty=-2.0)),
    ]
    ended_early = False
    for eos_ids, settings in cases:
        settings = dict(num_beams=5, max_new_tokens=MAX_NEW, eos_token_id=eos_ids, pad_token_id=pad, **settings)
        actual = ours.generate_ids(batch, **settings)
        assert actual.tolist() == _transformers_ids(ours, hf, batch, **settings).tolist(), settings
        ended_early |= _ends_early(actual, eos_ids)
    assert ended_early  # the cases include hypotheses ending before max_new_tokens


def test_beam_search_static_cache_gives_transformers_token_ids(lean_only, images):
    ours, hf, early = lean_only["llama"]
    ours.llm.decoding_options = {"cache": "static"}
    batch = ours.processor.generation_batch(images, PROMPTS)
    settings = dict(num_beams=4, max_new_tokens=MAX_NEW, eos_token_id=early, pad_token_id=ours.processor.pad_token_id,
                    min_new_tokens=1, repetition_penalty=1.5, length_penalty=-1.0)
    actual = ours.generate_ids(batch, **settings)
    assert actual.tolist() == _transformers_ids(ours, hf, batch, **settings).tolist()
    assert _ends_early(actual, [early])


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_beam_search_without_prompt_ids_gives_transformers_token_ids(lean_only, images):
    """The embeddings-only call (LAVIS' layout, no prompt ids): the repetition penalty sees generated tokens only."""
    ours, _, early = lean_only["llama"]
    batch = ours.processor.generation_batch(images, PROMPTS)
    settings = dict(num_beams=5, max_new_tokens=MAX_NEW, eos_token_id=early, pad_token_id=ours.processor.pad_token_id,
                    min_new_tokens=1, repetition_penalty=0.7, length_penalty=-1.0, do_sample=False)
    with torch.no_grad():
        visual = ours.encode_images(batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"])
        embeds, mask = ours.llm.embed_with_visual(visual, batch["input_ids"], batch["attention_mask"])
        actual = ours.llm.generate(visual, batch["input_ids"], batch["attention_mask"], visual_token_id=None,
                                   **settings)
        # transformers' own LLaMA generate on the same embeddings (our model's generate is patched out)
        expected = type(ours.llm.hf_model).generate(ours.llm.hf_model, inputs_embeds=embeds, attention_mask=mask,
                                                    **settings)
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_settings_change_the_beam_search_result(kind, lean_only, images):
    """The identity tests above only bite if each setting changes the outcome on these models. (A penalty above 1
    leaves LLaMA's best beams alone here: they repeat no token; one below 1, rewarding repeats, changes them.)"""
    ours, _, early = lean_only[kind]
    batch = ours.processor.generation_batch(images, PROMPTS)
    base = dict(num_beams=5, max_new_tokens=MAX_NEW, eos_token_id=early, pad_token_id=ours.processor.pad_token_id,
                min_new_tokens=0, repetition_penalty=1.0, length_penalty=-2.0)
    reference = ours.generate_ids(batch, **base).tolist()
    for change in (dict(repetition_penalty=0.7), dict(length_penalty=1.0), dict(min_new_tokens=3)):
        assert ours.generate_ids(batch, **{**base, **change}).tolist() != reference, change


def test_beam_search_dispatch(flat_pairs):
    hf_model = flat_pairs["llama"][0].llm.hf_model
    beam = dict(num_beams=5, do_sample=False, max_new_tokens=5, num_return_sequences=1, length_penalty=1.0)
    assert decoding.handles_beam_search(hf_model, beam)
    assert not decoding.handles(hf_model, beam)
    assert not decoding.handles_beam_search(hf_model, {**beam, "num_beams": 1})
    assert not decoding.handles_beam_search(hf_model, {**beam, "do_sample": True})
    assert not decoding.handles_beam_search(hf_model, {**beam, "num_return_sequences": 2})
    assert not decoding.handles_beam_search(hf_model, {**beam, "no_repeat_ngram_size": 2})
