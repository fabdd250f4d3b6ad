"""The shard format: what every converter writes and every reader, template and metric reads.

One WebDataset sample per example. Its members:

- ``jpg`` (or ``png``): the encoded image, for image datasets;
- ``frame0.jpg`` ... ``frame{T-1}.jpg``: the frames of a video, sampled at prep time (training never decodes video);
- ``json``: one :class:`Record`, serialised with :meth:`Record.to_json`.

The record holds the *facts* of the example, never an instruction: templates turn a record into (instruction,
target) pairs at load time, so that the template draw stays a training-time choice (seeded) and the evaluation
prompt stays fixed.

Field use by task family (``task`` names the family, see ``instructblip.data.registry``):

=================  ===========================================================================================
caption            ``answers``: every reference caption (``ocr_tokens`` for TextCaps)
vqa                ``question``; ``answers``: every human answer, repeats kept (VQAv2/OKVQA/TextVQA/VizWiz:
                   10 entries), so counts are recoverable; ``ocr_tokens`` for scene-text datasets
qg                 ``question`` is the *target*; ``answers`` hold the answer the question must lead to
mc                 ``question``; ``choices``; ``answer_index``; ``answers`` = [the correct choice text];
                   ``context`` for ScienceQA's lecture/hint
classification     ``text`` (the meme text); ``label`` (0/1); ``answers`` = the label's verbaliser
dialog             ``question``; ``dialog_history``: earlier rounds as [{"question", "answer"}]; ``caption``;
                   ``candidates`` (100 for VisDial); ``answer_index`` (train) ; ``relevance`` (val dense
                   annotations, when present)
conversation       ``conversation``: turns [{"from": "human"|"gpt", "value": str}], all turns kept
video_qa           ``question``; ``answers``; ``num_frames``
=================  ===========================================================================================
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RECORD_VERSION = 1


@dataclass
class Record:
    dataset: str                      # registry name, e.g. "vqav2"
    task: str                         # task family (see table above)
    id: str                           # unique within the dataset and split; also the WebDataset __key__ stem
    split: str                        # the split name the dataset's own files use (train2014, val, test, ...)
    image_id: str | None = None       # the dataset's own image identifier (file name or numeric id)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    answer_index: int | None = None
    context: str | None = None
    caption: str | None = None
    text: str | None = None
    label: int | None = None
    ocr_tokens: list[str] | None = None
    dialog_history: list[dict[str, str]] | None = None
    candidates: list[str] | None = None
    relevance: list[float] | None = None
    conversation: list[dict[str, str]] | None = None
    num_frames: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # dataset-specific facts worth keeping (difficulty, ...)
    version: int = RECORD_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes | str | dict) -> "Record":
        """Parse a record; raises ``ValueError`` naming the problem (never KeyError soup)."""
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8")
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
        if not isinstance(data, dict):
            raise ValueError(f"record is a {type(data).__name__}, expected a JSON object")
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("dataset", "task", "id", "split") if name not in data]
        if missing:
            raise ValueError(f"record lacks required field(s) {missing}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"record has unknown field(s) {unknown}")
        return cls(**data)
