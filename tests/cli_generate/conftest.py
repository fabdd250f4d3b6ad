"""Tiny Hugging Face checkpoints and image files for the command-line tests (written here, offline)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    from instructblip.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-cli")
    return {llm: make_tiny_checkpoint(root / llm, llm) for llm in ("llama", "t5")}


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
