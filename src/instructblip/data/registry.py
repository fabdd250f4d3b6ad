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


# The paper's 11 task categories (Figure 2), in its order.
CATEGORIES: tuple[str, ...] = (
    "image captioning",
    "image captioning with reading comprehension",
    "visual reasoning",
    "image question answering",
    "knowledge-grounded image question answering",
    "image question answering with reading comprehension",
    "image question generation",
    "video question answering",
    "visual conversational question answering",
    "image classification",
    "llava-instruct-150k",
)

# Categories with no held-in dataset at all: zero-shot transfer to unseen task types.
FULLY_HELD_OUT_CATEGORIES: tuple[str, ...] = (
    "visual reasoning",
    "video question answering",
    "visual conversational question answering",
    "image classification",
)


def _paper(name, category, held_out, task, metric, method, answer_length, train_split, eval_split, video=False):
    return register(
        DatasetInfo(name, category, held_out, task, metric, method, answer_length, train_split, eval_split, video)
    )


# The 26 datasets as the paper assigns them (reference/instructblip_lavis.md §3.1, §3.4; datasets_metrics.md §1).
# Splits are spelled as each dataset's own files spell them. Held-in: the train split feeds the mixture, the eval
# split (where the paper evaluates held-in data) is for held-in evaluation; the QG variants, Web CapFilt and the
# LLaVA subsets are training-only (eval_split None; their metric is the one a held-in evaluation would use).
# Held-out: never trained on (train_split None), evaluated zero-shot on the split the paper reports.
# Method "rank" = vocabulary ranking over candidates, the paper's choice for classification and multiple choice
# (ScienceQA, IconQA, HatefulMemes, Visual Dialog, MSVD-QA, MSRVTT-QA; A-OKVQA's MC variant is scored from the
# same records); everything else is generated.
_C = CATEGORIES
# -------- held-in (13) ----------------------------------------------------------------------------------------------
_paper("coco_caption", _C[0], False, "caption", "cider", "generate", "short", "train+restval", "test")
_paper("web_capfilt", _C[0], False, "caption", "cider", "generate", "short", "train", None)
_paper("textcaps", _C[1], False, "caption", "cider", "generate", "short", "train", "val")
_paper("vqav2", _C[3], False, "vqa", "vqa_accuracy", "generate", "short", "train2014", "val2014")
_paper("okvqa", _C[4], False, "vqa", "vqa_accuracy", "generate", "short", "train2014", "val2014")
_paper("aokvqa", _C[4], False, "vqa", "vqa_accuracy", "generate", "short", "train", "val")
_paper("ocr_vqa", _C[5], False, "vqa", "accuracy", "generate", "short", "train", "test")
_paper("vqav2_qg", _C[6], False, "qg", "cider", "generate", "short", "train2014", None)
_paper("okvqa_qg", _C[6], False, "qg", "cider", "generate", "short", "train2014", None)
_paper("aokvqa_qg", _C[6], False, "qg", "cider", "generate", "short", "train", None)
_paper("llava_conversation", _C[10], False, "conversation", "cider", "generate", "long", "train", None)
_paper("llava_detail", _C[10], False, "conversation", "cider", "generate", "long", "train", None)
_paper("llava_complex_reasoning", _C[10], False, "conversation", "cider", "generate", "long", "train", None)
# -------- held-out (13) ---------------------------------------------------------------------------------------------
_paper("nocaps", _C[0], True, "caption", "cider", "generate", "short", None, "val")
_paper("flickr30k", _C[0], True, "caption", "cider", "generate", "short", None, "test")
_paper("gqa", _C[2], True, "vqa", "accuracy", "generate", "short", None, "testdev_balanced")
_paper("vsr", _C[2], True, "classification", "accuracy", "generate", "short", None, "test")
_paper("iconqa", _C[2], True, "mc", "accuracy", "rank", "short", None, "test")
_paper("vizwiz", _C[3], True, "vqa", "vqa_accuracy", "generate", "short", None, "test")
_paper("scienceqa", _C[4], True, "mc", "accuracy", "rank", "short", None, "test")
_paper("textvqa", _C[5], True, "vqa", "vqa_accuracy", "generate", "short", None, "val")
_paper("msvd_qa", _C[7], True, "video_qa", "accuracy", "rank", "short", None, "test", video=True)
_paper("msrvtt_qa", _C[7], True, "video_qa", "accuracy", "rank", "short", None, "test", video=True)
_paper("ivqa", _C[7], True, "video_qa", "ivqa_accuracy", "generate", "short", None, "test", video=True)
_paper("visdial", _C[8], True, "dialog", "mrr", "rank", "short", None, "val")
_paper("hateful_memes", _C[9], True, "classification", "auroc", "rank", "short", None, "dev_seen")
del _C

PAPER_DATASETS: tuple[str, ...] = tuple(DATASETS)
