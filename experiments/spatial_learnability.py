"""Can a LLaMA of the demo's LLM size learn to judge spatial statements from scene text at all, given nothing else to
learn? A plain loop, outside the demo's recipe: each example is a ShapesWorld-like scene written as text, then a
statement and "true" / "false"; one word is one token (no BPE, so no tokenisation effect); accuracy on 2000 held-out
examples every 500 steps.

    python experiments/spatial_learnability.py [statement=relation|side|cell|relation_word] [cells=demo|regular]
        [context=whole|focused] [clauses=0|1] [loss=answer|statement|all] [layers=2] [width=128] [steps=4000]
        [batch=64] [lr=1e-3] [seed=0] [out=experiments/results/spatial_learnability-TAG-DATE.json]

``statement``: ``relation`` is the demo's held-out statement ("the red square is left of the blue circle", false ones
name the opposite relation); ``side`` one shape against the image ("the red square is at the left of the image",
false ones name the opposite side; only shapes in an edge row or column); ``cell`` one shape at a cell ("the red
square is at the top left"; false ones name the cell of another shape of the scene); ``relation_word`` a control
whose label is the relation word alone ("left of" / "above" true), which any model learns at once. ``cells``: the
demo's cell names ("top left", "top", "left", "center") or regular ones, a row word then a column word ("top left",
"top center", "middle left", "middle center"), so a shape's row and column words always stand at the same distance
from its name.
``context``: every shape of the scene, or only those the statement names. ``clauses``: the scene text also states
every relation between two shapes ("red square left of blue circle ."). ``loss``: on the answer only, or on every
token (the scene text and the statement too), or on the
statement and the answer (the words after ``<s>``, as the demo's LLM pretraining with ``instruction_loss: 1``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEMO_CELLS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
              (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
REGULAR_CELLS = {(r, c): f"{row} {column}" for r, row in enumerate(("top", "middle", "bottom"))
                 for c, column in enumerate(("left", "center", "right"))}
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")
KINDS = ("circle", "square", "triangle")
HOLDS = {"left of": lambda a, b: a[1] < b[1], "right of": lambda a, b: a[1] > b[1],
         "above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0]}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
            "top": "bottom", "bottom": "top", "left": "right", "right": "left"}
SIDES = {"top": lambda cell: cell[0] == 0, "bottom": lambda cell: cell[0] == 2,
         "left": lambda cell: cell[1] == 0, "right": lambda cell: cell[1] == 2}
OPTIONS = dict(statement="relation", cells="demo", context="whole", clauses="0", loss="answer", layers="2",
               width="128", steps="4000", batch="64", lr="1e-3", seed="0")


def example(rng: random.Random, opts: dict) -> tuple[list[str], str]:
    """(the words before the answer, the answer) for one scene of 2-3 shapes with distinct (colour, kind)."""
    cells = DEMO_CELLS if opts["cells"] == "demo" else REGULAR_CELLS
    while True:
        placed = rng.sample(sorted(cells), rng.randint(2, 3))
        names = rng.sample([(c, k) for c in COLORS for k in KINDS], len(placed))
        shapes = [(rng.choice(("small", "large")), color, kind, cell) for (color, kind), cell in zip(names, placed)]
        if opts["statement"] == "side":
            choices = [(s, side) for s in shapes for side in SIDES if SIDES[side](s[3])]
        elif opts["statement"] == "cell":   # a shape and the cell of another one in the scene (the false statement)
            choices = [(s, other[3]) for s in shapes for other in shapes if other is not s]
        else:
            choices = [(a, rel, b) for a in shapes for b in shapes if a is not b for rel in HOLDS
                       if HOLDS[rel](a[3], b[3])]
        if choices:
            break
    label = rng.random() < 0.5
    if opts["statement"] == "side":
        shape, side = rng.choice(choices)
        named = [shape]
        statement = f"the {shape[1]} {shape[2]} is at the {side if label else OPPOSITE[side]} of the image"
    elif opts["statement"] == "cell":
        shape, other_cell = rng.choice(choices)
        named = [shape]
        statement = f"the {shape[1]} {shape[2]} is at the {cells[shape[3] if label else other_cell]}"
    else:
        a, rel, b = rng.choice(choices)
        named = [a, b]
        if not label:
            rel = OPPOSITE[rel]
        if opts["statement"] == "relation_word":
            label = rel in ("left of", "above")
        statement = f"the {a[1]} {a[2]} is {rel} the {b[1]} {b[2]}"
    shown = sorted(shapes if opts["context"] == "whole" else named, key=lambda s: s[3])
    context = " . ".join(f"{size} {color} {kind} {cells[cell]}" for size, color, kind, cell in shown) + " ."
    if opts["clauses"] == "1":
        context += "".join(f" {a[1]} {a[2]} {rel} {b[1]} {b[2]} ." for a in shown for b in shown if a is not b
                           for rel in HOLDS if HOLDS[rel](a[3], b[3]))
    words = f"{context} <s> is this true or false ? {statement} . answer :".split()
    return words, "true" if label else "false"


def main(argv: list[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    given = dict(arg.split("=", 1) for arg in argv)
    out = given.pop("out", None)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; allowed: {', '.join(OPTIONS)}, out")
    opts = {**OPTIONS, **given}
    torch.set_num_threads(1)
    torch.manual_seed(int(opts["seed"]))
    rng = random.Random(int(opts["seed"]))
    data = [example(rng, opts) for _ in range(60_000)]
    vocab = sorted({w for words, _ in data for w in words} | {"true", "false", "<pad>"})
    index = {w: i for i, w in enumerate(vocab)}
    rows = [([index[w] for w in words], index[answer]) for words, answer in data]
    train, test = rows[:-2000], rows[-2000:]
    width = int(opts["width"])
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=int(opts["layers"]),
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True))
    lr, batch_size = float(opts["lr"]), int(opts["batch"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def batch(chosen):
        # left padding: the last position predicts the answer; positions count from each row's first word
        length = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), length), index["<pad>"])
        mask = torch.zeros_like(ids)
        for i, (row, _) in enumerate(chosen):
            ids[i, length - len(row):] = torch.tensor(row)
            mask[i, length - len(row):] = 1
        return ids, mask, torch.tensor([answer for _, answer in chosen])

    def logits(ids, mask):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    def accuracy() -> float:
        model.eval()
        hits = 0
        with torch.no_grad():
            for i in range(0, len(test), 500):
                ids, mask, answers = batch(test[i:i + 500])
                hits += (logits(ids, mask)[:, -1].argmax(-1) == answers).sum().item()
        model.train()
        return 100 * hits / len(test)

    curve, draw, start = [], random.Random(1), time.time()
    for step in range(int(opts["steps"]) + 1):
        if step % 500 == 0:
            curve.append({"step": step, "accuracy": accuracy(), "s": round(time.time() - start)})
            print(json.dumps(curve[-1]), flush=True)
        if step == int(opts["steps"]):
            break
        ids, mask, answers = batch(draw.sample(train, batch_size))
        out_logits = logits(ids, mask)
        if opts["loss"] in ("all", "statement"):
            targets = torch.cat([ids[:, 1:], answers[:, None]], 1).masked_fill(mask == 0, -100)
            if opts["loss"] == "statement":   # as the demo's LLM: no loss on the scene text (before <s>)
                targets = targets.masked_fill((ids == index["<s>"]).long().cumsum(1) == 0, -100)
            loss = F.cross_entropy(out_logits.flatten(0, 1), targets.flatten())
        else:
            loss = F.cross_entropy(out_logits[:, -1], answers)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    true_share = 100 * sum(answer == index["true"] for _, answer in test) / len(test)
    result = {"date": str(date.today()), "command": " ".join(["experiments/spatial_learnability.py", *argv]),
              "options": opts, "example": " ".join(data[0][0]) + " " + data[0][1],
              "chance": max(true_share, 100 - true_share), "curve": curve}
    tag = "-".join(f"{k}_{v}" for k, v in given.items()) or "default"
    path = Path(out) if out else REPO / "experiments" / "results" / f"spatial_learnability-{tag}-{date.today()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
