"""Visual Dialog's retrieval metrics over ranked answer candidates (the official challenge definitions).

Predictions-file line (one per dialog round)::

    {"id": str|int, "scores": [float, ...] | "ranks": [int, ...], "gt_index": int, "relevance": [float, ...]?}

``scores``: one score per candidate, higher is better (the model's summed log-likelihood); or ``ranks``: the
official submission's 1-based rank of each candidate. ``gt_index``: position of the ground-truth answer among the
candidates (MRR, R@k, mean rank). ``relevance``: the dense annotation of the round (NDCG; rounds without it are
left out of NDCG, as only one round per image is densely annotated). A ``prediction`` field, if present, is
ignored.

Scores become ranks by sorting descending; ties keep candidate order (a stable sort), where the official code
leaves them to torch's sort.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from instructblip.eval.base import SampleMetric, int_field, number_list_field, sample_id


def scores_to_ranks(scores: list[float]) -> list[int]:
    """1-based rank of each candidate: the highest score gets rank 1; ties keep candidate order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks.tolist()


def ndcg(ranks: list[int], relevance: list[float]) -> float:
    """VisDial NDCG: DCG of the k best-ranked candidates over the ideal DCG, k = #candidates with relevance > 0."""
    relevance_arr = np.asarray(relevance, dtype=np.float64)
    k = int(np.count_nonzero(relevance_arr))
    if k == 0:
        return 0.0
    discounts = np.log2(np.arange(k) + 2.0)
    predicted_order = np.argsort(np.asarray(ranks), kind="stable")[:k]
    ideal_order = np.argsort(-relevance_arr, kind="stable")[:k]
    return float((relevance_arr[predicted_order] / discounts).sum() / (relevance_arr[ideal_order] / discounts).sum())


class _RankingMetric(SampleMetric):
    line_format = ('{"id": str|int, "scores": [float, ...] or "ranks": [int, ...], "gt_index": int, '
                   '"relevance": [float, ...] (ndcg)}')
    needs_gt_index = True

    def parse(self, line: Mapping[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"id": sample_id(line)}
        if ("scores" in line) == ("ranks" in line):
            raise ValueError('a ranking line needs exactly one of the fields "scores" or "ranks"')
        if "scores" in line:
            ranks = scores_to_ranks(number_list_field(line, "scores"))
        else:
            ranks = [int(rank) for rank in number_list_field(line, "ranks")]
            if sorted(ranks) != list(range(1, len(ranks) + 1)):
                raise ValueError(f'field "ranks" must be a permutation of 1..{len(ranks)}')
        record["ranks"] = ranks
        if self.needs_gt_index:
            record["gt_index"] = int_field(line, "gt_index", 0, len(ranks) - 1)
        if line.get("relevance") is not None:
            relevance = number_list_field(line, "relevance")
            if len(relevance) != len(ranks):
                raise ValueError(f'field "relevance" has {len(relevance)} values for {len(ranks)} candidates')
            record["relevance"] = relevance
        return record

    def gt_ranks(self, samples: list[dict[str, Any]]) -> np.ndarray:
        return np.asarray([s["ranks"][s["gt_index"]] for s in samples], dtype=np.float64)


class MRR(_RankingMetric):
    """Mean reciprocal rank of the ground-truth answer (VisDial; the paper's Visual Dialog number), x100."""

    name = "mrr"

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        return 100.0 * float(np.mean(1.0 / self.gt_ranks(samples)))


class RecallAtK(_RankingMetric):
    """R@k: percentage of rounds whose ground-truth answer is ranked k or better."""

    def __init__(self, k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = k
        self.name = f"recall_at_{k}"

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        return 100.0 * float(np.mean(self.gt_ranks(samples) <= self.k))


class MeanRank(_RankingMetric):
    """Mean rank of the ground-truth answer (lower is better; reported as is, not in percent)."""

    name = "mean_rank"
    higher_is_better = False

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        return float(np.mean(self.gt_ranks(samples)))


class NDCG(_RankingMetric):
    """VisDial NDCG x100 over the rounds that carry dense ``relevance`` (others are left out)."""

    name = "ndcg"
    needs_gt_index = False

    def count(self, samples: list[dict[str, Any]]) -> int:
        return sum("relevance" in s for s in samples)

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        annotated = [s for s in samples if "relevance" in s]
        if not annotated:
            return math.nan
        return 100.0 * float(np.mean([ndcg(s["ranks"], s["relevance"]) for s in annotated]))
