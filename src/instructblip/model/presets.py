"""Named configurations: the four released InstructBLIP models, the BLIP-2 ones they start from, tiny test sizes.

All released models share the EVA ViT-g/14 (39 of 40 blocks, 224 px) and the BERT-base Q-Former with 32 queries
and cross-attention every 2nd layer; they differ in the LLM. BLIP-2 models have the same vision and Q-Former but
no instruction input (``instruction_aware=False``: no text branch in the Q-Former). LLM token ids follow the
released tokenizers (Vicuna: ``[PAD]`` 32000, ``<image>`` 32001, vocabulary padded to 32064; FlanT5: ``<image>``
32100 inside the 32128 rows).

``get_preset(name, **overrides)`` returns an ``InstructBlipConfig``; ``InstructBlip(get_preset(name))`` built under
``torch.device("meta")`` costs no memory (its trainable parameter counts are checked against the paper's ~188M).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from instructblip.errors import ConfigError
from instructblip.model.instructblip import InstructBlipConfig
from instructblip.model.qformer import QFormerConfig
from instructblip.model.vision import VisionConfig


def _vicuna(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
    )


def _flant5(d_model: int, d_ff: int, heads: int) -> dict:
    return dict(
        model_type="t5",
        vocab_size=32128,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=64,
        num_heads=heads,
        num_layers=24,
        num_decoder_layers=24,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",  # LAVIS and the HF conversion use exact GELU instead of FlanT5's gelu_new
        is_gated_act=True,
        layer_norm_epsilon=1e-6,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _opt(hidden: int, ffn: int, layers: int, heads: int) -> dict:
    return dict(
        model_type="opt",
        vocab_size=50272,
        hidden_size=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        bos_token_id=2,
        eos_token_id=50118,
        pad_token_id=1,
    )


VICUNA_7B = _vicuna(4096, 11008, 32, 32)
VICUNA_13B = _vicuna(5120, 13824, 40, 40)
FLANT5_XL = _flant5(2048, 5120, 32)
FLANT5_XXL = _flant5(4096, 10240, 64)


def _released(llm: dict, image_token_id: int, instruction_aware: bool = True) -> Callable[[], InstructBlipConfig]:
    def build() -> InstructBlipConfig:
        return InstructBlipConfig(
            vision=VisionConfig(),
            qformer=QFormerConfig(),
            llm=dict(llm),
            num_query_tokens=32,
            instruction_aware=instruction_aware,
            image_token_id=image_token_id,
        )

    return build


def _tiny(llm_kind: str, instruction_aware: bool = True) -> Callable[[], InstructBlipConfig]:
    """The sizes of ``instructblip.testing.make_tiny_checkpoint`` (random weights, seconds to build)."""

    def build() -> InstructBlipConfig:
        if llm_kind == "llama":
            llm = dict(
                model_type="llama", vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=2, eos_token_id=2, pad_token_id=400,
            )
            image_token_id = 401
        else:
            llm = dict(
                model_type="t5", vocab_size=448, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                num_decoder_layers=2, feed_forward_proj="gated-gelu", dense_act_fn="gelu", is_gated_act=True,
                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )
            image_token_id = 400
        return InstructBlipConfig(
            vision=VisionConfig(image_size=28, patch_size=14, width=32, layers=2, heads=4, mlp_dim=64),
            qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
            llm=llm,
            num_query_tokens=4,
            instruction_aware=instruction_aware,
            image_token_id=image_token_id,
        )

    return build


PRESETS: dict[str, Callable[[], InstructBlipConfig]] = {
    "instructblip-vicuna7b": _released(VICUNA_7B, 32001),
    "instructblip-vicuna13b": _released(VICUNA_13B, 32001),
    "instructblip-flant5xl": _released(FLANT5_XL, 32100),
    "instructblip-flant5xxl": _released(FLANT5_XXL, 32100),
    "blip2-vicuna7b": _released(VICUNA_7B, 32001, instruction_aware=False),
    "blip2-flant5xl": _released(FLANT5_XL, 32100, instruction_aware=False),
    "blip2-flant5xxl": _released(FLANT5_XXL, 32100, instruction_aware=False),
    "blip2-opt2.7b": _released(_opt(2560, 10240, 32, 32), None, instruction_aware=False),
    "blip2-opt6.7b": _released(_opt(4096, 16384, 32, 32), None, instruction_aware=False),
    "tiny-llama": _tiny("llama"),
    "tiny-t5": _tiny("t5"),
    "tiny-blip2-llama": _tiny("llama", instruction_aware=False),
}


def get_preset(name: str, **overrides) -> InstructBlipConfig:
    """The named configuration with top-level fields replaced (e.g. ``num_query_tokens=16``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    return replace(config, **overrides) if overrides else config
