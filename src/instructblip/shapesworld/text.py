"""The world's text: what the tiny LLM reads in its text-only pretraining, and what its tokenizer is trained on.

A real LLM has read descriptions of scenes and answered questions about text it was given long before it meets a
Q-Former. The miniature does the same, with text only: every document is a scene written out in words (the
``context`` of a task example, see ``tasks``), then the task's instruction and its answer::

    <context>  BOS  <instruction> <answer> EOS

The scene text stands *before* BOS, exactly where the projected query embeddings stand in InstructBLIP's
``[queries] BOS instruction answer`` layout: what the LLM learns here is to answer an instruction about whatever
precedes BOS; the Q-Former later learns to put the scene there from pixels.

Instructions come from the project's own templates (``instructblip.data.templates``): the training templates for
held-in task families, and the fixed evaluation prompt for held-out datasets (their families have no training
templates that fit ShapesWorld). No image is ever involved, so the held-out datasets stay zero-shot for the
multimodal model: the LLM knows the question formats, not the pictures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from instructblip.data import templates
from instructblip.shapesworld import tasks


@dataclass
class Document:
    context: str
    instruction: str
    answer: str


def documents(n: int, seed: int, names: list[str] | None = None) -> list[Document]:
    """``n`` documents spread evenly over ``names`` (default: every ShapesWorld dataset), split ``"lm"``."""
    names = names or list(tasks.TASKS)
    rng = random.Random(f"{seed}/text")
    out = []
    for index in range(n):
        name = names[index % len(names)]
        record, _, context = tasks.build(name, "lm", index, seed)
        info = tasks.TASKS[name].info
        instruction, answer = (templates.render_evaluation(record) if info.held_out
                               else templates.render(record, rng))
        out.append(Document(context, instruction, answer))
    return out


def tokenizer_corpus(docs: list[Document]):
    """Every string the LLM tokenizer must cover: the documents, all templates and prompts, the world's words."""
    for doc in docs:
        yield doc.context
        yield doc.instruction
        yield doc.answer
    for family in templates.TEMPLATES.values():
        yield from family
    yield from templates.EVALUATION_PROMPTS.values()
