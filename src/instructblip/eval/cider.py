"""CIDEr-D exactly as the COCO caption evaluation computes it: pycocoevalcap's PTB tokenizer, then its ``Cider``.

pycocoevalcap's ``Cider`` is CIDEr-D (1- to 4-grams, Gaussian length penalty with sigma 6, clipped counts, x10),
with document frequencies taken from the references of the images being scored. So a score depends on the whole
evaluated set, and a subset's score is not the mean of per-image scores of a larger run.

The tokenizer is Stanford's PTBTokenizer (a jar bundled with pycocoevalcap), so Java must be on PATH; it writes a
temporary file next to the jar, so the installed package directory must be writable.

Predictions-file line: ``{"id": str|int, "prediction": str, "references": [str, ...]}``, one line per image.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from instructblip.errors import ConfigError
from instructblip.eval.base import AnswerLinesMetric


def _check_java() -> None:
    if shutil.which("java") is None:
        raise ConfigError(
            "CIDEr needs Java for pycocoevalcap's PTB tokenizer and none is on PATH; install a JRE "
            "(Debian/Ubuntu: apt-get install default-jre-headless) and retry"
        )


def cider_d(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D (pycocoevalcap scale, e.g. 1.234) and per-image scores, for raw (untokenised) captions."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer import ptbtokenizer

    _check_java()
    package_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    if not os.access(package_dir, os.W_OK):
        raise ConfigError(f"pycocoevalcap's PTB tokenizer writes its temporary file into {package_dir}, "
                          "which is not writable; install the package in a writable environment")
    ids = list(predictions)
    tokenizer = ptbtokenizer.PTBTokenizer()
    tokenized_refs = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    tokenized_hyps = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    corpus, per_image = Cider().compute_score(tokenized_refs, tokenized_hyps)
    return float(corpus), {i: float(s) for i, s in zip(ids, per_image)}


class CIDEr(AnswerLinesMetric):
    """CIDEr-D (NoCaps, Flickr30K, COCO, TextCaps) in the paper's scale (pycocoevalcap's value x 100).

    ``references`` are all reference captions of the image; ``prediction`` the generated caption.
    """

    name = "cider"

    def score_samples(self, samples: list[dict[str, Any]]) -> float:
        corpus, _ = cider_d({s["id"]: s["prediction"] for s in samples},
                            {s["id"]: s["references"] for s in samples})
        return 100.0 * corpus
