"""``instructblip-score metric=NAME predictions=FILE.jsonl``: score any model's predictions file.

Each line of the file is one JSON object; the fields depend on the metric (see ``instructblip.eval.metrics``):

- vqa_accuracy, accuracy, ivqa_accuracy, cider: ``{"id", "prediction": str, "references": [str, ...]}``;
- mrr, recall_at_1/5/10, mean_rank, ndcg: ``{"id", "scores": [float per candidate] | "ranks": [int],
  "gt_index": int, "relevance": [float] (ndcg)}``;
- auroc: ``{"id", "score": float, "label": 0|1}``.

Options: ``rule=official|lavis|textvqa`` (vqa_accuracy), ``normalize=vqa|none`` (accuracy, ivqa_accuracy).
The last line of stdout is one JSON object ``{"metric", "score", "n"}``, the score in percent as the paper reports
it. Bad input gives one line on stderr naming the file and line, and exit status 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from instructblip.cli._common import require, run_hydra_app

PROG = "instructblip-score"


@dataclass
class ScoreConfig:
    metric: str = MISSING
    predictions: str = MISSING
    rule: Optional[str] = None       # vqa_accuracy: official | lavis | textvqa
    normalize: Optional[str] = None  # accuracy, ivqa_accuracy: vqa | none


def score(cfg) -> None:
    from instructblip.eval.metrics import METRICS
    from instructblip.eval.predictions import score_file

    require(PROG, cfg, ("metric", "predictions"),
            f"{PROG} metric=NAME predictions=FILE.jsonl (metrics: {', '.join(METRICS)})")
    options = {key: cfg[key] for key in ("rule", "normalize") if cfg[key] is not None}
    result = score_file(cfg.metric, cfg.predictions, **options)
    print(f"{result.metric}: {result.score:.2f} over {result.n} samples from {cfg.predictions}"
          + (f" ({result.duplicates} repeated ids dropped)" if result.duplicates else ""))
    print(json.dumps(result.as_json()))


def main() -> None:
    run_hydra_app(PROG, ScoreConfig, score)


if __name__ == "__main__":
    main()
