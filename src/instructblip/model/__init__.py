"""The model as plain nn.Modules with typed configs: vision.py (frozen image encoder + ln_vision), qformer.py
(instruction-aware Q-Former), language.py (the LLM head, decoder-only or encoder-decoder), instructblip.py (the
whole model: forward/loss, generate, rank, video, from_pretrained/save_pretrained) and presets.py (the released
configurations and tiny ones for tests)."""

from instructblip.model.instructblip import GENERATION_DEFAULTS, InstructBlip, InstructBlipConfig, InstructBlipOutput
from instructblip.model.language import LanguageModel
from instructblip.model.presets import PRESETS, get_preset
from instructblip.model.qformer import QFormer, QFormerConfig, QFormerLMHead, load_bert_weights
from instructblip.model.vision import VisionConfig, VisionEncoder

__all__ = [
    "GENERATION_DEFAULTS",
    "InstructBlip",
    "InstructBlipConfig",
    "InstructBlipOutput",
    "LanguageModel",
    "PRESETS",
    "QFormer",
    "QFormerConfig",
    "QFormerLMHead",
    "VisionConfig",
    "VisionEncoder",
    "get_preset",
    "load_bert_weights",
]
