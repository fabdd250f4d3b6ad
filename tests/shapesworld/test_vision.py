"""The ShapesWorld image encoder's contrastive pretraining recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from instructblip.shapesworld import vision

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("std, expected", [(None, 0.02), (1.0, 1.0)])  # None: timm's own draw, std 0.02
def test_the_position_embedding_starts_at_the_recipes_scale(tmp_path, std, expected):
    torch.manual_seed(0)
    cfg = vision.VisionPretrainConfig(out=str(tmp_path), image_size=72, patch_size=24, width=96, layers=2, heads=4,
                                      mlp_dim=192, embed_dim=32, text_width=64, text_layers=1, pos_embed_std=std)
    model, _ = vision.build_clip(cfg)
    measured = float(model.visual.trunk.pos_embed.std())
    assert measured == pytest.approx(expected, rel=0.15), measured


def test_the_demo_recipe_sets_every_field_it_names():
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "shapesworld_vision.yaml"))
    cfg = vision.VisionPretrainConfig(out="unused", **recipe)   # an unknown key would raise here
    assert cfg.pos_embed_std == recipe["pos_embed_std"] == 1.0
