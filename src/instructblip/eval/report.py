"""The results of an evaluation run: a markdown table and a JSON file beside the paper's numbers, and the same to
the configured loggers (W&B: metrics plus a table)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from instructblip.eval.paper_results import MODEL_NAMES, paper_score
from instructblip.eval.runner import BenchmarkResult

COLUMNS = ("benchmark", "split", "metric", "n", "score", "paper", "delta")


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def table_rows(results: Iterable[BenchmarkResult], paper_model: str | None) -> list[list[Any]]:
    rows = []
    for result in results:
        paper = paper_score(paper_model, result.name)
        score = None if math.isnan(result.score) else round(result.score, 2)
        delta = None if paper is None or score is None else round(score - paper, 2)
        rows.append([result.name, result.split, result.metric, result.n, score, paper, delta])
    return rows


def markdown_table(results: list[BenchmarkResult], paper_model: str | None, checkpoint: str) -> str:
    paper_name = MODEL_NAMES.get(paper_model or "", "no paper model chosen")
    lines = [
        f"# Zero-shot evaluation of `{checkpoint}`",
        "",
        f"Paper column: Table 1, {paper_name}. Scores in percent (CIDEr x100; mean rank as a rank).",
        "",
        "| Benchmark | Split | Metric | n | Score | Paper | Δ |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, split, metric, n, score, paper, delta in table_rows(results, paper_model):
        lines.append(f"| {name} | {split} | {metric} | {n} | {_fmt(score)} | {_fmt(paper)} | {_fmt(delta)} |")
    extras = [(r.name, k, v) for r in results for k, v in r.extra.items()]
    if extras:
        lines += ["", "Companion metrics: " + ", ".join(f"{b} {k} {_fmt(v)}" for b, k, v in extras)]
    skipped = [(r.name, r.skipped) for r in results if r.skipped]
    if skipped:
        lines += ["", "Skipped corrupt samples: " + "; ".join(
            f"{name}: " + ", ".join(f"{reason} {count}" for reason, count in counts.items())
            for name, counts in skipped)]
    return "\n".join(lines) + "\n"


def write_results(output_dir: Path, results: list[BenchmarkResult], paper_model: str | None, checkpoint: str,
                  config: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """``results.md`` and ``results.json`` in ``output_dir``; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "results.md"
    markdown.write_text(markdown_table(results, paper_model, checkpoint), encoding="utf-8")
    payload = {
        "checkpoint": checkpoint,
        "paper_model": paper_model,
        "benchmarks": {
            r.name: {**asdict(r), "score": None if math.isnan(r.score) else r.score,
                     "paper": paper_score(paper_model, r.name)}
            for r in results
        },
        "config": config or {},
    }
    as_json = output_dir / "results.json"
    as_json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return markdown, as_json


def log_results(loggers: list, results: list[BenchmarkResult], paper_model: str | None,
                config: dict[str, Any] | None = None) -> None:
    """Metrics (``eval/<benchmark>/<metric>``) to every Lightning logger; the table too where it can take one."""
    metrics: dict[str, float] = {}
    for result in results:
        if not math.isnan(result.score):
            metrics[f"eval/{result.name}/{result.metric}"] = result.score
        metrics.update({f"eval/{result.name}/{k}": v for k, v in result.extra.items() if not math.isnan(v)})
    rows = table_rows(results, paper_model)
    for logger in loggers:
        if config:
            logger.log_hyperparams(config)
        logger.log_metrics(metrics, step=0)
        if hasattr(logger, "log_table"):  # WandbLogger
            logger.log_table(key="eval/results", columns=list(COLUMNS), data=rows)
        logger.save()
