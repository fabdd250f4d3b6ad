"""Parity with transformers' InstructBlipForConditionalGeneration (float32, tiny random checkpoints, both heads).

Both models read the same saved directory and the same batch (ours without the <image> ids, transformers' with
them), so every difference is a difference in the model code.
"""

from __future__ import annotations

import pytest
import torch

from instructblip.testing import assert_relative_close, to_transformers_batch

from conftest import LLM_KINDS, PROMPTS  # noqa: E402  (tests/model/conftest.py)

ANSWERS = ["a red square", "three"]


def _generation_batch(model, images):
    return model.processor.generation_batch(images, PROMPTS)


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_image_features_match(kind, our_models, hf_models, images):
    ours, hf = our_models[kind], hf_models[kind]
    batch = _generation_batch(ours, images)
    assert batch["qformer_attention_mask"].min() == 0, "the batch should exercise Q-Former padding"
    with torch.no_grad():
        expected = hf.get_image_features(
            batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"]
        )
        vision = ours.vision(batch["pixel_values"])
        queries = ours.query_outputs(batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"])
        projected = ours.encode_images(
            batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"]
        )
    num_queries = ours.config.num_query_tokens
    assert_relative_close(vision, expected.vision_outputs.last_hidden_state)
    assert_relative_close(queries, expected.qformer_outputs.last_hidden_state[:, :num_queries])
    assert_relative_close(projected, expected.pooler_output)


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_logits_and_loss_match(kind, our_models, hf_models, images):
    ours, hf = our_models[kind], hf_models[kind]
    batch = ours.processor.training_batch(images, PROMPTS, ANSWERS)
    assert (batch["labels"] != -100).any()
    with torch.no_grad():
        expected = hf(**to_transformers_batch(ours, batch))
        actual = ours(**batch)
    assert_relative_close(actual.logits, expected.logits)
    assert actual.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)


@pytest.mark.parametrize("kind", LLM_KINDS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_ids_match(kind, num_beams, our_models, hf_models, images):
    """Batched, prompts of different lengths (left-padded for LLaMA), greedy and beam search."""
    ours, hf = our_models[kind], hf_models[kind]
    batch = _generation_batch(ours, images)
    assert batch["attention_mask"].min() == 0, "prompts of different lengths should be padded"
    tokenizer = ours.processor.tokenizer
    settings = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=2, repetition_penalty=1.3)
    with torch.no_grad():
        expected = hf.generate(
            **to_transformers_batch(ours, batch),
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=ours.processor.pad_token_id,
            length_penalty=1.0,
            **settings,
        )
        actual = ours.generate_ids(batch, **settings)
    if kind == "llama":  # transformers returns the prompt ([<image>]*Q + text) in front of the new tokens
        expected = expected[:, batch["input_ids"].shape[1] + ours.config.num_query_tokens :]
    else:  # and the decoder start token for T5
        expected = expected[:, 1:]
    assert actual.tolist() == expected.tolist()
    if num_beams == 1:  # the PIL-images-and-strings path gives the same tokens, decoded
        assert ours.generate(images, PROMPTS, **settings) == ours.processor.decode(actual)


def test_generation_defaults_are_lavis(our_models):
    kwargs = our_models["llama"].generation_kwargs()
    assert kwargs["num_beams"] == 5 and kwargs["max_new_tokens"] == 256 and kwargs["min_new_tokens"] == 1
    assert kwargs["repetition_penalty"] == 1.5 and kwargs["length_penalty"] == 1.0 and not kwargs["do_sample"]
    assert kwargs["eos_token_id"] == our_models["llama"].processor.tokenizer.eos_token_id
    sampling = our_models["llama"].generation_kwargs(do_sample=True, top_p=0.5)
    assert sampling["top_p"] == 0.5 and sampling["temperature"] == 1.0


def test_nucleus_sampling_is_seeded_and_varies(our_models, images):
    model = our_models["t5"]
    settings = dict(do_sample=True, top_p=0.9, temperature=1.5, max_new_tokens=5, num_beams=1)
    torch.manual_seed(1)
    first = model.generate(images, PROMPTS, **settings)
    torch.manual_seed(1)
    again = model.generate(images, PROMPTS, **settings)
    outputs = {tuple(first)}
    for seed in range(2, 4):
        torch.manual_seed(seed)
        outputs.add(tuple(model.generate(images, PROMPTS, **settings)))
    assert first == again
    assert len(outputs) > 1
