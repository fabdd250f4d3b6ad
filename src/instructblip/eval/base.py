"""The base of every metric here: a torchmetrics ``Metric`` that keeps one JSON record per sample.

Corpus metrics need every sample at once (CIDEr's document frequencies come from the evaluated set, AUC needs all
scores), and distributed samplers repeat samples to even out ranks. So each metric keeps the samples themselves,
keyed by their id: ``compute()`` gathers them from every process (torchmetrics' own sync), drops repeated ids
(first one wins) and scores the rest with the metric's pure function ``score_samples``.

torchmetrics can only sync tensors, so each sample travels as its UTF-8 JSON bytes in a float tensor, with a second
state holding the byte lengths. Floats, not uint8, because torchmetrics fills the state of a process that saw no
sample with an empty tensor of the metric's float dtype, and a gather of mixed dtypes fails; float32 holds every
byte value and every length below 2**24 exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class SampleMetric(Metric):
    """A metric over per-sample records (dicts with an ``id``); subclasses define ``parse`` and ``score_samples``.

    ``update(samples)`` takes the lines of a predictions file (dicts); ``compute()`` returns the score in percent,
    as the paper reports it, as a float tensor. ``samples()`` returns the de-duplicated samples after sync.
    """

    name: ClassVar[str] = ""
    line_format: ClassVar[str] = ""  # the predictions-file line this metric reads, for error messages and --help

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("record_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("record_lengths", default=[], dist_reduce_fx="cat")

    # -- what subclasses define -------------------------------------------------------------------------------
    def parse(self, line: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one predictions-file line and return the fields this metric keeps (``id`` included).

        Raises ``ValueError`` with a one-line message naming the field and what it must be.
        """
        raise NotImplementedError

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        """The score in percent of the de-duplicated samples."""
        raise NotImplementedError

    def count(self, samples: list[dict[str, Any]]) -> int:
        """How many of the de-duplicated samples the score covers."""
        return len(samples)

    # -- torchmetrics interface -------------------------------------------------------------------------------
    def update(self, samples: Iterable[Mapping[str, Any]]) -> None:
        for line in samples:
            record = self.parse(line)
            raw = json.dumps(record, ensure_ascii=False).encode("utf-8")
            self.record_bytes.append(torch.tensor(list(raw), dtype=torch.float32, device=self.device))
            self.record_lengths.append(torch.tensor([len(raw)], dtype=torch.float32, device=self.device))

    def samples(self) -> list[dict[str, Any]]:
        """Every process's samples (a collective call under DDP), repeated ids dropped, the first kept."""
        with self.sync_context():
            return self._held_samples()

    def _held_samples(self) -> list[dict[str, Any]]:
        """The samples the states hold now (after a sync: every process's), repeated ids dropped."""
        if isinstance(self.record_bytes, list):
            if not self.record_bytes:
                return []
            flat, lengths = dim_zero_cat(self.record_bytes), dim_zero_cat(self.record_lengths)
        else:
            flat, lengths = self.record_bytes, self.record_lengths
        raw = bytes(flat.round().to(torch.uint8).cpu().tolist())
        seen: set[str] = set()
        unique: list[dict[str, Any]] = []
        offset = 0
        for length in lengths.round().long().cpu().tolist():
            record = json.loads(raw[offset : offset + length].decode("utf-8"))
            offset += length
            if record["id"] not in seen:
                seen.add(record["id"])
                unique.append(record)
        return unique

    def compute(self) -> torch.Tensor:
        samples = self._held_samples()  # compute() runs synced already
        score = self.score_samples(samples) if samples else math.nan
        return torch.tensor(score, dtype=torch.float64)


class AnswerLinesMetric(SampleMetric):
    """A metric over lines that pair a predicted text with its reference texts (answers, captions)."""

    line_format = '{"id": str|int, "prediction": str, "references": [str, ...]}'

    def parse(self, line: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": sample_id(line),
            "prediction": text_field(line, "prediction"),
            "references": text_list_field(line, "references"),
        }


# -- field checks shared by the metrics' parse() ----------------------------------------------------------------

def sample_id(line: Mapping[str, Any]) -> str:
    if not isinstance(line, Mapping):
        raise ValueError(f"a line must be a JSON object, got {type(line).__name__}")
    if "id" not in line:
        raise ValueError('missing field "id"')
    value = line["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f'field "id" must be a string or an integer, got {type(value).__name__}')
    return str(value)


def text_field(line: Mapping[str, Any], key: str) -> str:
    if key not in line:
        raise ValueError(f'missing field "{key}"')
    if not isinstance(line[key], str):
        raise ValueError(f'field "{key}" must be a string, got {type(line[key]).__name__}')
    return line[key]


def text_list_field(line: Mapping[str, Any], key: str, min_len: int = 1) -> list[str]:
    if key not in line:
        raise ValueError(f'missing field "{key}"')
    value = line[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'field "{key}" must be a list of strings')
    if len(value) < min_len:
        raise ValueError(f'field "{key}" must hold at least {min_len} string(s), got {len(value)}')
    return value


def number_list_field(line: Mapping[str, Any], key: str) -> list[float]:
    if key not in line:
        raise ValueError(f'missing field "{key}"')
    value = line[key]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value)
    ):
        raise ValueError(f'field "{key}" must be a non-empty list of numbers')
    if not all(math.isfinite(item) for item in value):
        raise ValueError(f'field "{key}" holds a NaN or infinite number')
    return [float(item) for item in value]


def int_field(line: Mapping[str, Any], key: str, low: int, high: int) -> int:
    if key not in line:
        raise ValueError(f'missing field "{key}"')
    value = line[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'field "{key}" must be an integer, got {type(value).__name__}')
    if not low <= value <= high:
        raise ValueError(f'field "{key}" must be in [{low}, {high}], got {value}')
    return value
