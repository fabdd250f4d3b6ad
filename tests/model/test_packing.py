"""Sequence packing (``model.pack_sequences``) gives the padded path's results: per-sample losses, the mean loss and
the gradients of the trainable parameters, on a batch of very different lengths (tiny LLaMA checkpoint, float32,
sdpa and eager attention). Plus the packed layout itself, and the T5 refusal."""

from __future__ import annotations

import pytest
import torch

from instructblip.errors import ConfigError
from instructblip.model import packing
from instructblip.model.instructblip import InstructBlip

from conftest import PROMPTS  # noqa: E402  (tests/model/conftest.py)

INSTRUCTIONS = [*PROMPTS, "describe the scene", PROMPTS[0] + " and which shape is the largest one here", "is it"]
ANSWERS = ["a red square on the left", "three", "a small blue circle above a green triangle and a word", "no", "yes"]


@pytest.fixture(scope="module")
def batch(our_models, images):
    model = our_models["llama"]
    batch = model.processor.training_batch([images[i % 2] for i in range(5)], INSTRUCTIONS, ANSWERS)
    # the packed rows of this batch: some row must hold several samples, or nothing is tested
    visual = torch.ones(5, model.config.num_query_tokens, dtype=torch.long)
    mask = torch.cat([visual, batch["attention_mask"]], dim=1)
    rows = packing.pack(torch.zeros(*mask.shape, 1), mask, torch.zeros_like(mask))
    assert rows.sample_index.shape[0] < 5
    return batch


def _loss_and_grads(model: InstructBlip, batch: dict, pack: bool):
    model.config.pack_sequences = pack
    try:
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=False)
        out.loss.backward()
        unused = set(model.unused_parameter_names())  # no gradient: the last Q-Former text branch never runs
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and n not in unused}
    finally:
        model.config.pack_sequences = False
        model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_padded(attention, our_models, batch):
    model = our_models["llama"]
    previous = model.llm.hf_model.config._attn_implementation
    model.llm.hf_model.set_attn_implementation(attention)
    try:
        padded, padded_grads = _loss_and_grads(model, batch, pack=False)
        packed, packed_grads = _loss_and_grads(model, batch, pack=True)
    finally:
        model.llm.hf_model.set_attn_implementation(previous)
    torch.testing.assert_close(packed.per_sample_loss, padded.per_sample_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == packed_grads.keys()
    assert padded_grads["projection.weight"].abs().sum() > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_packing_keeps_samples_apart(our_models, batch):
    """Without the sample boundaries (one position run over the whole row) the losses change: the test above
    would catch attention leaking across samples."""
    model = our_models["llama"]
    with torch.no_grad():
        model.config.pack_sequences = True
        try:
            packed = model(**batch, return_logits=False)
            original = packing.pack

            def leaky(*args, **kwargs):
                rows = original(*args, **kwargs)
                running = torch.arange(rows.position_ids.shape[1]).expand_as(rows.position_ids)
                return packing.PackedRows(rows.inputs_embeds, running, rows.targets, rows.sample_index)

            packing.pack = leaky
            try:
                leaked = model(**batch, return_logits=False)
            finally:
                packing.pack = original
        finally:
            model.config.pack_sequences = False
    assert not torch.allclose(packed.per_sample_loss, leaked.per_sample_loss, rtol=1e-3)


def test_pack_layout():
    # three samples of 4, 2 and 1 positions, padded to 5; targets = 10 * sample + position
    embeds = torch.arange(15, dtype=torch.float32).reshape(3, 5, 1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    targets = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    rows = packing.pack(embeds, mask, targets)
    # rows as long as the longest sample (4): [sample 0], [sample 1, sample 2, free]
    assert rows.inputs_embeds.shape == (2, 4, 1)
    assert rows.inputs_embeds[..., 0].tolist() == [[0, 1, 2, 3], [5, 6, 10, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert rows.sample_index.tolist() == [[0, 0, 0, 0], [1, 1, 2, -1]]
    # each sample's last position predicts nothing (its next position is another sample's)
    assert rows.targets.tolist() == [[0, 1, 2, -100], [10, -100, -100, -100]]

    one = packing.pack(embeds, mask, targets, one_row=True)
    assert one.inputs_embeds[..., 0].tolist() == [[0, 1, 2, 3, 5, 6, 10]]
    assert one.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0]]


def test_pack_needs_right_padding():
    embeds = torch.zeros(2, 3, 1)
    with pytest.raises(ValueError, match="right-padded"):
        packing.pack(embeds, torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.zeros(2, 3, dtype=torch.long))


def test_packing_refused_for_t5(tiny_dirs):
    with pytest.raises(ConfigError, match="pack_sequences=true needs a decoder-only LLM"):
        InstructBlip.from_pretrained(tiny_dirs["t5"], pack_sequences=True)
