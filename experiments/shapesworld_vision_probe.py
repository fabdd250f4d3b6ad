"""What the ShapesWorld image encoder's cell tokens hold: linear probes of the colour, kind and size of the shape in a
cell, of the word written there and of the cell itself, on the tokens InstructBLIP reads (after block
``layers - 1`` and a plain layer norm, as ``ln_vision`` starts), and how their variance spreads over directions.

The cell matters because the Q-Former's cross-attention ignores the order of the image tokens: it learns where a
shape is only from what its token holds. The spread matters because a token set whose variance lies along one
direction (occupied against empty) leaves the attributes in directions a Q-Former learns to read slowly.

It pretrains a trunk from a recipe (``conf/model/shapesworld_vision.yaml``; ``KEY=VALUE`` overrides a number of it,
``steps=0`` probes the random initialisation), renders 600 fresh scenes, and fits a logistic regression per
attribute on the occupied cells of the first 70% of the scenes, scored on the rest. One more probe reads the cell
of the one shape of a colour from the *mean* of the 9 cell tokens (per colour, on the scenes with exactly one shape
of it): what a cross-attention spread evenly over the tokens would hand on, against what one token holds.

    .venv/bin/python experiments/shapesworld_vision_probe.py [steps=600] [batch_size=128] ...
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression

from instructblip.shapesworld import vision, world

REPO = Path(__file__).resolve().parents[1]
SCENES = 600


def recipe(args: list[str]) -> vision.VisionPretrainConfig:
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/shapesworld_vision.yaml"))
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in values:
            raise SystemExit(f"unknown recipe key {key!r}; known: {', '.join(values)}")
        values[key] = type(values[key])(float(value))
    return vision.VisionPretrainConfig(out=tempfile.mkdtemp(), **values)


def cell_tokens(trunk_state: dict, cfg: vision.VisionPretrainConfig, scenes: list[world.Scene]) -> torch.Tensor:
    """(scenes, 9, width): the patch tokens as the Q-Former meets them (the class token dropped): InstructBLIP's own
    image encoder, built from the recipe's geometry as ``make demo`` assembles it (the trunk read out before its last
    block, then ``ln_vision`` as it starts, a plain layer norm)."""
    from instructblip.model.vision import VisionConfig, VisionEncoder

    encoder = VisionEncoder(VisionConfig(**vision.vision_config(cfg)))
    encoder.trunk.load_state_dict({k: trunk_state[k] for k in encoder.trunk.state_dict()})
    transform = vision.image_transform(cfg)
    out = []
    with torch.no_grad():
        for start in range(0, len(scenes), 100):
            images = torch.stack([transform(world.render(s)) for s in scenes[start:start + 100]])
            out.append(encoder(images)[:, 1:])
    return torch.cat(out)


def labels(scene: world.Scene) -> list[tuple[int, int, int, int, int]]:
    """Per cell, row by row: (colour, kind, size, word, cell) indices; the first four -1 where the cell has none,
    the cell -1 where it is empty."""
    return [(list(world.COLORS).index(shape.color) if shape else -1,
             world.SHAPES.index(shape.kind) if shape else -1,
             list(world.SIZES).index(shape.size) if shape else -1,
             world.WORDS.index(word.text) if word else -1,
             cell if shape or word else -1)
            for cell, (shape, word) in enumerate(world.cell_contents(scene))]


def cell_from_mean_token(tokens: np.ndarray, scenes: list[world.Scene]) -> float:
    """Mean over colours of a logistic regression's accuracy at the cell of the one shape of that colour, from the
    mean of a scene's cell tokens ((scenes, 9, width)); first 70% of the scenes that have one such shape, scored on the
    rest. Chance: about 11%."""
    mean = tokens.mean(1)
    scores = []
    for color in world.COLORS:
        rows, cells = [], []
        for index, scene in enumerate(scenes):
            hits = [shape for shape in scene.shapes if shape.color == color]
            if len(hits) == 1:
                rows.append(index)
                cells.append(hits[0].cell[0] * world.GRID + hits[0].cell[1])
        cut = int(0.7 * len(rows))
        probe = LogisticRegression(max_iter=3000).fit(mean[rows[:cut]], cells[:cut])
        scores.append(probe.score(mean[rows[cut:]], cells[cut:]))
    return round(100 * float(np.mean(scores)), 1)


def variance_spread(x: np.ndarray, top: int = 4) -> dict:
    """The share of the tokens' total variance along each of their ``top`` principal directions, in percent."""
    eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
    return {"total": round(float(eigenvalues.sum()), 1),
            "top_shares": [round(100 * float(v / eigenvalues.sum()), 1) for v in eigenvalues[:top]]}


def main(args: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = recipe(args)
    start = time.process_time()
    torch.manual_seed(cfg.seed)  # steps=0: the same random trunk every run
    model, _ = vision.build_clip(cfg)
    if cfg.steps > 0:
        from safetensors.torch import load_file

        vision.pretrain_vision(cfg, progress=False)
        model.visual.trunk.load_state_dict(load_file(Path(cfg.out) / "trunk.safetensors"))
    cpu = time.process_time() - start
    rng = random.Random("vision-probe")
    scenes = [world.sample_scene(rng, word_prob=0.5) for _ in range(SCENES)]
    # (until Session 7 the probes read the tokens before ln_vision: results/shapesworld_vision_probe-2026-11-26.json)
    tokens = cell_tokens(model.visual.trunk.state_dict(), cfg, scenes).numpy()
    x = tokens.reshape(-1, cfg.width)
    y = np.array([row for scene in scenes for row in labels(scene)])
    cut = int(0.7 * SCENES) * world.GRID ** 2
    scores = {}
    for column, name in enumerate(("color", "kind", "size", "word", "cell")):
        present = y[:, column] >= 0
        train, test = present.copy(), present.copy()
        train[cut:], test[:cut] = False, False
        probe = LogisticRegression(max_iter=3000).fit(x[train], y[train, column])
        scores[name] = round(100 * probe.score(x[test], y[test, column]), 1)
    occupied = y[:, 4] >= 0
    print(json.dumps({"recipe_overrides": args, "pretraining_cpu_s": round(cpu),
                      "probe_accuracy_on_occupied_cells": scores,
                      "cell_of_a_colour_from_the_mean_token": cell_from_mean_token(tokens, scenes),
                      "variance_all_cells": variance_spread(x), "variance_occupied_cells": variance_spread(x[occupied])}))


if __name__ == "__main__":
    main(sys.argv[1:])
