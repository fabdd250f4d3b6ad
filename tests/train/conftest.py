"""Fixtures for the training tests: the real config tree composed with Hydra's compose API (as
lightning-hydra-template's tests do), pointed at a temporary run directory, and one tiny checkpoint per session."""

from __future__ import annotations

from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from instructblip.testing import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "tiny_checkpoint"
    make_tiny_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="session")
def generated_data(tmp_path_factory) -> Path:
    from instructblip.train.synthetic import write_generated_shards

    out = tmp_path_factory.mktemp("generated")
    write_generated_shards(out, samples_per_dataset=32, samples_per_shard=16, image_size=32)
    return out


