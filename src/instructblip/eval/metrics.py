"""The metric registry: every metric ``instructblip-score`` and the held-out runner know, by name.

``build_metric(name, **options)`` returns a fresh torchmetrics ``Metric`` (a ``SampleMetric``); options are the
metric's own keyword arguments (``rule`` for vqa_accuracy, ``normalize`` for accuracy and ivqa_accuracy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from instructblip.errors import ConfigError
from instructblip.eval.answers import Accuracy, IVQAAccuracy, VQAAccuracy
from instructblip.eval.auroc import AUROC
from instructblip.eval.base import SampleMetric
from instructblip.eval.cider import CIDEr
from instructblip.eval.ranking import MRR, NDCG, MeanRank, RecallAtK

METRICS: dict[str, Callable[..., SampleMetric]] = {
    "vqa_accuracy": VQAAccuracy,
    "cider": CIDEr,
    "accuracy": Accuracy,
    "ivqa_accuracy": IVQAAccuracy,
    "mrr": MRR,
    "recall_at_1": lambda **kw: RecallAtK(k=1, **kw),
    "recall_at_5": lambda **kw: RecallAtK(k=5, **kw),
    "recall_at_10": lambda **kw: RecallAtK(k=10, **kw),
    "mean_rank": MeanRank,
    "ndcg": NDCG,
    "auroc": AUROC,
}

# Metrics reported alongside a dataset's main metric, computed from the same predictions lines.
COMPANIONS: dict[str, tuple[str, ...]] = {
    "mrr": ("recall_at_1", "recall_at_5", "recall_at_10", "mean_rank", "ndcg"),
}


def build_metric(name: str, **options: Any) -> SampleMetric:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    try:
        return METRICS[name](**options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # an option the metric does not take
        raise ConfigError(f"metric {name!r} does not take options {sorted(options)}: {error}") from None
