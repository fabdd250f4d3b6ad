"""The paper's zero-shot numbers on the 13 held-out datasets (Table 1, InstructBLIP rows), as data.

Source: reference/instructblip_lavis.md §3.5 (two independent sources agree; MSVD/MSRVTT/iVQA from one). Metrics as
the paper reports them: CIDEr for NoCaps and Flickr30K, MRR for Visual Dialog, AUC for HatefulMemes, iVQA accuracy
for iVQA, top-1 / VQA accuracy for the rest; all in percent (CIDEr x100). Keys are registry dataset names.
"""

from __future__ import annotations

COLUMNS: tuple[str, ...] = (
    "nocaps", "flickr30k", "gqa", "vsr", "iconqa", "textvqa", "visdial", "hateful_memes", "vizwiz", "scienceqa",
    "msvd_qa", "msrvtt_qa", "ivqa",
)

_ROWS: dict[str, tuple[float, ...]] = {
    "flant5xl": (119.9, 84.5, 48.4, 64.8, 50.0, 46.6, 46.6, 56.6, 32.7, 70.4, 43.4, 25.0, 53.1),
    "flant5xxl": (120.0, 83.5, 47.9, 65.6, 51.2, 46.6, 48.5, 54.1, 30.9, 70.6, 44.3, 25.6, 53.8),
    "vicuna7b": (123.1, 82.4, 49.2, 54.3, 43.1, 50.1, 45.2, 59.6, 34.5, 60.5, 41.8, 22.1, 52.2),
    "vicuna13b": (121.9, 82.8, 49.5, 52.1, 44.8, 50.7, 45.4, 57.5, 33.4, 63.1, 41.2, 24.8, 51.0),
}

#: model name -> {dataset: score}
PAPER_ZERO_SHOT: dict[str, dict[str, float]] = {
    model: dict(zip(COLUMNS, row, strict=True)) for model, row in _ROWS.items()
}

#: Display names of the paper's models.
MODEL_NAMES: dict[str, str] = {
    "flant5xl": "InstructBLIP (FlanT5-XL)",
    "flant5xxl": "InstructBLIP (FlanT5-XXL)",
    "vicuna7b": "InstructBLIP (Vicuna-7B)",
    "vicuna13b": "InstructBLIP (Vicuna-13B)",
}

# Spellings of each model in checkpoint names (HF hub ids, LAVIS model types, directory names).
_ALIASES: dict[str, tuple[str, ...]] = {
    "flant5xxl": ("flant5xxl", "flan-t5-xxl", "flan_t5_xxl"),
    "flant5xl": ("flant5xl", "flan-t5-xl", "flan_t5_xl"),
    "vicuna13b": ("vicuna13b", "vicuna-13b", "vicuna_13b"),
    "vicuna7b": ("vicuna7b", "vicuna-7b", "vicuna_7b"),
}


def guess_paper_model(checkpoint: str) -> str | None:
    """The paper model a checkpoint name spells (``Salesforce/instructblip-vicuna-7b`` -> ``vicuna7b``), or None.

    The XXL spellings are tested before XL, which they contain.
    """
    lowered = checkpoint.lower()
    for model, spellings in _ALIASES.items():
        if any(spelling in lowered for spelling in spellings):
            return model
    return None


def paper_score(model: str | None, dataset: str) -> float | None:
    if model is None:
        return None
    return PAPER_ZERO_SHOT[model].get(dataset)
