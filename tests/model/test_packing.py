"""Sequence packing (``model.pack_sequences``) gives the padded path's results: per-sample losses, the mean loss and
the gradients of the trainable parameters, on a batch of very different lengths (tiny LLaMA and T5 checkpoints,
float32, sdpa and eager attention). Plus the packed layouts themselves."""

from __future__ import annotations

import pytest
import torch

from instructblip.model import packing
from instructblip.model.instructblip import InstructBlip

from conftest import PROMPTS  # noqa: E402  (tests/model/conftest.py)

INSTRUCTIONS = [*PROMPTS, "describe the scene", PROMPTS[0] + " and which shape is the largest one here", "is it"]
ANSWERS = ["a red square on the left", "three", "a small blue circle above a green triangle and a word", "no", "yes"]


@pytest.fixture(scope="module")
def batches(our_models, images):
    out = {}
    for kind, model in our_models.items():
        batch = model.processor.training_batch([images[i % 2] for i in range(5)], INSTRUCTIONS, ANSWERS)
        # the packed rows of this batch: some row must hold several samples, or nothing is tested
        visual = torch.ones(5, model.config.num_query_tokens, dtype=torch.long)
        mask = torch.cat([visual, batch["attention_mask"]], dim=1)
        if kind == "t5":
            rows = packing.pack_seq2seq(torch.zeros(*mask.shape, 1), mask, batch["labels"].clamp_min(0),
                                        batch["labels"], batch["decoder_attention_mask"])
        else:
            rows = packing.pack(torch.zeros(*mask.shape, 1), mask, torch.zeros_like(mask))
        assert rows.sample_index.shape[0] < 5
        out[kind] = batch
    return out


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


@pytest.mark.parametrize("llm", ["llama", "t5"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_padded(attention, llm, our_models, batches):
    model, batch = our_models[llm], batches[llm]
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
    # T5's masked attention sums in another order than the padded rows' (gradients up to 0.35, differences up to
    # 2e-7 on this batch)
    atol = 1e-6 if llm == "t5" else 1e-7
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=atol, msg=name)


def _packed_then_leaked(model, batch, monkeypatch, name, leaky):
    """Per-sample losses of the packed forward, then of the same with ``packing.<name>`` replaced by ``leaky``."""
    with torch.no_grad():
        model.config.pack_sequences = True
        try:
            packed = model(**batch, return_logits=False)
            with monkeypatch.context() as patch:
                patch.setattr(packing, name, leaky)
                leaked = model(**batch, return_logits=False)
        finally:
            model.config.pack_sequences = False
    return packed.per_sample_loss, leaked.per_sample_loss


def test_packing_keeps_samples_apart(our_models, batches, monkeypatch):
    """Without the sample boundaries (one position run over the whole row) the losses change: the test above
    would catch attention leaking across samples."""
    original = packing.pack

    def leaky(*args, **kwargs):
        rows = original(*args, **kwargs)
        running = torch.arange(rows.position_ids.shape[1]).expand_as(rows.position_ids)
        return packing.PackedRows(rows.inputs_embeds, running, rows.targets, rows.sample_index)

    packed, leaked = _packed_then_leaked(our_models["llama"], batches["llama"], monkeypatch, "pack", leaky)
    assert not torch.allclose(packed, leaked, rtol=1e-3)


@pytest.mark.parametrize("leak", ["encoder_mask", "decoder_mask", "cross_mask"])
def test_seq2seq_packing_keeps_samples_apart(leak, our_models, batches, monkeypatch):
    """With any one of the three masks letting every position see the whole row, the losses change."""
    original = packing.pack_seq2seq

    def leaky(*args, **kwargs):
        rows = original(*args, **kwargs)
        setattr(rows, leak, torch.zeros_like(getattr(rows, leak)))
        return rows

    packed, leaked = _packed_then_leaked(our_models["t5"], batches["t5"], monkeypatch, "pack_seq2seq", leaky)
    assert not torch.allclose(packed, leaked, rtol=1e-3)


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


def test_seq2seq_row_layout_takes_the_fewest_positions():
    # encoder lengths 3, 1, 2 and decoder lengths 1, 2, 1: rows of 3 + 2 (the longest samples) need three rows, 15
    # positions; rows of 6 + 4 hold all three samples, 10 positions: no padding at all
    assert packing.seq2seq_row_layout([3, 1, 2], [1, 2, 1]) == ([[0, 1, 2]], 6, 4)
    # seven samples, encoder 2, 1, 1, 1, 1, 1, 1, decoder 1 each: rows of 2 + 2 (four rows, 16 positions) tie with
    # rows of 4 + 4 (two rows) and win as the shorter rows; rows of 2 + 1 would take 21 positions
    assert packing.seq2seq_row_layout([2, 1, 1, 1, 1, 1, 1], [1] * 7) == ([[0], [1, 2], [3, 4], [5, 6]], 2, 2)
    # one long answer beside short ones (a conversation in a VQA batch): padded, 4 x 4 + 4 x 16 = 80 positions; in
    # one row of 16 + 22 the 38 the samples hold
    assert packing.seq2seq_row_layout([4, 4, 4, 4], [16, 2, 2, 2]) == ([[0, 1, 2, 3]], 16, 22)


def test_pack_first_fit_pairs_fits_both_sides():
    from instructblip.data.length_grouping import pack_first_fit_pairs

    # by the two lengths together, decreasing: sample 0 (3 + 1), then 1 and 2 (3 each, in index order on the tie)
    assert pack_first_fit_pairs([3, 1, 2], [1, 2, 1], 3, 2) == [[0], [1], [2]]
    assert pack_first_fit_pairs([3, 1, 2], [1, 2, 1], 3, 4) == [[0], [1, 2]]
    assert pack_first_fit_pairs([3, 1, 2], [1, 2, 1], 6, 2) == [[0, 2], [1]]


def test_pack_seq2seq_layout():
    # three samples: encoder lengths 3, 1, 2 (padded to 3), decoder lengths 1, 2, 1 (padded to 2): one row of 6 + 4
    embeds = torch.arange(9, dtype=torch.float32).reshape(3, 3, 1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    decoder_ids = torch.tensor([[0, 5], [0, 11], [0, 7]])
    labels = torch.tensor([[5, -100], [11, 12], [7, -100]])
    rows = packing.pack_seq2seq(embeds, mask, decoder_ids, labels)
    assert rows.inputs_embeds[..., 0].tolist() == [[0, 1, 2, 3, 6, 7]]
    assert rows.decoder_input_ids.tolist() == [[0, 0, 11, 0]]
    assert rows.labels.tolist() == [[5, 11, 12, 7]]
    assert rows.sample_index.tolist() == [[0, 1, 1, 2]]
    encoder, decoder, cross = [(m[0, 0] == 0).int().tolist()
                               for m in (rows.encoder_mask, rows.decoder_mask, rows.cross_mask)]
    assert encoder == [[1, 1, 1, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 0, 0]] + [[0, 0, 0, 0, 1, 1]] * 2
    assert decoder == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
    assert cross == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    assert rows.encoder_mask.min() == torch.finfo(torch.float32).min   # additive: transformers' eager T5 adds it


def test_seq2seq_masks_leave_free_positions_to_themselves():
    # one row: encoder positions of samples 0, 0, 1 and a free one; decoder positions of samples 0, 1 and a free one
    encoder, decoder, cross = packing.seq2seq_masks(torch.tensor([[0, 0, 1, -1]]), torch.tensor([[0, 1, -1]]),
                                                    torch.float32)
    assert (encoder[0, 0] == 0).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert (decoder[0, 0] == 0).int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # a free decoder position sees the whole encoder row (no query may see nothing); no sample sees a free position
    assert (cross[0, 0] == 0).int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]]


def test_pack_seq2seq_needs_right_padding():
    with pytest.raises(ValueError, match="decoder_attention_mask must be ones followed by zeros"):
        packing.pack_seq2seq(torch.zeros(1, 2, 1), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long),
                             torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_t5_on_a_gpu_with_the_frozen_llm_in_bf16(tiny_dirs, batches):
    """On a GPU the frozen T5 runs in bf16 (``dtype_policy=auto``): the masks take its dtype's lowest value, and the
    packed per-sample losses follow the padded ones to bf16's precision."""
    model = InstructBlip.from_pretrained(tiny_dirs["t5"]).place("cuda").eval()
    assert model.llm.dtype == torch.bfloat16
    batch = {key: value.cuda() for key, value in batches["t5"].items()}
    losses = {}
    with torch.no_grad():
        for pack in (False, True):
            model.config.pack_sequences = pack
            losses[pack] = model(**batch, return_logits=False).per_sample_loss.float()
    model.config.pack_sequences = False
    assert torch.isfinite(losses[True]).all()
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=1e-2)
