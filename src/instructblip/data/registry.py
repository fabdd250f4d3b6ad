"""The task registry: every dataset the project knows, with the facts the recipe and the evaluation need.

``DATASETS`` maps the dataset name (lower snake case, as ``instructblip-prep dataset=list`` prints it) to its
:class:`DatasetInfo`. The 26 datasets of the paper are listed here; ShapesWorld registers its own through
:func:`register`, so that the real and the miniature recipe go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str                 # registry name, e.g. "vqav2"
    category: str             # one of the paper's 11 task categories (or a ShapesWorld category)
    held_out: bool            # True: zero-shot evaluation only; False: its train split is in the mixture
    task: str                 # task family of its records (see instructblip.data.record)
    metric: str               # the metric name instructblip-score knows (vqa_accuracy, cider, accuracy, ...)
    method: str               # "generate" or "rank" (vocabulary ranking over candidates)
    answer_length: str        # "short" or "long": selects templates and generation lengths
    train_split: str | None   # split whose records go into the training mixture (None for held-out)
    eval_split: str | None    # split the evaluation uses
    video: bool = False
    world: str = "real"       # "real" or "shapesworld"


DATASETS: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    if info.name in DATASETS and DATASETS[info.name] != info:
        raise ValueError(f"dataset {info.name!r} is already registered with different facts")
    if info.method not in ("generate", "rank"):
        raise ValueError(f"dataset {info.name!r}: method must be 'generate' or 'rank', got {info.method!r}")
    DATASETS[info.name] = info
    return info


def get(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise KeyError(f"unknown dataset {name!r}; known datasets: {known}") from None
