"""Area under the ROC curve of a continuous score (HatefulMemes), with scikit-learn's ``roc_auc_score``.

Predictions-file line: ``{"id": str|int, "score": float, "label": 0|1}``; ``score`` is the model's continuous
"positive" score (the runner writes log p(positive verbalisers) - log p(negative verbalisers)); a thresholded
yes/no would collapse the curve to one point. Tied scores count half, as sklearn's trapezoidal rule gives. A
``prediction`` field, if present, is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sklearn.metrics import roc_auc_score

from instructblip.eval.base import SampleMetric, int_field, sample_id


class AUROC(SampleMetric):
    """AUC-ROC x100 of ``score`` against the binary ``label``; ValueError when only one label occurs."""

    name = "auroc"
    line_format = '{"id": str|int, "score": float, "label": 0|1}'

    def parse(self, line: Mapping[str, Any]) -> dict[str, Any]:
        record_id = sample_id(line)
        if "score" not in line:
            raise ValueError('missing field "score"')
        score = line["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f'field "score" must be a finite number, got {score!r}')
        return {"id": record_id, "score": float(score), "label": int_field(line, "label", 0, 1)}

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        labels = [s["label"] for s in samples]
        if len(set(labels)) < 2:
            raise ValueError(f"AUC-ROC needs both labels 0 and 1 among the samples; all {len(labels)} are "
                             f"{labels[0]}")
        return 100.0 * float(roc_auc_score(labels, [s["score"] for s in samples]))
