"""How fast a `make demo` run's Q-Former learns to answer the held-in questions from what the image encoder gives it.

The run's Q-Former (its query tokens and layers, from ``init``: ``base``, ``stage1``, ``stage2`` or ``instruct``) is
trained with a linear answer head on the mean of its query outputs: no LLM, so the answers are classes and a step
costs a fraction of an instruction-tuning step. The image encoder is frozen as in every stage, so its features are
computed once. ``features=oracle`` replaces them with the scene's ground truth written per cell (one-hot colour,
kind, size, word and cell, the class token zero): what the Q-Former makes of perfect features.

Every ``eval_every`` steps it prints the val accuracy (per question sort for ``shapesworld_vqa``) beside the
question-only prior (each val question answered with its most frequent train answer: what a model that ignores
the image scores), and writes all of it to ``experiments/results/shapesworld_qformer_probe-TAG-DATE.json``.
``whiten=1`` whitens the trunk's features first (the train split's token mean and covariance, every principal
direction scaled to unit variance): what the Q-Former makes of the same information, well conditioned.
``cross_attention_init_std`` / ``cross_attention_value_init_std`` (with ``init=base``) redraw the fresh
cross-attention's query and key / value and output weights at that std, as stage 1's options of the same names do.

    .venv/bin/python experiments/shapesworld_qformer_probe.py outputs/demo [init=stage2] [features=trunk|oracle]
        [dataset=shapesworld_vqa] [steps=400] [lr=1e-3] [batch_size=32] [train=4000] [val=400] [eval_every=100]
        [dropout=0.1] [seed=0] [whiten=0] [cross_attention_init_std=0.16] [cross_attention_value_init_std=0.05]
        [tag=NAME]
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from instructblip.shapesworld import tasks, world

REPO = Path(__file__).resolve().parents[1]
INITS = ("base", "stage1", "stage2", "instruct")
FEATURES = ("trunk", "oracle")


@dataclass
class ProbeSettings:
    run: str
    init: str = "stage2"
    features: str = "trunk"
    dataset: str = "shapesworld_vqa"
    steps: int = 400
    lr: float = 1e-3
    batch_size: int = 32
    train: int = 4000
    val: int = 400
    eval_every: int = 100
    dropout: float = 0.1
    seed: int = 0          # the world's seed (the run's own, for its train/val split) and the batch order
    whiten: int = 0        # 1: whiten the features with the train split's statistics (see whitened)
    cross_attention_init_std: float | None = None   # init=base: redraw the cross-attention's query/key weights at this std
    cross_attention_value_init_std: float | None = None   # init=base: ... its value/output weights (None: as drawn)
    tag: str = ""
    out: str = ""          # the results file; default experiments/results/shapesworld_qformer_probe-TAG-DATE.json

    @classmethod
    def from_args(cls, args: list[str]) -> "ProbeSettings":
        if not args or "=" in args[0]:
            raise SystemExit(__doc__)
        known = {f.name: f.type for f in fields(cls)}
        values = {"run": args[0]}
        for arg in args[1:]:
            key, _, value = arg.partition("=")
            if key not in known or key == "run":
                raise SystemExit(f"unknown setting {key!r}; known: {', '.join(k for k in known if k != 'run')}")
            values[key] = {"int": int, "float": float, "float | None": float}.get(known[key], str)(value)
        settings = cls(**values)
        for key, allowed in (("init", INITS), ("features", FEATURES)):
            if getattr(settings, key) not in allowed:
                raise SystemExit(f"{key}={getattr(settings, key)!r}; allowed: {', '.join(allowed)}")
        if settings.dataset not in tasks.TASKS or tasks.TASKS[settings.dataset].info.held_out:
            held_in = [name for name, task in tasks.TASKS.items() if not task.info.held_out]
            raise SystemExit(f"dataset={settings.dataset!r}; allowed: {', '.join(held_in)}")
        return settings


def oracle_features(scene: world.Scene, width: int) -> torch.Tensor:
    """(1 + 9, width): per cell, one-hot colour, kind, size, word and the cell itself; the class token zero."""
    colors, sizes = list(world.COLORS), list(world.SIZES)
    offsets = {"color": 0, "kind": len(colors), "size": len(colors) + len(world.SHAPES)}
    offsets["word"] = offsets["size"] + len(sizes)
    offsets["cell"] = offsets["word"] + len(world.WORDS)
    if offsets["cell"] + world.GRID ** 2 > width:
        raise ValueError(f"the oracle needs {offsets['cell'] + world.GRID ** 2} feature columns; the trunk has {width}")
    out = torch.zeros(1 + world.GRID ** 2, width)
    for cell_index, (shape, word) in enumerate(world.cell_contents(scene)):
        row = out[1 + cell_index]
        row[offsets["cell"] + cell_index] = 1.0
        if shape is not None:
            row[offsets["color"] + colors.index(shape.color)] = 1.0
            row[offsets["kind"] + world.SHAPES.index(shape.kind)] = 1.0
            row[offsets["size"] + sizes.index(shape.size)] = 1.0
        if word is not None:
            row[offsets["word"] + world.WORDS.index(word.text)] = 1.0
    # the trunk's tokens come out of ln_vision at about unit scale per column; these rows are sparse, so larger
    return out * 3.0


def split(model, settings: ProbeSettings, name: str, n: int) -> dict:
    records, images = [], []
    for index in range(n):
        record, image, _ = tasks.build(settings.dataset, name, index, settings.seed)
        records.append(record)
        images.append(image)
    if settings.features == "oracle":
        width = model.vision.ln_vision.weight.shape[0]
        features = torch.stack([oracle_features(world.Scene.from_dict(r.extra["scene"]), width) for r in records])
    else:
        with torch.no_grad():   # the frozen trunk and ln_vision (left as the run has it), once
            features = torch.cat([model.vision(model.processor.pixel_values(images[i:i + 200]))
                                  for i in range(0, n, 200)])
    questions = [r.question for r in records]
    return {"features": features, "questions": questions, "answers": [r.answers[0] for r in records],
            **model.processor.qformer_batch(questions)}


def whitened(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits' features ((samples, tokens, width)) centred on the train tokens' mean and rotated onto their
    principal directions, each scaled to unit variance."""
    flat = train.reshape(-1, train.shape[-1])
    mean = flat.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((flat - mean).T))
    projection = eigenvectors / eigenvalues.clamp(min=1e-4).sqrt()
    return tuple(((part - mean) @ projection) for part in (train, val))


def question_prior(train: dict, val: dict) -> float:
    """Accuracy of answering each val question with its most frequent train answer (no image)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for question, answer in zip(train["questions"], train["answers"]):
        seen[question][answer] += 1
    right = sum(bool(seen[q]) and seen[q].most_common(1)[0][0] == a for q, a in zip(val["questions"], val["answers"]))
    return 100.0 * right / len(val["answers"])


def main(args: list[str]) -> None:
    from instructblip.model.instructblip import InstructBlip
    from instructblip.train.build import load_trainable_weights

    settings = ProbeSettings.from_args(args)
    torch.set_num_threads(1)
    run = Path(settings.run)
    model = InstructBlip.from_pretrained(str(run / "base"))
    if settings.init != "base":
        load_trainable_weights(model, run / settings.init / "trainable.safetensors")
    else:
        # what stage 1 does with stage.module.cross_attention_(value_)init_std (the base checkpoint keeps BERT's 0.02)
        model.qformer.draw_cross_attention(settings.cross_attention_init_std, settings.cross_attention_value_init_std,
                                           generator=torch.Generator().manual_seed(settings.seed))
    for module in model.qformer.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = settings.dropout
    for layer in model.qformer.layers:
        for attention in (layer.self_attention, layer.cross_attention):
            if attention is not None:
                attention.attention_dropout = settings.dropout
    model.vision.requires_grad_(False).eval()
    start = time.process_time()
    train, val = split(model, settings, "train", settings.train), split(model, settings, "val", settings.val)
    if settings.whiten:
        train["features"], val["features"] = whitened(train["features"], val["features"])
    answers = sorted(set(train["answers"]) | set(val["answers"]))
    target = {name: torch.tensor([answers.index(a) for a in part["answers"]]) for name, part in (("train", train),
                                                                                                   ("val", val))}
    head = torch.nn.Linear(model.qformer.config.hidden_size, len(answers))
    params = [model.query_tokens, *model.qformer.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.05)

    def logits(part: dict, rows: torch.Tensor) -> torch.Tensor:
        queries = model.query_tokens.expand(len(rows), -1, -1)
        outputs = model.qformer(queries, part["qformer_input_ids"][rows], part["qformer_attention_mask"][rows],
                                part["features"][rows], queries_only=True)
        return head(outputs.mean(dim=1))

    def evaluate(step: int) -> dict:
        model.qformer.eval()
        with torch.no_grad():
            right = (logits(val, torch.arange(settings.val)).argmax(-1) == target["val"]).tolist()
        model.qformer.train()
        row = {"step": step, "accuracy": round(100.0 * sum(right) / len(right), 1)}
        if settings.dataset in ("shapesworld_vqa", "shapesworld_qg"):
            by_sort: dict[str, list[bool]] = defaultdict(list)
            for question, ok in zip(val["questions"], right):
                by_sort[tasks.question_kind(question)].append(ok)
            row["by_question"] = {k: round(100.0 * sum(v) / len(v), 1) for k, v in sorted(by_sort.items())}
        print(json.dumps(row), flush=True)
        return row

    generator = torch.Generator().manual_seed(settings.seed)
    curve = []
    model.qformer.train()
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step == settings.steps:
            curve.append(evaluate(step))
        if step == settings.steps:
            break
        rows = torch.randint(0, settings.train, (settings.batch_size,), generator=generator)
        loss = F.cross_entropy(logits(train, rows), target["train"][rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    result = {"settings": asdict(settings), "answers": len(answers),
              "question_only_prior": round(question_prior(train, val), 1), "curve": curve,
              "cpu_s": round(time.process_time() - start)}
    tag = settings.tag or f"{settings.init}-{settings.features}-{settings.dataset}"
    out = Path(settings.out) if settings.out else (
        REPO / "experiments" / "results" / f"shapesworld_qformer_probe-{tag}-{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"question_only_prior": result["question_only_prior"], "final": curve[-1], "out": str(out)}))


if __name__ == "__main__":
    main(sys.argv[1:])
