"""Released configurations on the meta device, dtype policy, and open_clip vision towers."""

from __future__ import annotations

import json

import pytest
import torch

from instructblip.errors import ConfigError
from instructblip.model.instructblip import InstructBlip
from instructblip.model.presets import get_preset
from instructblip.model.vision import VisionConfig, VisionEncoder

# The paper's "188M trainable parameters", per LLM (Q-Former incl. text branch, queries, ln_vision, projection).
PAPER_TRAINABLE_M = {
    "instructblip-vicuna7b": 188.8,
    "instructblip-vicuna13b": 189.6,
    "instructblip-flant5xl": 187.3,
    "instructblip-flant5xxl": 188.8,
}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(PAPER_TRAINABLE_M))
def test_released_presets_match_paper_parameter_counts(name):
    with torch.device("meta"):
        model = InstructBlip(get_preset(name))
    assert _trainable(model) / 1e6 == pytest.approx(PAPER_TRAINABLE_M[name], abs=0.05)
    assert len(model.vision.trunk.blocks) == 39 and model.vision.width == 1408
    assert sum(p.numel() for p in model.vision.trunk.parameters()) == pytest.approx(985.9e6, rel=1e-4)
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_unknown_preset_lists_the_names():
    with pytest.raises(ConfigError, match="instructblip-vicuna7b"):
        get_preset("instructblip-vicuna70b")


def test_unknown_llm_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="llamaish"):
        InstructBlip(get_preset("tiny-llama", llm={"model_type": "llamaish"}))


def test_dtype_policy_on_cpu_and_bf16():
    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-llama")).place("cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # auto = fp32 everywhere on CPU
    bf16 = InstructBlip(get_preset("tiny-llama", dtype_policy="bfloat16")).place("cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    output = bf16(
        pixel_values=torch.randn(1, 3, 28, 28),
        input_ids=torch.tensor([[2, 5, 6, 7, 2]]),
        qformer_input_ids=torch.tensor([[101, 2054, 102]]),
        labels=torch.tensor([[-100, -100, 6, 7, 2]]),
    )
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_policy_on_gpu_keeps_frozen_parts_bf16_and_trains_the_rest_fp32():
    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-t5")).place("cuda")
    assert model.vision.trunk.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.llm.dtype == torch.bfloat16
    assert model.query_tokens.dtype == model.qformer.layers[0].query_ffn.fc_in.weight.dtype == torch.float32
    assert model.vision.ln_vision.weight.dtype == model.projection.weight.dtype == torch.float32
    output = model(
        pixel_values=torch.randn(2, 3, 28, 28, device="cuda"),
        input_ids=torch.tensor([[5, 6, 1], [7, 1, 0]], device="cuda"),
        attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]], device="cuda"),
        qformer_input_ids=torch.tensor([[101, 2054, 102], [101, 102, 0]], device="cuda"),
        labels=torch.tensor([[8, 1], [9, 1]], device="cuda"),
    )
    output.loss.backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.dtype == torch.float32


@pytest.fixture
def tiny_open_clip_model(tmp_path):
    """A 3-block open_clip ViT registered under a test name (open_clip's own VisionTransformer class)."""
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 28, "layers": 3, "width": 24, "patch_size": 14, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-test-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-vit.json")
    return "tiny-test-vit"


def test_open_clip_tower_read_out_after_a_chosen_block(tiny_open_clip_model):
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(backbone=f"open_clip:{tiny_open_clip_model}", image_size=28, layers=-1))
    visual = encoder.trunk.trunk
    assert encoder.width == 24 and len(visual.transformer.resblocks) == 2  # "all but the last block"
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = visual.transformer(visual._embeds(pixels))
        features = encoder(pixels)
    assert features.shape == (2, 5, 24)  # class token + 2x2 patches, all tokens out
    torch.testing.assert_close(features, encoder.ln_vision(expected))

    tower = VisionConfig(backbone=f"open_clip:{tiny_open_clip_model}", image_size=28, layers=None)
    config = get_preset("tiny-t5", vision=tower)
    model = InstructBlip(config)
    assert model.qformer.layers[0].cross_attention.key.in_features == 24
    assert model.encode_images(pixels, torch.tensor([[101, 102]] * 2)).shape == (2, 4, 32)


def test_unknown_vision_backbone():
    with pytest.raises(ConfigError, match="open_clip:<model name>"):
        VisionEncoder(VisionConfig(backbone="resnet"))
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        VisionEncoder(VisionConfig(backbone="open_clip:no-such-model"))
