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
    assert cfg.decorrelation == recipe["decorrelation"] > 0


def test_read_out_decorrelation_is_low_for_isotropic_tokens_and_high_for_one_shared_direction():
    torch.manual_seed(0)
    isotropic = torch.randn(64, 10, 32)
    one_direction = isotropic * 0.05 + torch.randn(64, 10, 1) * torch.randn(32)   # most variance along one vector
    low, high = vision.read_out_decorrelation(isotropic), vision.read_out_decorrelation(one_direction)
    assert float(low) < 1.0 < float(high)
    # a scale changes nothing (the layer norm first, correlations after), so shrinking features cannot lower it
    assert torch.allclose(vision.read_out_decorrelation(isotropic * 10.0), low, rtol=1e-3)


def test_the_decorrelation_weight_adds_the_read_out_tokens_penalty_to_the_contrastive_loss(tmp_path):
    def step_loss(weight: float):
        torch.manual_seed(0)
        cfg = vision.VisionPretrainConfig(out=str(tmp_path), image_size=72, patch_size=24, width=32, layers=3,
                                          heads=2, mlp_dim=64, embed_dim=16, text_width=64, text_layers=1,
                                          decorrelation=weight)
        model, tokenizer = vision.build_clip(cfg)
        module = vision.ContrastivePretraining(model, tokenizer, cfg)
        seen = []
        vision.read_out_block(model, cfg).register_forward_hook(lambda module, inputs, output: seen.append(output))
        pairs = iter(vision._Pairs(0, vision.image_transform(cfg)))
        images, texts = zip(*[next(pairs) for _ in range(8)])
        module.log = lambda *args, **kwargs: None   # no trainer attached
        loss = module.training_step((torch.stack(images), list(texts)), 0)
        assert module._read_out is None   # released once the penalty is computed
        return loss, seen[0]

    plain, _ = step_loss(0.0)
    weighted, read_out = step_loss(0.5)
    assert read_out.shape == (8, 1 + 9, 32)   # the class token and the 9 cells after block layers - 1
    assert float(weighted) == pytest.approx(float(plain) + 0.5 * float(vision.read_out_decorrelation(read_out)),
                                            rel=1e-5)
