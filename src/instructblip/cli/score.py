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
import sys
from dataclasses import dataclass
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from instructblip.errors import InstructBlipError
from instructblip.eval.metrics import METRICS


@dataclass
class ScoreConfig:
    metric: str = MISSING
    predictions: str = MISSING
    rule: Optional[str] = None       # vqa_accuracy: official | lavis | textvqa
    normalize: Optional[str] = None  # accuracy, ivqa_accuracy: vqa | none


ConfigStore.instance().store(name="score_schema", node=ScoreConfig)
ConfigStore.instance().store(
    name="score",
    node={
        "defaults": ["score_schema", {"override hydra/job_logging": "none"},
                     {"override hydra/hydra_logging": "none"}, "_self_"],
        # A scoring command writes nothing but its answer: no output directory, no logs.
        "hydra": {"run": {"dir": "."}, "output_subdir": None},
    },
)


def _fail(message: str) -> None:
    print(f"instructblip-score: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_name="score")
def main(cfg: DictConfig) -> None:
    from instructblip.eval.predictions import score_file

    for key in ("metric", "predictions"):
        if OmegaConf.is_missing(cfg, key):
            _fail(f"{key}= is required; usage: instructblip-score metric=NAME predictions=FILE.jsonl "
                  f"(metrics: {', '.join(METRICS)})")
    options = {key: cfg[key] for key in ("rule", "normalize") if cfg[key] is not None}
    try:
        result = score_file(cfg.metric, cfg.predictions, **options)
    except (InstructBlipError, OSError, ValueError) as error:
        _fail(str(error))
    print(f"{result.metric}: {result.score:.2f} over {result.n} samples from {cfg.predictions}"
          + (f" ({result.duplicates} repeated ids dropped)" if result.duplicates else ""))
    print(json.dumps(result.as_json()))


if __name__ == "__main__":
    main()
