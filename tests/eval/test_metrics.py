"""Each metric on worked examples derived by hand from the official definitions."""

import math

import pytest

from instructblip.errors import ConfigError
from instructblip.eval.answers import leave_one_out_accuracy, vqa_accuracy
from instructblip.eval.cider import cider_d
from instructblip.eval.metrics import METRICS, build_metric
from instructblip.eval.ranking import ndcg, scores_to_ranks


def lines(*rows):
    return [dict(id=str(i), **row) for i, row in enumerate(rows)]


# -- VQA accuracy -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0),
                                               (6, 1.0), (7, 1.0), (8, 1.0), (9, 1.0), (10, 1.0)])
@pytest.mark.parametrize("rule", ["official", "lavis", "textvqa"])
def test_every_count_of_matching_humans(matches, expected, rule):
    answers = ["cat"] * matches + [f"dog{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", answers, rule) == pytest.approx(expected)


def test_leave_one_out_is_by_position():
    # m=3 of 10: 7 humans see 3 matches (1.0), 3 humans see 2 (2/3) -> (7 + 2) / 10
    assert leave_one_out_accuracy("x", ["x"] * 3 + ["y"] * 7) == pytest.approx(0.9)
    # shorter answer lists (LAVIS files) use the same rule over what is there
    assert leave_one_out_accuracy("x", ["x", "y", "z"]) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)


@pytest.mark.parametrize(
    "answers, prediction, official, lavis, textvqa",
    [
        (["2"] * 10, "two", 0.0, 1.0, 1.0),
        (["2"] * 10, "2.", 0.0, 1.0, 1.0),
        (["yes"] * 10, "Yes", 0.0, 1.0, 1.0),
        (["yes"] * 9 + ["no"], "Yes", 1.0, 1.0, 1.0),
        (["red"] + ["blue"] * 9, "red", 0.3, 0.3, 0.3),
        # GT that disagree: official normalises them fully, LAVIS only their punctuation
        (["two"] * 4 + ["2"] * 6, "2", 1.0, 1.0, 1.0),
        (["two"] * 9 + ["three"], "2", 1.0, 0.0, 1.0),
        # scene text: ',' and '?' deleted by EvalAI before the punctuation step
        (["dakota digital"] * 3 + ["nous"] * 7, "Dakota, digital?", 0.9, 0.9, 0.9),
    ],
)
def test_unanimous_and_disagreeing_answers_under_each_rule(answers, prediction, official, lavis, textvqa):
    assert vqa_accuracy(prediction, answers, "official") == pytest.approx(official)
    assert vqa_accuracy(prediction, answers, "lavis") == pytest.approx(lavis)
    assert vqa_accuracy(prediction, answers, "textvqa") == pytest.approx(textvqa)


def test_vqa_accuracy_metric_in_percent():
    metric = build_metric("vqa_accuracy", rule="lavis")
    metric.update(lines({"prediction": "Two", "references": ["2"] * 10},
                        {"prediction": "red", "references": ["red"] + ["blue"] * 9}))
    assert metric.compute().item() == pytest.approx(100 * (1.0 + 0.3) / 2)
    with pytest.raises(ConfigError, match="official, lavis, textvqa"):
        build_metric("vqa_accuracy", rule="strict")


# -- top-1 and iVQA accuracy -------------------------------------------------------------------------------------

def test_accuracy_normalised_and_exact():
    rows = lines({"prediction": "The bedroom.", "references": ["bedroom"]},
                 {"prediction": "yes", "references": ["no"]},
                 {"prediction": "true", "references": ["yes", "true"]})
    normalised, exact = build_metric("accuracy"), build_metric("accuracy", normalize="none")
    normalised.update(rows)
    exact.update(rows)
    assert normalised.compute().item() == pytest.approx(200 / 3)
    assert exact.compute().item() == pytest.approx(100 / 3)


def test_ivqa_accuracy():
    refs = ["dog", "dog", "puppy", "cat", "dog"]
    metric = build_metric("ivqa_accuracy")
    metric.update(lines({"prediction": "Dog", "references": refs},     # 3 annotators -> 1
                        {"prediction": "puppy", "references": refs},   # 1 -> 0.5
                        {"prediction": "horse", "references": refs}))  # 0 -> 0
    assert metric.compute().item() == pytest.approx(100 * 1.5 / 3)


# -- CIDEr-D: idf from the evaluated set, by hand ----------------------------------------------------------------

def test_cider_matches_hand_computation_and_idf_comes_from_the_evaluated_set():
    penalty = math.exp(-1 / 72)  # hypothesis "a cat" has 1 bigram, reference "a cat sits" 2: delta -1, sigma 6
    # Two images: "a" is in both reference sets (df=2, idf log2-log2=0), every other n-gram in one (idf log 2).
    # A: 1-grams {a:0, cat:L} vs {a:0, cat:L, sits:L} -> 1/sqrt2; 2-grams the same; 3-, 4-grams empty -> 0.
    # B: identical caption, 1- to 3-grams cosine 1, no 4-gram -> 0.
    score_a = 10 * (2 / math.sqrt(2)) * penalty / 4
    score_b = 10 * 3 / 4
    predictions = {"A": "A cat.", "B": "a dog runs"}
    references = {"A": ["a cat sits"], "B": ["A dog runs!"]}
    corpus, per_image = cider_d(predictions, references)
    assert per_image["A"] == pytest.approx(score_a, rel=1e-12)
    assert per_image["B"] == pytest.approx(score_b, rel=1e-12)
    assert corpus == pytest.approx((score_a + score_b) / 2, rel=1e-12)

    # A third image with "cat" and "a cat" in its references changes A's idf weights: N=3, so
    # w1 = log 3 (df 1: "sits", "cat sits") and w2 = log 3 - log 2 (df 2: "cat", "a cat").
    w1, w2 = math.log(3), math.log(3) - math.log(2)
    score_a3 = 10 * 2 * (w2 / math.sqrt(w1 ** 2 + w2 ** 2)) * penalty / 4
    _, per_image3 = cider_d({**predictions, "C": "a cat runs"}, {**references, "C": ["a cat runs"]})
    assert per_image3["A"] == pytest.approx(score_a3, rel=1e-12)
    assert per_image3["A"] != pytest.approx(score_a)

    metric = build_metric("cider")
    metric.update([{"id": k, "prediction": v, "references": references[k]} for k, v in predictions.items()])
    assert metric.compute().item() == pytest.approx(100 * (score_a + score_b) / 2, rel=1e-12)


# -- Visual Dialog -----------------------------------------------------------------------------------------------

def test_scores_to_ranks_with_ties():
    assert scores_to_ranks([0.1, 0.9, 0.5, 0.5]) == [4, 1, 2, 3]


def test_visdial_sparse_metrics():
    rows = [{"id": "r1", "scores": [0.1, 0.9, 0.5, 0.5], "gt_index": 2},   # gt rank 2
            {"id": "r2", "ranks": [4, 1, 2, 3], "gt_index": 0},            # gt rank 4
            {"id": "r3", "scores": [3.0, 2.0, 1.0, 0.0], "gt_index": 0}]   # gt rank 1
    expected = {"mrr": 100 * (1 / 2 + 1 / 4 + 1) / 3, "recall_at_1": 100 / 3, "recall_at_5": 100.0,
                "recall_at_10": 100.0, "mean_rank": (2 + 4 + 1) / 3}
    for name, value in expected.items():
        metric = build_metric(name)
        metric.update(rows)
        assert metric.compute().item() == pytest.approx(value), name


def test_visdial_ndcg_truncates_at_the_number_of_relevant_candidates():
    ranks = [4, 1, 2, 3]  # predicted order: 1, 2, 3, 0
    assert ndcg(ranks, [0, 1, 0.5, 0]) == pytest.approx(1.0)
    assert ndcg(ranks, [1, 0, 0, 0.5]) == pytest.approx(0.0)  # k=2: the two best-ranked have no relevance
    idcg = 1 + 1 / math.log2(3)
    assert ndcg(ranks, [0, 0, 1, 1]) == pytest.approx((1 / math.log2(3)) / idcg)
    metric = build_metric("ndcg")
    metric.update([{"id": "a", "ranks": ranks, "relevance": [0, 0, 1, 1]},
                   {"id": "b", "ranks": ranks, "relevance": [0, 1, 0.5, 0]},
                   {"id": "c", "ranks": ranks, "gt_index": 0}])  # no dense annotation: not in NDCG
    samples = metric.samples()
    assert metric.count(samples) == 2
    assert metric.compute().item() == pytest.approx(100 * ((1 / math.log2(3)) / idcg + 1) / 2)


# -- AUROC ---------------------------------------------------------------------------------------------------------

def test_auroc_counts_tied_scores_half():
    # positive scores {0.5, 0.9}, negative {0.5, 0.2}: pairs 0.5 (tie) + 1 + 1 + 1 over 4
    metric = build_metric("auroc")
    metric.update([{"id": 1, "score": 0.5, "label": 1}, {"id": 2, "score": 0.5, "label": 0},
                   {"id": 3, "score": 0.9, "label": 1}, {"id": 4, "score": 0.2, "label": 0}])
    assert metric.compute().item() == pytest.approx(87.5)
    one_class = build_metric("auroc")
    one_class.update([{"id": 1, "score": 0.5, "label": 1}])
    with pytest.raises(ValueError, match="both labels"):
        one_class.compute()


# -- shared behaviour ----------------------------------------------------------------------------------------------

def test_repeated_ids_are_dropped_first_kept():
    metric = build_metric("accuracy")
    metric.update([{"id": "q1", "prediction": "a", "references": ["a"]},
                   {"id": "q2", "prediction": "b", "references": ["c"]},
                   {"id": "q1", "prediction": "wrong", "references": ["a"]}])
    assert len(metric.samples()) == 2
    assert metric.compute().item() == pytest.approx(50.0)


def test_registry_names_and_bad_lines():
    assert {"vqa_accuracy", "cider", "accuracy", "ivqa_accuracy", "mrr", "recall_at_1", "recall_at_5",
            "recall_at_10", "mean_rank", "ndcg", "auroc"} <= set(METRICS)
    with pytest.raises(ConfigError, match="known metrics: vqa_accuracy"):
        build_metric("bleu")
    with pytest.raises(ValueError, match='missing field "references"'):
        build_metric("vqa_accuracy").update([{"id": 1, "prediction": "x"}])
    with pytest.raises(ValueError, match='exactly one of the fields "scores" or "ranks"'):
        build_metric("mrr").update([{"id": 1, "gt_index": 0}])
    with pytest.raises(ValueError, match='"gt_index" must be in'):
        build_metric("mrr").update([{"id": 1, "scores": [1.0, 2.0], "gt_index": 2}])
    assert math.isnan(build_metric("accuracy").compute().item())
