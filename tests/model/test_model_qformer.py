"""The Q-Former's modes, the instruction_aware=False ablation, and initialisation from a real BERT (MiniLM-L6)."""

from __future__ import annotations

import json

import pytest
import torch

from instructblip.model.instructblip import InstructBlip
from instructblip.model.presets import get_preset
from instructblip.model.qformer import QFormer, QFormerConfig, QFormerLMHead, load_bert_weights
from instructblip.testing import assert_relative_close, bert_model_dir

SMALL = QFormerConfig(
    hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, num_query_tokens=4, encoder_hidden_size=24,
    vocab_size=100, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
)


def _inputs(batch=2, text=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, SMALL.num_query_tokens, SMALL.hidden_size, generator=generator)
    ids = torch.randint(1, SMALL.vocab_size, (batch, text), generator=generator)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[1, 3:] = 0
    image = torch.randn(batch, 7, SMALL.encoder_hidden_size, generator=generator)
    return queries, ids, mask, image


def test_cross_attention_every_kth_layer():
    qformer = QFormer(SMALL)
    assert [layer.cross_attention is not None for layer in qformer.layers] == [True, False, True]


def test_instruction_changes_queries_and_padding_is_ignored():
    qformer = QFormer(SMALL).eval()
    queries, ids, mask, image = _inputs()
    num_queries = SMALL.num_query_tokens
    with torch.no_grad():
        out = qformer(queries, ids, mask, image)
        other = qformer(queries, ids.roll(1, dims=1), mask, image)
        # Tokens behind the padding mask must not matter.
        noisy_pad = ids.clone()
        noisy_pad[1, 3:] = 7
        padded = qformer(queries, noisy_pad, mask, image)
    assert out.shape == (2, num_queries + 5, SMALL.hidden_size)
    assert not torch.allclose(out[:, :num_queries], other[:, :num_queries])
    assert torch.allclose(out[1, :num_queries], padded[1, :num_queries], atol=1e-6)


def test_causal_text_mode_keeps_queries_text_blind():
    """Image-grounded generation: queries see only queries (and the image); text sees queries and earlier text."""
    qformer = QFormer(SMALL).eval()
    queries, ids, mask, image = _inputs()
    num_queries = SMALL.num_query_tokens
    with torch.no_grad():
        query_only = qformer(queries, image_embeds=image)
        causal = qformer(queries, ids, mask, image, causal_text=True)
        changed_tail = ids.clone()
        changed_tail[:, -1] = (changed_tail[:, -1] + 1) % SMALL.vocab_size
        causal_changed = qformer(queries, changed_tail, mask, image, causal_text=True)
        bidirectional = qformer(queries, ids, mask, image)
    assert_relative_close(causal[:, :num_queries], query_only)
    assert torch.allclose(causal[0, : num_queries + 4], causal_changed[0, : num_queries + 4], atol=1e-6)
    assert not torch.allclose(causal[0, -1], causal_changed[0, -1])
    assert not torch.allclose(causal[:, :num_queries], bidirectional[:, :num_queries])


@pytest.mark.parametrize("causal_text", [False, True])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_queries_only_skips_the_last_layers_text_rows_with_the_same_outputs_and_gradients(causal_text, checkpointed):
    """The last layer's text rows feed nothing when only the queries are used: skipping them changes no number."""
    qformer = QFormer(SMALL).eval()
    qformer.activation_checkpointing = checkpointed
    queries, ids, mask, image = _inputs()
    num_queries = SMALL.num_query_tokens
    readout = torch.randn(2, num_queries, SMALL.hidden_size, generator=torch.Generator().manual_seed(1))

    def run(queries_only: bool):
        qformer.zero_grad()
        leaf_queries = queries.clone().requires_grad_(True)
        out = qformer(leaf_queries, ids, mask, image, causal_text=causal_text, queries_only=queries_only)
        if not queries_only:
            assert out.shape[1] == num_queries + ids.shape[1]
            out = out[:, :num_queries]
        # a fixed random readout: the sum of squares of a LayerNorm output (the layer's last op) is constant
        out.mul(readout).sum().backward()
        grads = {name: p.grad.clone() for name, p in qformer.named_parameters() if p.grad is not None}
        return out.detach(), leaf_queries.grad, grads

    full, full_query_grad, full_grads = run(False)
    pruned, pruned_query_grad, pruned_grads = run(True)
    assert pruned.shape == (2, num_queries, SMALL.hidden_size)
    assert_relative_close(pruned, full)
    assert_relative_close(pruned_query_grad, full_query_grad)
    # The last layer's text FFN got no gradient (it did not run) and had none to get: its output was discarded.
    last_text_ffn = {n for n in full_grads if n.startswith(f"layers.{SMALL.num_layers - 1}.text_ffn.")}
    assert last_text_ffn and all(full_grads[n].abs().max() == 0 for n in last_text_ffn)
    assert set(full_grads) - set(pruned_grads) == last_text_ffn
    scale = max(g.abs().max().item() for g in full_grads.values())
    for name, grad in pruned_grads.items():  # some are zero in exact arithmetic (key biases): absolute floor
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_queries_only_needs_queries():
    qformer = QFormer(SMALL)
    _, ids, mask, _ = _inputs()
    with pytest.raises(ValueError, match="queries_only"):
        qformer(input_ids=ids, attention_mask=mask, queries_only=True)


def test_text_only_mode_matches_transformers_bert():
    """Text-only (image-text contrastive features) with MiniLM-L6 weights = transformers' BertModel."""
    from safetensors.torch import load_file
    from transformers import BertModel

    bert_dir = bert_model_dir()
    bert_config = json.loads((bert_dir / "config.json").read_text())
    config = QFormerConfig.from_bert_config(bert_config, encoder_hidden_size=24)
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (384, 6, 30523)
    state = load_file(str(bert_dir / "model.safetensors"))
    qformer = QFormer(config).eval()
    head = QFormerLMHead(config)
    not_from_bert = load_bert_weights(qformer, state, lm_head=head)
    assert not_from_bert and all(".cross_attention." in name for name in not_from_bert)
    layer = qformer.layers[0]
    assert torch.equal(layer.query_ffn.fc_in.weight, layer.text_ffn.fc_in.weight)  # LAVIS copies text -> query FFN
    # BERT adds token-type embedding 0 everywhere; the Q-Former has none, so fold it into the positions here.
    with torch.no_grad():
        qformer.embeddings.position_embeddings.weight += state["embeddings.token_type_embeddings.weight"][0]

    bert = BertModel.from_pretrained(bert_dir, attn_implementation="eager").eval()
    ids = torch.tensor([[101, 1037, 2417, 2675, 102, 0], [101, 2054, 2003, 2023, 1029, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = qformer(input_ids=ids, attention_mask=mask)
        logits = head(actual)
    assert_relative_close(actual[mask.bool()], expected[mask.bool()])
    assert logits.shape == (2, 6, 30523)


def test_bert_size_mismatch_is_a_checkpoint_error():
    from safetensors.torch import load_file

    from instructblip.errors import CheckpointError

    state = load_file(str(bert_model_dir() / "model.safetensors"))
    with pytest.raises(CheckpointError, match="from_bert_config"):
        load_bert_weights(QFormer(SMALL), state)


def test_without_instruction_has_no_text_branch_and_trains():
    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-t5", instruction_aware=False)).train()
    full = InstructBlip(get_preset("tiny-t5"))
    names = {name for name, _ in model.named_parameters()}
    assert not any(".text_ffn." in n or "word_embeddings" in n or "position_embeddings" in n for n in names)
    assert any(".text_ffn." in n for n, _ in full.named_parameters())

    pixels = torch.randn(2, 3, 28, 28)
    output = model(
        pixel_values=pixels,
        input_ids=torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        qformer_input_ids=torch.tensor([[101, 2054, 102], [101, 102, 0]]),  # ignored: no text branch
        labels=torch.tensor([[10, 11, 1], [12, 1, -100]]),
    )
    output.loss.backward()
    assert model.query_tokens.grad.abs().sum() > 0
    assert model.qformer.layers[0].cross_attention.key.weight.grad.abs().sum() > 0
    assert model.vision.ln_vision.weight.grad is not None
    assert all(p.grad is None for p in model.vision.trunk.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert not model.vision.trunk.training  # the frozen encoder stays in eval mode


def test_cross_attention_init_stds_draw_only_the_fresh_cross_attention():
    torch.manual_seed(0)
    wide = QFormer(QFormerConfig(**{**SMALL.__dict__, "hidden_size": 64, "encoder_hidden_size": 64,
                                    "cross_attention_init_std": 0.5, "cross_attention_value_init_std": 0.1}))
    torch.manual_seed(0)
    plain = QFormer(QFormerConfig(**{**SMALL.__dict__, "hidden_size": 64, "encoder_hidden_size": 64}))
    for wide_layer, plain_layer in zip(wide.layers, plain.layers):
        if wide_layer.cross_attention is None:
            continue
        for name in ("query", "key"):
            assert getattr(wide_layer.cross_attention, name).weight.std().item() == pytest.approx(0.5, rel=0.1)
            assert getattr(plain_layer.cross_attention, name).weight.std().item() == pytest.approx(0.02, rel=0.1)
        for name in ("value", "out_proj"):
            assert getattr(wide_layer.cross_attention, name).weight.std().item() == pytest.approx(0.1, rel=0.1)
            assert getattr(plain_layer.cross_attention, name).weight.std().item() == pytest.approx(0.02, rel=0.1)
        # everything else keeps initializer_range
        assert wide_layer.self_attention.query.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert wide_layer.query_ffn.fc_in.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_redrawing_one_pair_leaves_the_other_as_it_was():
    torch.manual_seed(0)
    qformer = QFormer(QFormerConfig(**{**SMALL.__dict__, "hidden_size": 64, "encoder_hidden_size": 64}))
    before = {k: v.clone() for k, v in qformer.state_dict().items()}
    qformer.draw_cross_attention(None, 0.3)
    changed = {k for k, v in qformer.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".cross_attention.value." in k or ".cross_attention.out_proj." in k for k in changed)
