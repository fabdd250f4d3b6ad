"""Predictions files (JSONL, one object per sample): reading them with line-exact errors, and scoring them.

The held-out runner writes these files and ``instructblip-score`` reads them; the line format of each metric is
in its class docstring (``instructblip.eval.metrics``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructblip.errors import DataError
from instructblip.eval.metrics import build_metric


@dataclass
class Score:
    metric: str
    score: float        # percent, as the paper reports it (mean_rank: a rank)
    n: int              # samples the score covers (after dropping repeated ids)
    duplicates: int     # lines dropped because their id had already occurred

    def as_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "n": self.n}


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; DataError naming file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file")
    lines: list[tuple[int, dict[str, Any]]] = []
    with path.open("r", encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: a line must be a JSON object, got {type(value).__name__}")
            lines.append((number, value))
    if not lines:
        raise DataError(f"{path}: the predictions file is empty")
    return lines


def score_file(metric_name: str, path: str | Path, **options: Any) -> Score:
    """Score a predictions file with a registered metric; errors name the file, the line and the field."""
    metric = build_metric(metric_name, **options)
    for number, line in read_jsonl(path):
        try:
            metric.update([line])
        except ValueError as error:
            raise DataError(f"{path}:{number}: {error} (metric {metric_name} reads lines "
                            f"{metric.line_format})") from None
    samples = metric.samples()
    total_lines = len(metric.record_lengths)
    try:
        value = metric.score_samples(samples)
    except ValueError as error:
        raise DataError(f"{path}: {error}") from None
    if math.isnan(value):
        raise DataError(f"{path}: no line carries what metric {metric_name} scores ({metric.line_format})")
    return Score(metric_name, value, metric.count(samples), total_lines - len(samples))
