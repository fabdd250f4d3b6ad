"""Export to the Hugging Face layout, reload, and one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from instructblip.errors import CheckpointError
from instructblip.model.instructblip import InstructBlip
from instructblip.testing import assert_relative_close, to_transformers_batch

from conftest import LLM_KINDS, PROMPTS  # noqa: E402

ANSWERS = ["a red square", "three"]


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_export_round_trip_through_transformers(kind, tiny_dirs, images, tmp_path):
    """ours -> save_pretrained -> transformers loads it -> same logits; and ours reloads it bit for bit."""
    from transformers import InstructBlipForConditionalGeneration

    trained = InstructBlip.from_pretrained(tiny_dirs[kind])
    # Change weights so that the export cannot pass by handing back the files it was loaded from.
    with torch.no_grad():
        trained.query_tokens.add_(0.3)
        trained.projection.bias.add_(0.1)
        trained.qformer.layers[0].cross_attention.value.weight.mul_(1.5)
        trained.vision.trunk.blocks[0].attn.q_bias.add_(0.2)
    out_dir = tmp_path / "exported"
    trained.save_pretrained(out_dir, max_shard_size=40_000)  # tiny shards: exercises the sharded layout
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert (out_dir / "qformer_tokenizer").is_dir()

    batch = trained.processor.training_batch(images, PROMPTS, ANSWERS)
    hf = InstructBlipForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
    reloaded = InstructBlip.from_pretrained(out_dir)
    with torch.no_grad():
        expected = trained(**batch)
        from_transformers = hf(**to_transformers_batch(trained, batch))
        from_ours = reloaded(**batch)
    assert_relative_close(from_transformers.logits, expected.logits)
    assert from_transformers.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert torch.equal(from_ours.logits, expected.logits)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_state_dict_names_are_readable(our_models):
    names = set(our_models["llama"].state_dict())
    assert "vision.trunk.blocks.0.attn.q_bias" in names
    assert "vision.ln_vision.weight" in names
    assert "qformer.layers.0.cross_attention.key.weight" in names
    assert "qformer.layers.1.cross_attention.key.weight" not in names  # cross-attention every 2nd layer only
    assert "qformer.layers.1.text_ffn.fc_in.weight" in names and "qformer.layers.1.query_ffn.fc_in.weight" in names
    assert "llm.hf_model.lm_head.weight" in names and "projection.weight" in names


def _copy(tiny_dirs, kind, tmp_path):
    target = tmp_path / kind
    shutil.copytree(tiny_dirs[kind], target)
    return target


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        InstructBlip.from_pretrained(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_missing_checkpoint(tmp_path):
    assert str(tmp_path / "nowhere") in _one_line_error(tmp_path / "nowhere")


def test_missing_weights_and_config(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs, "llama", tmp_path)
    (path / "model.safetensors").unlink()
    assert "model.safetensors" in _one_line_error(path)
    (path / "config.json").unlink()
    assert "config.json" in _one_line_error(path)


def test_unknown_architecture(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs, "llama", tmp_path)
    _edit_config(path, lambda c: c["text_config"].update(model_type="llamaish"))
    message = _one_line_error(path)
    assert "llamaish" in message and "model_type" in message


def test_vocab_size_mismatch(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs, "t5", tmp_path)
    _edit_config(path, lambda c: c["text_config"].update(vocab_size=1000))
    message = _one_line_error(path)
    assert "vocab_size=1000" in message and "448" in message


def test_tokenizer_larger_than_embeddings(tiny_dirs, tmp_path):
    from transformers import AutoTokenizer

    path = _copy(tiny_dirs, "llama", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(60)])  # 402 + 60 > 448 rows
    tokenizer.save_pretrained(path)
    assert "LLM tokenizer has 462 tokens" in _one_line_error(path)


def test_unexpected_file_kind(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    assert "directory" in _one_line_error(path)


def test_export_adds_an_image_token_row_when_the_vocabulary_lacks_one(tiny_dirs, images, tmp_path):
    """A model whose LLM vocabulary ends before <image> (trained with a tokenizer that never had it) still exports
    to a layout transformers runs: the exported embeddings grow, the logits over the old rows stay the same."""
    from dataclasses import replace

    from transformers import InstructBlipForConditionalGeneration

    model = InstructBlip.from_pretrained(tiny_dirs["llama"])
    model.llm.hf_model.resize_token_embeddings(401)  # rows for the 400 words + [PAD]; <image> is id 401
    model.config = replace(model.config, image_token_id=None)
    model.save_pretrained(tmp_path / "grown")
    hf = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "grown", attn_implementation="eager").eval()
    assert hf.config.image_token_index == 401 and hf.config.text_config.vocab_size == 448
    reloaded = InstructBlip.from_pretrained(tmp_path / "grown")
    assert reloaded.config.image_token_id == 401
    batch = model.processor.generation_batch(images, PROMPTS)
    with torch.no_grad():
        expected = model(**batch).logits
        actual = hf(**to_transformers_batch(reloaded, batch)).logits[..., :401]
        assert_relative_close(reloaded(**batch).logits[..., :401], expected)
    assert_relative_close(actual, expected)


def test_hub_vicuna_config_reads_with_transformers_defaults():
    """The released config.json lists only what differs from the defaults (vision: just model_type)."""
    from instructblip.checkpoint.hf import config_from_hf

    hub = {
        "architectures": ["InstructBlipForConditionalGeneration"],
        "image_token_index": 32001,
        "num_query_tokens": 32,
        "model_type": "instructblip",
        "qformer_config": {"model_type": "instructblip_qformer", "vocab_size": 30523},
        "vision_config": {"model_type": "instructblip_vision_model"},
        "text_config": {
            "architectures": ["LLaMAForCausalLM"], "model_type": "llama", "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "rms_norm_eps": 1e-6, "vocab_size": 32064, "tie_word_embeddings": False,
        },
    }
    config = config_from_hf(hub)
    vision, qformer = config.vision, config.qformer
    assert (vision.width, vision.layers, vision.heads, vision.mlp_dim, vision.image_size) == (1408, 39, 16, 6144, 224)
    assert vision.layer_norm_eps == vision.ln_vision_eps == 1e-6
    assert (qformer.hidden_size, qformer.num_layers, qformer.cross_attention_frequency) == (768, 12, 2)
    assert qformer.vocab_size == 30523 and qformer.encoder_hidden_size == 1408 and qformer.layer_norm_eps == 1e-12
    assert config.llm["vocab_size"] == 32064 and config.llm["pad_token_id"] == 32000
    assert config.image_token_id == 32001 and config.num_query_tokens == 32
