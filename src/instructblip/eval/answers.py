"""Metrics that compare a predicted answer string with human answers: VQA accuracy, top-1 accuracy, iVQA accuracy.

Predictions-file line for all three: ``{"id": str|int, "prediction": str, "references": [str, ...]}``.
"""

from __future__ import annotations

from typing import Any

from instructblip.errors import ConfigError
from instructblip.eval.base import AnswerLinesMetric
from instructblip.eval.normalization import (
    clean_whitespace,
    normalize_answer,
    normalize_evalai,
    process_punctuation,
)

VQA_RULES = ("official", "lavis", "textvqa")
NORMALIZATIONS = ("vqa", "none")


def leave_one_out_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the humans i of min(1, #{j != i: answers[j] == prediction} / 3), excluded by position.

    With 10 answers and m matches this is 0, .3, .6, .9, 1 for m = 0, 1, 2, 3, >= 4.
    """
    matches = sum(answer == prediction for answer in answers)
    per_human = [min(1.0, (matches - (answer == prediction)) / 3.0) for answer in answers]
    return sum(per_human) / len(per_human)


def vqa_accuracy(prediction: str, answers: list[str], rule: str = "official") -> float:
    """VQA accuracy of one question in [0, 1].

    - ``official``: GT-Vision-Lab's script since 2021: newlines/tabs to spaces and strip on every answer; when the
      human answers are not all identical, the full normalisation on the answers and the prediction; when they
      are all identical, no normalisation at all (so "Yes" scores 0 against ten "yes").
    - ``lavis``: the pre-2021 script that LAVIS ships and InstructBLIP's numbers used: the prediction is always
      normalised; the human answers get only the punctuation step, and only when they disagree.
    - ``textvqa``: MMF's TextVQA evaluator: EvalAI normalisation of the prediction and every answer, always.
    """
    if rule == "official":
        answers = [clean_whitespace(answer) for answer in answers]
        prediction = clean_whitespace(prediction)
        if len(set(answers)) > 1:
            answers = [normalize_answer(answer) for answer in answers]
            prediction = normalize_answer(prediction)
    elif rule == "lavis":
        prediction = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(answer) for answer in answers]
    elif rule == "textvqa":
        answers = [normalize_evalai(answer) for answer in answers]
        prediction = normalize_evalai(prediction)
    else:
        raise ConfigError(f"unknown VQA accuracy rule {rule!r}; allowed: {', '.join(VQA_RULES)}")
    return leave_one_out_accuracy(prediction, answers)


def _normalizer(normalize: str):
    if normalize == "vqa":
        return normalize_answer
    if normalize == "none":
        return lambda text: text
    raise ConfigError(f"unknown normalize {normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")


class _AnswerMetric(AnswerLinesMetric):
    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        return 100.0 * sum(self.score_one(s["prediction"], s["references"]) for s in samples) / len(samples)

    def score_one(self, prediction: str, references: list[str]) -> float:
        raise NotImplementedError


class _NormalizedAnswerMetric(_AnswerMetric):
    """An answer metric that compares texts after ``normalize``: "vqa" (the VQA steps) or "none" (exact)."""

    def __init__(self, normalize: str = "vqa", **kwargs: Any) -> None:
        self._normalize = _normalizer(normalize)
        super().__init__(**kwargs)
        self.normalize = normalize


class VQAAccuracy(_AnswerMetric):
    """VQA accuracy (VQAv2, OK-VQA, VizWiz, TextVQA): leave-one-out over the human answers, see ``vqa_accuracy``.

    ``references`` are all human answers, repeats kept (10 for VQAv2/VizWiz/TextVQA). ``rule``: official |
    lavis | textvqa.
    """

    name = "vqa_accuracy"

    def __init__(self, rule: str = "official", **kwargs: Any) -> None:
        if rule not in VQA_RULES:
            raise ConfigError(f"unknown VQA accuracy rule {rule!r}; allowed: {', '.join(VQA_RULES)}")
        super().__init__(**kwargs)
        self.rule = rule

    def score_one(self, prediction: str, references: list[str]) -> float:
        return vqa_accuracy(prediction, references, self.rule)


class Accuracy(_NormalizedAnswerMetric):
    """Top-1 accuracy: 1 when the prediction equals one of the references (usually one).

    ``normalize="vqa"`` (default) applies the VQA punctuation and digit/article steps to both sides first, as
    LAVIS' GQA task (used for InstructBLIP's GQA and video-QA numbers) does; ``"none"`` is GQA's official exact
    string match. For ranked multiple choice the prediction is the chosen choice text and the reference the
    correct one (ScienceQA, IconQA, VSR and HatefulMemes verbalisers).
    """

    name = "accuracy"

    def score_one(self, prediction: str, references: list[str]) -> float:
        prediction = self._normalize(prediction)
        return float(any(self._normalize(reference) == prediction for reference in references))


class IVQAAccuracy(_NormalizedAnswerMetric):
    """iVQA accuracy (just-ask): min(1, #annotators who gave the prediction / 2) over the 5 answers.

    No leave-one-out. ``normalize="vqa"`` (default) normalises both sides, which changes nothing for answers from
    the iVQA vocabulary (already normalised) and lets generated answers ("Two.") match; ``"none"``: exact.
    """

    name = "ivqa_accuracy"

    def score_one(self, prediction: str, references: list[str]) -> float:
        prediction = self._normalize(prediction)
        matches = sum(self._normalize(reference) == prediction for reference in references)
        return min(1.0, matches / 2.0)
