"""Fixtures for the model tests: one tiny Hugging Face checkpoint per LLM kind (written once per session), loaded
both into transformers' InstructBlipForConditionalGeneration (the oracle, eager attention) and into ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instructblip.testing import make_tiny_checkpoint

LLM_KINDS = ["llama", "t5"]

PROMPTS = ["what is the color of the shape in this picture", "how many"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_checkpoint(root / kind, kind) for kind in LLM_KINDS}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    from transformers import InstructBlipForConditionalGeneration

    return {
        kind: InstructBlipForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        for kind, path in tiny_dirs.items()
    }


@pytest.fixture(scope="session")
def our_models(tiny_dirs):
    from instructblip.model.instructblip import InstructBlip

    return {kind: InstructBlip.from_pretrained(path) for kind, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((36 + 8 * i, 44, 3)) * 255).astype("uint8")) for i in range(2)]
