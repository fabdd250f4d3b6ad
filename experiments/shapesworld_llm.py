"""How well the ShapesWorld LLM answers from the true scene text: the ceiling of what the demo's InstructBLIP can
reach with that frozen LLM (its queries stand where the scene text stood in the LLM's pretraining).

    .venv/bin/python experiments/shapesworld_llm.py [llm=DIR] [recipe=conf/model/shapesworld_llm.yaml] [KEY=VALUE ...]
                                                    [samples=100] [out=experiments/results/shapesworld_llm-DATE.json]

With ``llm=DIR`` (a pretrained LLM, e.g. outputs/demo/llm) it only scores it; otherwise it pretrains one from the
recipe (``KEY=VALUE`` sets a number of ``LanguageConfig``, e.g. ``steps=1200 lr=3e-3``) into a temporary directory first. Each
held-in short-answer dataset and the held-out compositional one are scored on their val split with the evaluation
prompt and greedy decoding, exact match against the first reference; VQA is also split by question kind. The
held-out true/false datasets are scored as the evaluation runner ranks them, on their test split: each candidate's
log-likelihood after the prompt, accuracy for spatial statements, AUC of log p(yes) - log p(no) for the binary one
(``rank/...``). Prints one JSON line and writes it to ``out``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("shapesworld_vqa", "shapesworld_count", "shapesworld_ocr_vqa", "shapesworld_compositional")
RANKED = ("shapesworld_spatial", "shapesworld_binary")   # two candidates each: label 0, label 1


def score(llm_dir: Path, samples: int) -> dict[str, float]:
    """Exact-match accuracy per dataset (and VQA question kind) with the scene text as context; ``pooled/...``: the
    same questions with the context one object per position (``language.pooled_context``); ``focused/...``: the
    lookup questions with only what they ask about as context (``tasks.question_focus``), and the spatial statements
    with only the shape they name (``tasks.statement_focus``)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from instructblip.data import templates
    from instructblip.model import decoding
    from instructblip.shapesworld import tasks, world
    from instructblip.shapesworld.language import pooled_context

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    model = LlamaForCausalLM.from_pretrained(str(llm_dir)).eval()
    table = model.get_input_embeddings().weight.detach()

    ids = partial(token_ids, tokenizer)

    def answers(context: torch.Tensor, prompt: list[int], expected: str) -> bool:
        """Greedy decoding (the project's lean loop: generate's ids) after the context embeddings and the prompt."""
        embeds = torch.cat([context, table[prompt]])[None]
        new = decoding.greedy(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long), None,
                              max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(new[0], skip_special_tokens=True).strip() == expected

    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name in DATASETS:
        for index in range(samples):
            record, _, context = tasks.build(name, "val", index, 0)
            instruction, _ = templates.render_evaluation(record)
            prompt = [tokenizer.bos_token_id] + ids(instruction)
            right = answers(table[ids(context)], prompt, record.answers[0])
            pooled = torch.stack([table[list(group)].mean(0) for group in pooled_context(tokenizer, context)])
            scored = [("", right), ("pooled/", answers(pooled, prompt, record.answers[0]))]
            focus = tasks.question_focus(world.Scene.from_dict(record.extra["scene"]), record.question)
            if focus is not None:
                scored.append(("focused/", answers(table[ids(world.compact(focus))], prompt, record.answers[0])))
            keys = [name.removeprefix("shapesworld_")]
            if name == "shapesworld_vqa":
                keys.append("vqa/" + tasks.question_kind(record.question))
            for key in keys:
                for prefix, hit in scored:
                    hits[prefix + key][0] += hit
                    hits[prefix + key][1] += 1
    scores = {key: round(100 * right / total, 1) for key, (right, total) in hits.items()}
    for name in RANKED:
        for prefix, pooled in (("", False), ("pooled/", True)):
            scores[prefix + "rank/" + name.removeprefix("shapesworld_")] = round(
                ranked(model, tokenizer, name, samples, pooled), 1)
    scores["focused/rank/spatial"] = round(ranked(model, tokenizer, "shapesworld_spatial", samples, focused=True), 1)
    return scores


def ranked(model, tokenizer, name: str, samples: int, pooled: bool = False, focused: bool = False) -> float:
    """Accuracy (spatial) or AUC x100 (binary) of ranking the two candidates by their log-likelihood after the scene
    text, BOS and the evaluation prompt: the runner's ``rank`` method (``LanguageModel.candidate_log_likelihoods``)
    with the true scene's embeddings in the queries' place; ``pooled``: the scene one object per position, as
    :func:`score`'s ``pooled/`` answers; ``focused``: a spatial statement's scene text holds only the shape it
    names."""
    from sklearn.metrics import roc_auc_score

    from instructblip.data import templates
    from instructblip.model.language import LanguageModel
    from instructblip.shapesworld import tasks, world
    from instructblip.shapesworld.language import pooled_context

    llm = LanguageModel({}, hf_model=model)
    table = model.get_input_embeddings().weight.detach()
    margins, labels = [], []
    for index in range(samples):
        record, _, context = tasks.build(name, "test", index, 0)
        if focused:
            context = world.compact(tasks.statement_focus(world.Scene.from_dict(record.extra["scene"]), record.text))
        instruction, _ = templates.render_evaluation(record)
        candidates = [token_ids(tokenizer, candidate) for candidate in record.candidates]
        width = max(len(c) for c in candidates)
        candidate_ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in candidates])
        candidate_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in candidates])
        prompt = torch.tensor([[tokenizer.bos_token_id] + token_ids(tokenizer, instruction)] * len(candidates))
        if pooled:
            scene = torch.stack([table[list(group)].mean(0) for group in pooled_context(tokenizer, context)])
        else:
            scene = table[token_ids(tokenizer, context)]
        scene = scene.expand(len(candidates), -1, -1)
        with torch.no_grad():
            loglik = llm.candidate_log_likelihoods(scene, prompt, torch.ones_like(prompt), candidate_ids,
                                                   candidate_mask).tolist()
        margins.append(loglik[1] - loglik[0])
        labels.append(record.label)
    if name == "shapesworld_binary":
        return 100 * roc_auc_score(labels, margins)
    return 100 * sum((margin > 0) == bool(label) for margin, label in zip(margins, labels)) / len(labels)


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def main(argv: list[str]) -> None:
    from omegaconf import OmegaConf

    args = dict(arg.split("=", 1) for arg in argv)
    samples = int(args.pop("samples", 100))
    out = Path(args.pop("out", REPO / "experiments" / "results" / f"shapesworld_llm-{date.today()}.json"))
    llm = args.pop("llm", None)
    recipe_path = args.pop("recipe", str(REPO / "conf" / "model" / "shapesworld_llm.yaml"))
    recipe = OmegaConf.to_container(OmegaConf.load(recipe_path))
    from dataclasses import fields

    from instructblip.shapesworld.language import LanguageConfig

    scalars = {f.name: f.type for f in fields(LanguageConfig) if f.type in ("int", "float", int, float)}
    for key, value in args.items():
        if key not in scalars:
            raise SystemExit(f"shapesworld_llm.py: {key}=...: allowed: {', '.join(scalars)}")
        recipe[key] = int(float(value)) if scalars[key] in ("int", int) else float(value)
    torch.set_num_threads(1)
    result = {"date": str(date.today()), "command": " ".join(["experiments/shapesworld_llm.py", *argv])}
    with tempfile.TemporaryDirectory() as tmp:
        if llm is None:
            from instructblip.shapesworld.language import pretrain_language

            start = time.process_time()
            llm = pretrain_language(LanguageConfig(out=tmp, **recipe), progress=False)
            result["pretraining_cpu_s"] = round(time.process_time() - start, 1)
            result["recipe"] = recipe
        result["accuracy_from_scene_text"] = score(Path(llm), samples)
    print(json.dumps(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
