"""LAVIS checkpoints: the key mapping both ways, and a LAVIS-layout checkpoint giving transformers' logits."""

from __future__ import annotations

import pytest
import torch
from transformers import InstructBlipForConditionalGeneration

from instructblip.checkpoint import lavis
from instructblip.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    return lavis.load_hf(tiny_llama_dir)


def test_mapping_names_and_fused_bias(hf_llama):
    hf = hf_llama.state_dict
    mapped = lavis.hf_to_lavis(hf, "decoder_only")
    # names from the reference table (LAVIS side)
    for name in (
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.1.attn.q_bias",
        "visual_encoder.blocks.1.attn.proj.weight",
        "ln_vision.weight",
        "Qformer.bert.embeddings.LayerNorm.weight",
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
        "llm_proj.weight",
        "llm_model.model.embed_tokens.weight",
        "query_tokens",
    ):
        assert name in mapped, name
    assert not any("qkv.bias" in key for key in mapped)
    bias = hf["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    width = bias.shape[0] // 3
    assert torch.equal(mapped["visual_encoder.blocks.1.attn.q_bias"], bias[:width])
    assert torch.equal(mapped["visual_encoder.blocks.1.attn.v_bias"], bias[2 * width :])
    assert torch.equal(mapped["ln_vision.bias"], hf["vision_model.post_layernorm.bias"])

    back = lavis.lavis_to_hf(mapped)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[key], hf[key]) for key in hf)

    t5_names = lavis.hf_to_lavis({"language_projection.bias": bias, "language_model.shared.weight": bias}, "encoder_decoder")
    assert set(t5_names) == {"t5_proj.bias", "t5_model.shared.weight"}


def test_mapping_rejects_what_it_cannot_place(hf_llama):
    with pytest.raises(CheckpointError, match="Qformer.cls.predictions.bias"):
        lavis.lavis_to_hf({"Qformer.cls.predictions.bias": torch.zeros(2), "query_tokens": torch.zeros(1)})
    state = dict(hf_llama.state_dict)
    state["vision_model.encoder.layers.0.self_attn.qkv.bias"] = torch.ones_like(
        state["vision_model.encoder.layers.0.self_attn.qkv.bias"]
    )
    with pytest.raises(CheckpointError, match="k third of the fused bias is not zero"):
        lavis.hf_to_lavis(state, "decoder_only")
    with pytest.raises(ConfigError, match="allowed: instructblip-vicuna7b"):
        lavis.resolve_preset("instructblip-opt2.7b")
    assert lavis.resolve_preset("Salesforce/instructblip-flan-t5-xl") == "instructblip-flant5xl"
    assert lavis.resolve_preset("instructblip_vicuna13b") == lavis.resolve_preset("vicuna13b") == "instructblip-vicuna13b"


def _eva_g_style(vision: dict[str, torch.Tensor], num_layers: int, prefix: str) -> dict[str, torch.Tensor]:
    """The tower as EVA-CLIP ships it: one block more than InstructBLIP runs, a final norm and a head."""
    extra = {
        key.replace(f"blocks.{num_layers - 1}.", f"blocks.{num_layers}."): value
        for key, value in vision.items()
        if key.startswith(f"blocks.{num_layers - 1}.")
    }
    width = vision["cls_token"].shape[-1]
    extra.update({"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width), "head.weight": torch.zeros(5, width)})
    return {prefix + key: value for key, value in {**vision, **extra}.items()}


@pytest.mark.parametrize("vision_prefix", ["", "visual.trunk."])  # eva_vit_g.pth, open_clip EVA01-g-14
def test_lavis_layout_loads_and_gives_transformers_logits(tiny_llama_dir, hf_llama, tmp_path, vision_prefix):
    parts = lavis.save_lavis(hf_llama, tmp_path / "lavis")
    trimmed = torch.load(parts["model"], weights_only=True)["model"]
    assert all(lavis.is_trainable_lavis_key(key) for key in trimmed)
    assert {"query_tokens", "ln_vision.weight", "llm_proj.weight"} <= set(trimmed)
    layers = hf_llama.config.vision_config.num_hidden_layers
    vision = torch.load(parts["vision"], weights_only=True)
    torch.save(_eva_g_style(vision, layers, vision_prefix), parts["vision"])

    loaded = lavis.load_lavis(
        parts["model"], parts["vision"], parts["llm"], config=tiny_llama_dir / "config.json", ln_vision_eps=1e-6
    )
    assert loaded.state_dict.keys() == hf_llama.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], hf_llama.state_dict[k]) for k in loaded.state_dict)

    reference = InstructBlipForConditionalGeneration.from_pretrained(tiny_llama_dir).eval()
    ours = lavis.hf_model(loaded)
    image_id = reference.config.image_token_index
    assert ours.config.image_token_index == image_id
    torch.manual_seed(0)
    size = hf_llama.config.vision_config.image_size
    queries = hf_llama.config.num_query_tokens
    batch = {
        "pixel_values": torch.randn(2, 3, size, size),
        "qformer_input_ids": torch.tensor([[101, 2054, 2003, 102], [101, 2129, 102, 0]]),
        "qformer_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "input_ids": torch.tensor([[image_id] * queries + [2, 50, 60, 70], [image_id] * queries + [2, 80, 90, 100]]),
    }
    with torch.no_grad():
        expected = reference(**batch).logits
        got = ours(**batch).logits
    assert torch.equal(got, expected)


def test_ln_vision_eps_defaults_to_lavis(tiny_llama_dir, hf_llama, tmp_path):
    parts = lavis.save_lavis(hf_llama, tmp_path / "lavis")
    loaded = lavis.load_lavis(parts["model"], parts["vision"], parts["llm"], config=tiny_llama_dir / "config.json")
    assert loaded.ln_vision_eps == 1e-5


def test_load_lavis_errors_name_the_problem(tiny_llama_dir, hf_llama, tmp_path):
    parts = lavis.save_lavis(hf_llama, tmp_path / "lavis")
    with pytest.raises(ConfigError, match="needs model="):
        lavis.load_lavis(parts["model"], parts["vision"], parts["llm"])
    with pytest.raises(ConfigError, match="needs a encoder-decoder LLM"):
        lavis.load_lavis(parts["model"], parts["vision"], parts["llm"], model="instructblip-flant5xl")
    with pytest.raises(CheckpointError, match="does not exist"):
        lavis.load_lavis(tmp_path / "nope.pth", parts["vision"], parts["llm"], config=tiny_llama_dir / "config.json")
    # the released vicuna7b geometry does not fit the tiny tensors: the shape error names the tensor
    with pytest.raises(CheckpointError, match=r"has shape .* the configuration needs"):
        lavis.load_lavis(parts["model"], parts["vision"], parts["llm"], model="instructblip-vicuna7b")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read LAVIS checkpoint"):
        lavis.load_lavis(tmp_path / "garbage.pth", parts["vision"], parts["llm"], config=tiny_llama_dir / "config.json")


def test_full_size_released_key_set_maps_both_ways():
    """The released vicuna-7b / flan-t5-xl geometry, on the meta device: every HF tensor has a LAVIS name and back,
    and the trimmed part is LAVIS's trainable set (query tokens, ln_vision, Q-Former, projection)."""
    from transformers import InstructBlipConfig, LlamaConfig, T5Config

    for text_config, kind, projection in (
        (LlamaConfig(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32), "decoder_only", "llm_proj"),
        (T5Config(vocab_size=32128, d_model=2048, d_ff=5120, num_layers=24, num_heads=32, tie_word_embeddings=False), "encoder_decoder", "t5_proj"),
    ):
        config = InstructBlipConfig(text_config=text_config.to_dict(), qformer_config={"vocab_size": 30523})
        with torch.device("meta"):
            state = InstructBlipForConditionalGeneration(config).state_dict()
        mapped = lavis.hf_to_lavis(state, kind)
        trimmed = [k for k in mapped if lavis.is_trainable_lavis_key(k)]
        qformer_keys = [k for k in trimmed if k.startswith("Qformer.bert.")]
        assert len(qformer_keys) == 328  # 6 x 32 (cross-attention layers) + 6 x 22 + 4 embeddings
        assert {k for k in trimmed if not k.startswith("Qformer.bert.")} == {
            "query_tokens", "ln_vision.weight", "ln_vision.bias", f"{projection}.weight", f"{projection}.bias"
        }
        assert sum(1 for k in mapped if k.endswith("attn.q_bias")) == 39
        back = lavis.lavis_to_hf(mapped)
        assert back.keys() == state.keys()
        trainable = sum(mapped[k].numel() for k in trimmed)
        assert 187e6 < trainable < 189e6  # the paper's "188M trainable parameters"


def test_instructblip_from_lavis_pth_matches_hf_directory(tiny_llama_dir, hf_llama, tmp_path):
    from instructblip.model.instructblip import InstructBlip

    parts = lavis.save_lavis(hf_llama, tmp_path / "lavis")
    common = dict(vision=parts["vision"], llm=parts["llm"], config=tiny_llama_dir / "config.json")
    from_lavis = InstructBlip.from_pretrained(parts["model"], ln_vision_eps=1e-6, **common)
    from_hf = InstructBlip.from_pretrained(tiny_llama_dir)
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 90))
    batch = from_hf.processor.training_batch([image], ["what colour is it?"], ["magenta"])
    with torch.no_grad():
        assert torch.equal(from_lavis(**batch).logits, from_hf(**batch).logits)
    assert from_lavis.vision.ln_vision.eps == 1e-6
    assert InstructBlip.from_pretrained(parts["model"], **common).vision.ln_vision.eps == 1e-5  # LAVIS's own
