"""The frozen image encoder: a ViT trunk read out after a chosen block, then ``ln_vision``.

BLIP-2/InstructBLIP use EVA ViT-g/14 (timm ``eva_giant_patch14_224`` geometry: width 1408, 16 heads, MLP 6144,
patch 14, class token, absolute position embedding, q/v biases with a fixed zero k bias, exact GELU, LayerNorm eps
1e-6, no layer scale, no rope) cut to its first 39 of 40 blocks, with all 257 tokens (class token included) passed
on and no final norm of the trunk. timm's ``Eva`` block computes exactly what transformers'
``InstructBlipVisionModel`` does (pre-LN attention and MLP residuals, softmax(q k^T / sqrt(d)) v, erf GELU), so the
trunk is built with timm's class at the configured size and only ``ln_vision`` (transformers' ``post_layernorm``)
is ours.

Any open_clip vision tower can stand in for it: ``backbone="open_clip:<model name>"`` (e.g. ``open_clip:ViT-B-16``
or ``open_clip:EVA01-g-14``), read out after ``layers`` blocks. Its weights load from ``pretrained``/``cache_dir``
when the user has them; nothing is downloaded unless ``pretrained`` names a tag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from instructblip.errors import ConfigError

OPEN_CLIP_PREFIX = "open_clip:"


@dataclass
class VisionConfig:
    """Geometry of the image encoder.

    ``backbone``: ``"eva"`` (timm's Eva class built at the sizes below) or ``"open_clip:<model name>"``.
    ``layers``: how many blocks run; the output of the last of them is read out (39 of EVA-g's 40). For an open_clip
    tower ``None`` keeps every block and a negative value drops that many from the end.
    ``ln_vision_eps``: 1e-6 as in transformers' ``post_layernorm``; LAVIS' own ``ln_vision`` uses 1e-5.
    """

    backbone: str = "eva"
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    layers: int | None = 39
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-6
    pretrained: str | None = None
    cache_dir: str | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens per image: one class token plus the patch grid."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _build_eva(config: VisionConfig) -> nn.Module:
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    if config.layers is None or config.layers < 1:
        raise ConfigError(f"vision.layers must be a positive block count for backbone 'eva', got {config.layers}")
    if config.width % config.heads:
        raise ConfigError(f"vision.width {config.width} is not divisible by vision.heads {config.heads}")

    def norm_layer(dim, **kwargs):
        return LayerNorm(dim, eps=config.layer_norm_eps, **kwargs)

    return Eva(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.layers,
        num_heads=config.heads,
        mlp_ratio=config.mlp_dim / config.width,
        qkv_bias=True,
        qkv_fused=True,
        norm_layer=norm_layer,
        num_classes=0,
        global_pool="",
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )


def _resolve_depth(layers: int | None, total: int, name: str) -> int:
    depth = total if layers is None else (total + layers if layers < 0 else layers)
    if not 1 <= depth <= total:
        raise ConfigError(f"vision.layers={layers} does not fit {name}, which has {total} blocks")
    return depth


class _OpenClipTower(nn.Module):
    """An open_clip vision tower read out, all tokens, after its first ``depth`` blocks (no final norm or head)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        import open_clip

        model_name = config.backbone[len(OPEN_CLIP_PREFIX):]
        if model_name not in open_clip.list_models():
            raise ConfigError(f"vision.backbone: unknown open_clip model {model_name!r} (see open_clip.list_models())")
        model = open_clip.create_model(
            model_name,
            pretrained=config.pretrained,
            cache_dir=config.cache_dir,
            device=torch.get_default_device(),  # "meta" inside torch.device("meta") (size checks, lazy loading)
        )
        visual = model.visual
        if hasattr(visual, "trunk"):  # a timm trunk (EVA01-g-14, ...) behind open_clip's adapter
            self.trunk = visual.trunk
            blocks = len(self.trunk.blocks)
            depth = _resolve_depth(config.layers, blocks, model_name)
            self.trunk.prune_intermediate_layers(indices=[depth - 1], prune_norm=True, prune_head=True)
            self.width = self.trunk.num_features
            self._is_timm = True
        else:  # open_clip's own VisionTransformer
            self.trunk = visual
            depth = _resolve_depth(config.layers, len(visual.transformer.resblocks), model_name)
            self.trunk.prune_intermediate_layers(indices=[depth - 1], prune_norm=True, prune_head=True)
            self.width = visual.transformer.width
            self._is_timm = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._is_timm:
            return self.trunk.forward_features(pixel_values)
        return self.trunk.transformer(self.trunk._embeds(pixel_values))


class VisionEncoder(nn.Module):
    """Trunk (frozen by default) + ``ln_vision`` (trained with the Q-Former, as in LAVIS).

    ``forward(pixel_values (N, 3, H, W)) -> (N, tokens, width)``. When ``frozen`` is set the trunk runs under
    ``torch.no_grad`` (no autograd graph is kept through ~1B frozen parameters) and stays in eval mode whatever
    ``.train()`` is called with.
    """

    def __init__(self, config: VisionConfig, frozen: bool = True):
        super().__init__()
        self.config = config
        if config.backbone == "eva":
            self.trunk = _build_eva(config)
            self.width = config.width
        elif config.backbone.startswith(OPEN_CLIP_PREFIX):
            self.trunk = _OpenClipTower(config)
            self.width = self.trunk.width
        else:
            raise ConfigError(f"vision.backbone={config.backbone!r}: use 'eva' or 'open_clip:<model name>'")
        self.ln_vision = nn.LayerNorm(self.width, eps=config.ln_vision_eps)
        self.frozen = frozen
        if frozen:
            self.trunk.requires_grad_(False)
            self.trunk.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.trunk.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.ln_vision.weight.device, self._trunk_dtype())
        if self.frozen:
            with torch.no_grad():
                features = self._run_trunk(pixel_values)
        else:
            features = self._run_trunk(pixel_values)
        # ln_vision runs in its own (fp32 when trained) precision, like LAVIS' fp32 LayerNorm.
        return self.ln_vision(features.to(self.ln_vision.weight.dtype))

    def _run_trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if isinstance(self.trunk, _OpenClipTower):
            return self.trunk(pixel_values)
        return self.trunk.forward_features(pixel_values)

    def _trunk_dtype(self) -> torch.dtype:
        return next(self.trunk.parameters()).dtype
