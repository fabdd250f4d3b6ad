"""Contrastive pretraining of the tiny image encoder (open_clip's CLIP and ClipLoss) on the world's captions.

BLIP-2 starts from EVA-CLIP's image tower; the miniature trains its own: an open_clip ``CLIP`` built from a tiny
config (no download), whose image tower is timm's ``Eva`` at the geometry below, the same class that
``instructblip.model.vision`` builds for ``backbone: eva`` (and that exports to transformers'
``InstructBlipVisionModel``). The text tower is open_clip's own transformer with its bundled BPE. Pairs are
(image, the scene written out compactly: every shape with its cell, and the word), so the features have to carry
colours, kinds, sizes, positions and the written word.

Output: ``trunk.safetensors`` (the Eva trunk's state dict, keys as ``VisionEncoder.trunk`` names them),
``vision_config.json`` (the geometry, as ``instructblip.model.vision.VisionConfig`` fields) and ``losses.json``
(the contrastive loss per step, which the demo report plots; the decorrelation penalty is only logged).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from instructblip.shapesworld import world



@dataclass
class VisionPretrainConfig:
    out: str
    image_size: int = world.IMAGE_SIZE
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 512
    embed_dim: int = 128          # the shared CLIP embedding
    text_width: int = 128
    text_layers: int = 2
    context_length: int = 48
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0
    # the initial scale of the absolute position embedding, drawn normal; None keeps timm's own draw (truncated
    # normal, std 0.02, against patch embeddings of order 1: a 24 px patch has 1728 inputs): see build_clip
    pos_embed_std: float | None = None
    # weight of read_out_decorrelation beside the contrastive loss (0: off); see ContrastivePretraining
    decorrelation: float = 0.0


def clip_text(scene: world.Scene) -> str:
    """The scene, compactly: 'large red circle top left. small blue square center. word cat right.'"""
    return world.compact(scene)


def eva_kwargs(cfg: VisionPretrainConfig) -> dict:
    """timm ``Eva`` arguments: those of ``instructblip.model.vision._build_eva`` (so the trunk state dict loads
    there), plus the final norm that CLIP's pooled token needs (dropped when the trunk is read out for BLIP-2)."""
    from functools import partial

    from timm.layers import LayerNorm

    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
                num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=True, qkv_fused=True,
                norm_layer=partial(LayerNorm, eps=1e-6), use_post_transformer_norm=True, use_fc_norm=False)


def timm_name(cfg: VisionPretrainConfig) -> str:
    """Register (once) and return a timm model name for this geometry: open_clip's timm adapter builds its image
    tower by name only, so the geometry goes into the name."""
    import inspect
    import sys

    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    name = (f"shapesworld_eva_{cfg.image_size}px_p{cfg.patch_size}_w{cfg.width}_d{cfg.layers}_h{cfg.heads}"
            f"_m{cfg.mlp_dim}")
    if name not in timm.list_models(name):
        def build(pretrained: bool = False, **kwargs):
            # timm's factory adds its own keys (pretrained_cfg, cache_dir, ...); keep what Eva takes
            taken = inspect.signature(Eva.__init__).parameters
            model = Eva(**{**eva_kwargs(cfg), **{k: v for k, v in kwargs.items() if k in taken}})
            model.pretrained_cfg = model.default_cfg = {}   # no pretrained weights exist for this geometry
            return model

        build.__name__ = name
        build.__module__ = __name__
        setattr(sys.modules[__name__], name, build)   # timm records the defining module of every entry
        register_model(build)
    return name


def build_clip(cfg: VisionPretrainConfig):
    """An open_clip CLIP from a tiny config: the Eva image tower (through open_clip's timm adapter) + text tower."""
    import open_clip

    model = open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        output_dict=True,
        vision_cfg={"timm_model_name": timm_name(cfg), "timm_model_pretrained": False, "timm_pool": "token",
                    "timm_proj": "linear", "image_size": cfg.image_size},
        text_cfg={"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.text_width,
                  "heads": max(1, cfg.text_width // 64), "layers": cfg.text_layers},
    )
    # the 49408-row BPE table of open_clip's tokenizer, of which the world uses ~100 rows, stays at its random
    # initialisation: the text transformer above it adapts, and the optimiser skips millions of idle parameters
    model.token_embedding.requires_grad_(False)
    # The Q-Former's cross-attention ignores token order: a cell's position reaches it only through the token's
    # content. At timm's 0.02 the position embedding is drowned by the patch's own embedding and, after contrastive
    # training, a linear probe found the cell of an occupied token in 19.5% of cases (chance 11%); at 1.0, in 100%
    # (experiments/README.md, "Session 7")
    if cfg.pos_embed_std is not None:
        torch.nn.init.normal_(model.visual.trunk.pos_embed, std=cfg.pos_embed_std)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    return model, tokenizer


class _Pairs(IterableDataset):
    """An endless stream of (image tensor, caption) for fresh scenes; each worker its own seeded stream."""

    def __init__(self, seed: int, transform):
        self.seed, self.transform = seed, transform

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/clip/{info.id if info else 0}")
        while True:
            scene = world.sample_scene(rng, word_prob=0.6)
            yield self.transform(world.render(scene)), clip_text(scene)


def read_out_decorrelation(tokens: torch.Tensor) -> torch.Tensor:
    """How far the read-out tokens (batch, tokens, width) are from whitened, after the plain layer norm that
    ``ln_vision`` starts as: the mean squared off-diagonal correlation between feature columns (times the width), plus
    the mean shortfall of each column's standard deviation below 1 (VICReg's variance and covariance terms, on
    correlations so that shrinking every feature cannot lower it).

    Why: the Q-Former learns what a cell holds from these tokens, and learns it slowly along directions of little
    variance. Left to the contrastive loss alone, 93% of the tokens' variance lies along one direction (occupied cell
    against empty); the Q-Former from its MiniLM start, with a linear answer head on its queries, then answered 48%
    of the held-in VQA questions after 200 steps of 128 (cell questions 14%, chance 11%); the same tokens whitened,
    75% (59%); the tokens of a trunk pretrained with this penalty at weight 3, 79% (73%) (experiments/README.md,
    "Session 10")."""
    z = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:]).reshape(-1, tokens.shape[-1])
    z = z - z.mean(0)
    std = z.pow(2).mean(0).clamp(min=1e-8).sqrt()
    correlation = (z / std).T @ (z / std) / len(z)
    off_diagonal = correlation - torch.diag(correlation.diagonal())
    return torch.relu(1 - std).mean() + off_diagonal.pow(2).sum() / correlation.shape[0]


def read_out_block(model, cfg: VisionPretrainConfig):
    """The open_clip model's trunk block whose output InstructBLIP's encoder reads: the last that
    :func:`vision_config` keeps."""
    return model.visual.trunk.blocks[vision_config(cfg)["layers"] - 1]


class ContrastivePretraining(L.LightningModule):
    """open_clip's contrastive loss; with ``cfg.decorrelation`` > 0, plus :func:`read_out_decorrelation` of the tokens
    InstructBLIP reads (after the blocks :func:`vision_config` keeps; the last block only feeds CLIP's pooled token)."""

    def __init__(self, model, tokenizer, cfg: VisionPretrainConfig):
        super().__init__()
        import open_clip

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.loss_fn = open_clip.ClipLoss()
        self.losses: list[float] = []
        self._read_out: torch.Tensor | None = None
        if cfg.decorrelation:
            read_out_block(model, cfg).register_forward_hook(
                lambda module, inputs, output: setattr(self, "_read_out", output))

    def training_step(self, batch, batch_idx):
        images, texts = batch
        tokens = self.tokenizer(list(texts))
        out = self.model(images, tokens)
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        self.losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True)
        if self.cfg.decorrelation:
            read_out, self._read_out = self._read_out, None   # not held (with its graph) until the next step
            penalty = read_out_decorrelation(read_out)
            self.log("decorrelation", penalty, prog_bar=True)
            loss = loss + self.cfg.decorrelation * penalty
        return loss

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr,
                                      weight_decay=0.1)
        schedule = get_cosine_schedule_with_warmup(optimizer, self.cfg.warmup, self.cfg.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def image_transform(cfg: VisionPretrainConfig):
    from instructblip.processing import ImageTransform

    return ImageTransform((cfg.image_size, cfg.image_size))


def vision_config(cfg: VisionPretrainConfig) -> dict:
    """The InstructBLIP ``vision`` config for this trunk (``instructblip.model.vision.VisionConfig`` fields):
    read out after the penultimate block, as BLIP-2 reads EVA-CLIP (the last block only fed the pooled token)."""
    return {"backbone": "eva", "image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width,
            "layers": cfg.layers - 1, "heads": cfg.heads, "mlp_dim": cfg.mlp_dim, "layer_norm_eps": 1e-6,
            "ln_vision_eps": 1e-6}


def pretrain_vision(cfg: VisionPretrainConfig, progress: bool = True) -> Path:
    from safetensors.torch import save_file

    out = Path(cfg.out)
    L.seed_everything(cfg.seed, verbose=False)
    model, tokenizer = build_clip(cfg)
    module = ContrastivePretraining(model, tokenizer, cfg)
    loader = DataLoader(_Pairs(cfg.seed, image_transform(cfg)), batch_size=cfg.batch_size)
    trainer = L.Trainer(max_steps=cfg.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, loader)
    out.mkdir(parents=True, exist_ok=True)
    trunk = {k: v.contiguous() for k, v in model.visual.trunk.state_dict().items()}
    save_file(trunk, out / "trunk.safetensors")
    (out / "vision_config.json").write_text(json.dumps(vision_config(cfg), indent=1))
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "losses.json").write_text(json.dumps(module.losses))
    return out
