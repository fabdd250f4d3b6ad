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
import re
from dataclasses import dataclass

from instructblip.data import templates
from instructblip.shapesworld import tasks, world


# the datasets whose questions may look one object up (tasks.question_focus)
FOCUSABLE = ("shapesworld_vqa", "shapesworld_ocr_vqa")


@dataclass
class Document:
    context: str
    instruction: str
    answer: str
    # a judgement of where one shape lies: a spatial statement (true / false) or a VQA side question (yes / no)
    judged: bool = False


def documents(n: int, seed: int, names: list[str] | None = None, unmarked_words: float = 0.0,
              shuffled_objects: float = 0.0, focused_contexts: float = 0.0) -> list[Document]:
    """``n`` documents spread evenly over ``names`` (default: every ShapesWorld dataset), split ``"lm"``.

    In a share ``unmarked_words`` of them the scene text names its written word without the ``word`` before it
    ("dog bottom." for "word dog bottom."): the LLM then learns to find the word by what it is, not only by the
    token before it, which the Q-Former's query embeddings do not reproduce.

    In a share ``shuffled_objects`` of them the scene text lists its objects in a random order instead of cell by
    cell (:func:`shuffle_objects`): the LLM then finds an object by its words, not by where in the text it stands,
    and the Q-Former's queries carry no cell order either. Its draws come from a random stream of their own, so
    the documents' instructions and answers are those of ``shuffled_objects=0``.

    In a share ``focused_contexts`` of the documents whose question looks one thing up (VQA's colour, shape, size
    and cell questions; OCR's) the scene text holds only what the question is about (:func:`tasks.question_focus`),
    and so in that share of the spatial statements (:func:`tasks.statement_focus`): the LLM then answers from a part
    of a scene as well as from a whole one, which is what an instruction-aware Q-Former can hand it. Its draws come
    from a stream of their own too.

    ``"shapesworld_vqa/<kind>"`` names VQA documents that all ask one sort of question (a kind of
    :data:`tasks.QUESTION_KINDS`): the LLM's pretraining curriculum introduces its lookups one at a time."""
    names = names or list(tasks.TASKS)
    rng = random.Random(f"{seed}/text")
    order_rng = random.Random(f"{seed}/object-order")
    focus_rng = random.Random(f"{seed}/focus")
    out = []
    for index in range(n):
        name, _, kind = names[index % len(names)].partition("/")
        if kind:
            record, context = _asking(name, kind, index, seed, rng)
        else:
            record, _, context = tasks.build(name, "lm", index, seed)
        info = tasks.TASKS[name].info
        instruction, answer = (templates.render_evaluation(record) if info.held_out
                               else templates.render(record, rng))
        if focused_contexts and name in FOCUSABLE and focus_rng.random() < focused_contexts:
            focus = tasks.question_focus(world.Scene.from_dict(record.extra["scene"]), record.question)
            if focus is not None:
                context = world.compact(focus)
        if focused_contexts and name == "shapesworld_spatial" and focus_rng.random() < focused_contexts:
            context = world.compact(tasks.statement_focus(world.Scene.from_dict(record.extra["scene"]), record.text))
        if unmarked_words and rng.random() < unmarked_words:
            context = context.replace("word ", "")
        if shuffled_objects and order_rng.random() < shuffled_objects:
            context = shuffle_objects(context, order_rng)
        judged = name == "shapesworld_spatial" or (name == "shapesworld_vqa"
                                                   and tasks.question_kind(record.question) == "side")
        out.append(Document(context, instruction, answer, judged))
    return out


_FRAME = re.compile(r"(frame \d+: )")


def shuffle_objects(context: str, rng: random.Random) -> str:
    """``context`` (``world.compact``'s "large red circle top left. word cat right.", or the video's "frame 1: ...
    frame 2: ...") with the objects of each scene in a random order; frame headers stay where they are."""
    pieces = []
    for piece in _FRAME.split(context):
        if not piece.strip() or _FRAME.fullmatch(piece):
            pieces.append(piece)
            continue
        objects = piece.strip().removesuffix(".").split(". ")
        rng.shuffle(objects)
        pieces.append(". ".join(objects) + "." + (" " if piece.endswith(" ") else ""))
    return "".join(pieces)


def _asking(name: str, kind: str, index: int, seed: int, rng: random.Random):
    """A ``name`` record whose question is of sort ``kind``: the first scene from ``index`` on that has one (its
    own index range, apart from the evenly spread documents')."""
    if name != "shapesworld_vqa" or kind not in tasks.QUESTION_KINDS:
        raise ValueError(f"{name}/{kind}: question kinds ({', '.join(tasks.QUESTION_KINDS)}) exist for "
                         "shapesworld_vqa only")
    offset = (1 + tasks.QUESTION_KINDS.index(kind)) * 10_000_000
    for attempt in range(100):
        record, _, context = tasks.build(name, "lm", offset + index * 100 + attempt, seed)
        asked = tasks.attribute_question(rng, world.Scene.from_dict(record.extra["scene"]), kind)
        if asked is not None:
            record.question, answer = asked
            record.answers = [answer] * len(record.answers)
            return record, context
    raise RuntimeError(f"no scene with a {kind!r} question in 100 draws")


def tokenizer_corpus(docs: list[Document]):
    """Every string the LLM tokenizer must cover: the documents, all templates and prompts, the world's words."""
    for doc in docs:
        yield doc.context
        yield doc.instruction
        yield doc.answer
    for family in templates.TEMPLATES.values():
        yield from family
    yield from templates.EVALUATION_PROMPTS.values()
