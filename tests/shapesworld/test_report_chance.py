"""The report's chance levels and their spreads: each spread is what a chance-level model's score scatters by on the
same records, checked against that model simulated; the summary counts a task clearly above chance only past
``CLEAR_MARGIN_SD`` of them."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

import data_prep
from instructblip.shapesworld.report import CLEAR_MARGIN_SD, Chance, _records, chance


def _auc(scores: list[float], labels: list[int]) -> float:
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return 100 * wins / (len(positives) * len(negatives))


def _simulated(name: str, records, rng: random.Random) -> float:
    """One chance-level model's score on ``records``, drawn as ``chance`` defines that model."""
    if name == "shapesworld_binary":
        return _auc([rng.random() for _ in records], [r.label for r in records])
    if name == "shapesworld_dialog":   # the answer lands at a uniformly random rank among the candidates
        return 100 * statistics.fmean(1 / rng.randint(1, len(r.candidates)) for r in records)
    if name == "shapesworld_mc":       # a uniform choice among the candidates
        return 100 * statistics.fmean(rng.random() < 1 / len(r.choices or r.candidates) for r in records)
    # right as often as always giving the most frequent answer
    p = Counter(r.answers[0] for r in records).most_common(1)[0][1] / len(records)
    return 100 * statistics.fmean(rng.random() < p for _ in records)


@pytest.mark.parametrize("name", ["shapesworld_spatial", "shapesworld_mc", "shapesworld_binary",
                                  "shapesworld_dialog"])
def test_the_spread_is_a_chance_level_models(tmp_path, name):
    data_prep.convert(name, None, tmp_path, split="test", shard_size=100, n=120, seed=0, progress=False)
    level = chance(tmp_path, name, 120)
    assert level.level is not None and level.sd is not None and level.sd > 0
    records = list(_records(tmp_path, name, "test", 120))
    rng = random.Random(0)
    draws = [_simulated(name, records, rng) for _ in range(1500)]
    assert statistics.fmean(draws) == pytest.approx(level.level, abs=0.2 * level.sd), level
    assert statistics.stdev(draws) == pytest.approx(level.sd, rel=0.1), level


def test_margin_in_sds_and_no_margin_without_a_level():
    spatial = Chance(54.5, "always answering the most frequent answer ('true')", 3.5)
    assert spatial.margin_sd(61.0) == pytest.approx(6.5 / 3.5)          # session 21's spatial: under two
    assert spatial.margin_sd(54.5 + CLEAR_MARGIN_SD * 3.5) == pytest.approx(CLEAR_MARGIN_SD)
    assert Chance(None, "no chance level for a text-similarity metric").margin_sd(300.0) is None
