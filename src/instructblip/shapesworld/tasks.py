"""ShapesWorld's task datasets: one builder per dataset, turning a seeded scene into a shard :class:`Record`.

Every dataset mirrors a real one of the paper in its task family, metric and inference method, so the same
templates, sampler, metrics and evaluation runner serve both worlds:

=========================  ============  =====================================  ==========================  ========
dataset                    held in/out   stands in for                          metric                      method
=========================  ============  =====================================  ==========================  ========
shapesworld_caption        in            COCO Caption (captioning)              cider                       generate
shapesworld_vqa            in            VQAv2 (colour, kind, size, existence)  vqa_accuracy                generate
shapesworld_count          in            OKVQA slot: a second short-answer VQA  vqa_accuracy                generate
shapesworld_ocr_vqa        in            OCR-VQA (read the written word)        accuracy                    generate
shapesworld_qg             in            VQAv2-QG (question generation)         cider                       generate
shapesworld_describe       in            LLaVA detail (detailed description)    cider                       generate
shapesworld_compositional  out           GQA (relational questions)             accuracy                    generate
shapesworld_spatial        out           VSR (a shape against the frame: t/f)   accuracy                    rank
shapesworld_mc             out           IconQA (multiple choice)               accuracy                    rank
shapesworld_binary         out           HatefulMemes (binary, AUC)             auroc                       rank
shapesworld_dialog         out           Visual Dialog (MRR over candidates)    mrr                         rank
shapesworld_video_qa       out           MSVD-QA (4 frames)                     accuracy                    rank
=========================  ============  =====================================  ==========================  ========

The held-out datasets cover a seen category with new questions (compositional relations, as GQA is to VQAv2) and
categories never trained on (spatial true/false, multiple choice, binary classification, dialog, video).

Each builder returns ``(record, images, context)``: ``images`` is one PIL image (or a list of frames for video),
``context`` is the scene written as text (what the LLM's text-only pretraining pairs with the task's prompt). The
scene itself travels in ``record.extra["scene"]`` so that tests can check answers against pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from instructblip.data.record import Record
from instructblip.data.registry import CATEGORIES, DatasetInfo, register
from instructblip.shapesworld import world
from instructblip.shapesworld.world import COLORS, SHAPES, SIZES, Scene

NUM_FRAMES = 4
DIALOG_CANDIDATES = 10
BINARY_VERBALIZER = ("no", "yes")   # label 0, label 1
BINARY_QUESTION = "Is it in the image?"
SPATIAL_VERBALIZER = ("false", "true")
RELATIONS = ("left of", "right of", "above", "below")
DIGITS = {0: "0", 1: "1", 2: "2", 3: "3", 4: "4"}


@dataclass(frozen=True)
class Task:
    info: DatasetInfo
    build: Callable[[random.Random, str, int], tuple[Record, "Image.Image | list[Image.Image]", str]]
    stands_in_for: str


TASKS: dict[str, Task] = {}


def _task(name: str, *, category: str, held_out: bool, task: str, metric: str, method: str, answer_length: str,
          stands_in_for: str, video: bool = False):
    info = DatasetInfo(
        name=name, category=category, held_out=held_out, task=task, metric=metric, method=method,
        answer_length=answer_length, train_split=None if held_out else "train",
        eval_split="test" if held_out else "val", video=video, world="shapesworld",
    )
    register(info)

    def wrap(fn):
        TASKS[name] = Task(info=info, build=fn, stands_in_for=stands_in_for)
        return fn

    return wrap


def _record(name: str, split: str, index: int, scene: Scene | None = None, **fields) -> Record:
    info = TASKS[name].info if name in TASKS else None
    extra = fields.pop("extra", {})
    if scene is not None:
        extra["scene"] = scene.to_dict()
    return Record(dataset=name, task=(info.task if info else fields.pop("task")), id=f"{name}_{split}_{index:07d}",
                  split=split, image_id=f"{split}_{index:07d}", extra=extra, **fields)


# ------------------------------------------------------------------------------------------------- questions
def _unique(items, key):
    counts: dict = {}
    for item in items:
        counts[key(item)] = counts.get(key(item), 0) + 1
    return [item for item in items if counts[key(item)] == 1]


# the sorts of held-in attribute question, each by how attribute_question opens it
QUESTION_OPENINGS = {"color": "what color is", "shape": "what shape is", "size": "what size is",
                     "where": "where is", "exists": "is there", "side": "is the "}   # "is there" is tried first
QUESTION_KINDS = tuple(QUESTION_OPENINGS)
# the two OCR questions: the word anywhere, the word at a cell
OCR_QUESTION = "what word is written in the image?"
OCR_AT_OPENING = "what is written at the "


def question_kind(question: str) -> str:
    """The sort (a :data:`QUESTION_KINDS` name) of a question ``attribute_question`` wrote."""
    kind = next((k for k, opening in QUESTION_OPENINGS.items() if question.startswith(opening)), None)
    if kind is None:
        raise ValueError(f"not an attribute question: {question!r}")
    return kind


def attribute_question(rng: random.Random, scene: Scene, kind: str | None = None) -> tuple[str, str] | None:
    """A held-in short-answer question about one shape: its colour, kind, size, cell, or whether one exists.

    ``kind`` (one of :data:`QUESTION_KINDS`) asks for that sort of question; None when the scene has none (no shape
    of a unique kind to ask the colour of, say)."""
    if kind is not None and kind not in QUESTION_KINDS:
        raise ValueError(f"question kind {kind!r}; allowed: {', '.join(QUESTION_KINDS)}")
    shapes = scene.shapes
    options = []
    by_kind = _unique(shapes, lambda s: s.kind)
    by_color = _unique(shapes, lambda s: s.color)
    if by_kind:
        s = rng.choice(by_kind)
        options.append(("color", f"what color is the {s.kind}?", s.color))
    if by_color:
        s = rng.choice(by_color)
        options.append(("shape", f"what shape is the {s.color} object?", s.kind))
    s = rng.choice(shapes)
    options.append(("size", f"what size is the {s.color} {s.kind}?", s.size))
    options.append(("where", f"where is the {s.color} {s.kind}?", s.where))
    present = {(x.color, x.kind) for x in shapes}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        options.append(("exists", f"is there a {color} {shape}?", "yes"))
    else:
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
        color, shape = rng.choice(absent)
        options.append(("exists", f"is there a {color} {shape}?", "no"))
    sides = world.sides(s)
    if sides:   # yes / no whether the shape lies along a side of the image; a "no" names the opposite side
        side, answer = rng.choice(sides), "yes"
        if rng.random() >= 0.5:
            side, answer = world.OPPOSITE_SIDE[side], "no"
        options.append(("side", f"is the {s.color} {s.kind} at the {side} of the image?", answer))
    if kind is None:
        return rng.choice(options)[1:]
    return next((option[1:] for option in options if option[0] == kind), None)


def question_focus(scene: Scene, question: str) -> Scene | None:
    """The part of ``scene`` a held-in lookup question is about: the shape a colour, shape, size or cell question
    names, the word an OCR question asks for. None for questions that need the whole scene: counting, relations,
    existence (whether the scene has a red square is a question about all of it; a focus that held the square when
    there is one would give the answer away by its form).

    Why: the instruction-aware Q-Former reads the image with the instruction in view and may hand the LLM the object
    asked about alone; the LLM's text pretraining shows it such focused scene text beside whole scenes
    (``text.documents``' ``focused_contexts``)."""
    if question == OCR_QUESTION or question.startswith(OCR_AT_OPENING):
        return Scene(shapes=[], word=scene.word, size=scene.size) if scene.word is not None else None
    if not question.startswith(tuple(QUESTION_OPENINGS.values())):
        return None
    if question_kind(question) == "exists" or _relates_shapes(question):
        return None   # existence, or a relational question (compositional_question's) that needs the whole scene
    words = set(question.rstrip("?").split())
    colors, kinds = words & set(COLORS), words & set(SHAPES)
    shapes = [s for s in scene.shapes if (not colors or s.color in colors) and (not kinds or s.kind in kinds)]
    return Scene(shapes=shapes, size=scene.size) if shapes else None


def _relates_shapes(question: str) -> bool:
    """Whether the question places a shape against another ("... left of the red circle?"); a side question's "at
    the left of the image" places it against the frame."""
    return any(f"{rel} the {color} " in question for rel in RELATIONS for color in COLORS)


def statement_focus(scene: Scene, statement: str) -> Scene:
    """The shape a spatial statement (``build_spatial``'s) names, alone: what an instruction-aware Q-Former may hand
    the LLM for it, as for a lookup question (:func:`question_focus`)."""
    words = set(statement.rstrip(".").split())
    return Scene(shapes=[s for s in scene.shapes if s.color in words and s.kind in words], size=scene.size)


def count_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    if rng.random() < 0.5:
        return "how many shapes are there?", DIGITS[len(scene.shapes)]
    if rng.random() < 0.5:
        color = rng.choice([s.color for s in scene.shapes] + list(COLORS))
        n = sum(s.color == color for s in scene.shapes)
        return f"how many {color} shapes are there?", DIGITS[n]
    kind = rng.choice(SHAPES)
    n = sum(s.kind == kind for s in scene.shapes)
    return f"how many {kind}s are there?", DIGITS[n]


def compositional_question(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    """'what color is the shape left of the red circle?' when exactly one shape stands in that relation."""
    options = []
    for b in scene.shapes:
        for rel in RELATIONS:
            hits = [a for a in scene.shapes if a is not b and rel in world.relation(a, b)]
            if len(hits) == 1:
                a = hits[0]
                options.append((f"what color is the shape {rel} the {b.color} {b.kind}?", a.color))
                options.append((f"what shape is {rel} the {b.color} {b.kind}?", a.kind))
    return rng.choice(options) if options else None


# --------------------------------------------------------------------------------------------- scene helpers
def _scene(rng: random.Random, **kwargs) -> tuple[Scene, Image.Image]:
    scene = world.sample_scene(rng, **kwargs)
    return scene, world.render(scene)


def scene_text(scene: Scene) -> str:
    return world.compact(scene)


# ------------------------------------------------------------------------------------------------ held-in
@_task("shapesworld_caption", category=CATEGORIES[0], held_out=False, task="caption", metric="cider",
       method="generate", answer_length="short", stands_in_for="COCO Caption")
def build_caption(rng, split, index):
    scene, image = _scene(rng)
    refs = [world.caption(scene)] + [world.caption(scene, rng) for _ in range(2)]
    return _record("shapesworld_caption", split, index, scene, answers=refs), image, scene_text(scene)


@_task("shapesworld_vqa", category=CATEGORIES[3], held_out=False, task="vqa", metric="vqa_accuracy",
       method="generate", answer_length="short", stands_in_for="VQAv2")
def build_vqa(rng, split, index):
    scene, image = _scene(rng)
    question, answer = attribute_question(rng, scene)
    # ten identical "human" answers, as VQAv2 stores them: a match scores 100 under the official leave-one-out
    return (_record("shapesworld_vqa", split, index, scene, question=question, answers=[answer] * 10), image,
            scene_text(scene))


@_task("shapesworld_count", category=CATEGORIES[3], held_out=False, task="vqa",
       metric="vqa_accuracy", method="generate", answer_length="short", stands_in_for="OKVQA")
def build_count(rng, split, index):
    scene, image = _scene(rng)
    question, answer = count_question(rng, scene)
    return (_record("shapesworld_count", split, index, scene, question=question, answers=[answer] * 10), image,
            scene_text(scene))


@_task("shapesworld_ocr_vqa", category=CATEGORIES[5], held_out=False,
       task="vqa", metric="accuracy", method="generate", answer_length="short", stands_in_for="OCR-VQA")
def build_ocr_vqa(rng, split, index):
    scene, image = _scene(rng, word_prob=1.0)
    word = scene.word
    if rng.random() < 0.7:
        question, answer = OCR_QUESTION, word.text
    else:
        question, answer = f"{OCR_AT_OPENING}{word.where}?", word.text
    return (_record("shapesworld_ocr_vqa", split, index, scene, question=question, answers=[answer]), image,
            scene_text(scene))


@_task("shapesworld_qg", category=CATEGORIES[6], held_out=False, task="qg", metric="cider",
       method="generate", answer_length="short", stands_in_for="VQAv2 question generation")
def build_qg(rng, split, index):
    scene, image = _scene(rng)
    question, answer = attribute_question(rng, scene)
    return (_record("shapesworld_qg", split, index, scene, question=question, answers=[answer]), image,
            scene_text(scene))


DESCRIBE_PROMPTS = (
    "describe the image in detail.",
    "what is in this image? give every shape and where it is.",
    "write a detailed description of the picture.",
)


@_task("shapesworld_describe", category=CATEGORIES[10], held_out=False, task="conversation",
       metric="cider", method="generate", answer_length="long", stands_in_for="LLaVA-Instruct detail")
def build_describe(rng, split, index):
    scene, image = _scene(rng)
    description = world.describe(scene)
    turns = [{"from": "human", "value": rng.choice(DESCRIBE_PROMPTS)}, {"from": "gpt", "value": description}]
    return (_record("shapesworld_describe", split, index, scene, conversation=turns, answers=[description]), image,
            scene_text(scene))


# ----------------------------------------------------------------------------------------------- held-out
@_task("shapesworld_compositional", category=CATEGORIES[3], held_out=True, task="vqa", metric="accuracy",
       method="generate", answer_length="short", stands_in_for="GQA")
def build_compositional(rng, split, index):
    while True:
        scene, image = _scene(rng, min_shapes=2, max_shapes=3)
        qa = compositional_question(rng, scene)
        if qa:
            break
    question, answer = qa
    return (_record("shapesworld_compositional", split, index, scene, question=question, answers=[answer]), image,
            scene_text(scene))


@_task("shapesworld_spatial", category=CATEGORIES[2], held_out=True, task="classification",
       metric="accuracy", method="rank", answer_length="short", stands_in_for="VSR")
def build_spatial(rng, split, index):
    """A statement placing one shape against the image's frame ("the red square is at the left of the image"), true
    or false with even odds; a false one names the side opposite one the shape lies along, which cannot hold.

    Why one shape and not VSR's two: judging "a is left of b" from the scene text needs the cells of two shapes
    bound to their names and compared, and the LLM (2 layers then) learnt that in none of sessions 13-20's recipes,
    nor in a plain loop trained on nothing else (experiments/README.md, "Session 21"). The relations between two
    shapes stay in the held-out compositional questions."""
    while True:
        scene, image = _scene(rng, min_shapes=1, max_shapes=1)
        placed = [(shape, side) for shape in scene.shapes for side in world.sides(shape)]
        if placed:
            break
    shape, side = rng.choice(placed)
    label = int(rng.random() < 0.5)
    if not label:
        side = world.OPPOSITE_SIDE[side]
    text = f"the {shape.color} {shape.kind} is at the {side} of the image."
    answer = SPATIAL_VERBALIZER[label]
    return (_record("shapesworld_spatial", split, index, scene, text=text, label=label, answers=[answer],
                    candidates=list(SPATIAL_VERBALIZER)), image, scene_text(scene))


@_task("shapesworld_mc", category=CATEGORIES[2], held_out=True, task="mc", metric="accuracy", method="rank",
       answer_length="short", stands_in_for="IconQA")
def build_mc(rng, split, index):
    scene, image = _scene(rng)
    kind = rng.random()
    if kind < 0.4:
        question, answer = "how many shapes are there?", DIGITS[len(scene.shapes)]
        pool = [DIGITS[n] for n in (1, 2, 3, 4)]
    elif kind < 0.7:
        s = rng.choice(scene.shapes)
        question, answer = f"which color does the {s.kind} at the {s.where} have?", s.color
        pool = [c for c in COLORS if c not in {x.color for x in scene.shapes if x is not s}]
    else:
        s = rng.choice(scene.shapes)
        question, answer = f"which shape is {s.color}?", s.kind
        pool = [k for k in SHAPES if k not in {x.kind for x in scene.shapes if x.color == s.color and x is not s}]
    wrong = [c for c in pool if c != answer]
    rng.shuffle(wrong)
    choices = wrong[:2] + [answer]
    rng.shuffle(choices)
    return (_record("shapesworld_mc", split, index, scene, question=question, choices=choices,
                    answer_index=choices.index(answer), answers=[answer]), image, scene_text(scene))


@_task("shapesworld_binary", category=CATEGORIES[9], held_out=True, task="classification",
       metric="auroc", method="rank", answer_length="short", stands_in_for="HatefulMemes")
def build_binary(rng, split, index):
    scene, image = _scene(rng)
    present = sorted({(s.color, s.kind) for s in scene.shapes})
    label = index % 2   # both classes in any two consecutive samples: AUC needs both, even in a 4-sample split
    if label:
        color, kind = rng.choice(present)
    else:
        color, kind = rng.choice([(c, k) for c in COLORS for k in SHAPES if (c, k) not in present])
    text = f"a {color} {kind}"
    return (_record("shapesworld_binary", split, index, scene, text=text, question=BINARY_QUESTION, label=label,
                    answers=[BINARY_VERBALIZER[label]], candidates=list(BINARY_VERBALIZER)), image,
            scene_text(scene))


def _dialog_candidates(rng: random.Random, answer: str) -> list[str]:
    pool = sorted(set(COLORS) | set(SHAPES) | set(SIZES) | {"yes", "no"} | set(world.CELL_NAMES.values())
                  | {DIGITS[n] for n in range(5)})
    wrong = [c for c in pool if c != answer]
    rng.shuffle(wrong)
    candidates = wrong[: DIALOG_CANDIDATES - 1] + [answer]
    rng.shuffle(candidates)
    return candidates


@_task("shapesworld_dialog", category=CATEGORIES[8], held_out=True, task="dialog",
       metric="mrr", method="rank", answer_length="short", stands_in_for="Visual Dialog")
def build_dialog(rng, split, index):
    scene, image = _scene(rng)
    rounds = rng.randint(1, 2)
    history = []
    for _ in range(4 * rounds):   # a few tries for distinct earlier questions
        q, a = attribute_question(rng, scene) if rng.random() < 0.7 else count_question(rng, scene)
        if all(turn["question"] != q for turn in history):
            history.append({"question": q, "answer": a})
        if len(history) == rounds:
            break
    question, answer = attribute_question(rng, scene)
    candidates = _dialog_candidates(rng, answer)
    return (_record("shapesworld_dialog", split, index, scene, question=question, caption=world.caption(scene),
                    dialog_history=history, candidates=candidates, answer_index=candidates.index(answer),
                    answers=[answer]), image, scene_text(scene))


VIDEO_ANSWERS = tuple(COLORS) + SHAPES + tuple(world.DIRECTIONS)


@_task("shapesworld_video_qa", category=CATEGORIES[7], held_out=True, task="video_qa",
       metric="accuracy", method="rank", answer_length="short", stands_in_for="MSVD-QA", video=True)
def build_video_qa(rng, split, index):
    clip = world.sample_clip(rng, num_frames=NUM_FRAMES)
    frames = world.render_clip(clip)
    mover, still = clip.mover, clip.still
    r = rng.random()
    if r < 0.35:
        question, answer = f"what color is the {mover.kind} that moves?", mover.color
    elif r < 0.7:
        question, answer = f"what shape is the {mover.color} one that moves?", mover.kind
    else:
        question, answer = f"which way does the {mover.color} {mover.kind} move?", clip.direction
    context = " ".join(f"frame {t + 1}: {world.compact(clip.frame_scene(t))}" for t in range(len(frames)))
    record = _record("shapesworld_video_qa", split, index, None, question=question, answers=[answer],
                     num_frames=len(frames), candidates=list(VIDEO_ANSWERS), extra={"clip": clip.to_dict()})
    return record, frames, context


HELD_IN = [name for name, t in TASKS.items() if not t.info.held_out]
HELD_OUT = [name for name, t in TASKS.items() if t.info.held_out]


def build(name: str, split: str, index: int, seed: int):
    """The ``index``-th example of dataset ``name`` in ``split``: a pure function of (name, split, index, seed)."""
    try:
        task = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown ShapesWorld dataset {name!r}; known: {', '.join(TASKS)}") from None
    # one generator per example: any example can be rebuilt alone, and splits never share a scene stream
    rng = random.Random(f"{seed}/{name}/{split}/{index}")
    return task.build(rng, split, index)


# The fixed evaluation prompt of each dataset, a real dataset's prompt so that the evaluation goes through the same
# template code: each held-out dataset takes the prompt of the one it stands in for. The held-in short-answer datasets
# take GQA's (LAVIS's "Question: ... Short answer:", one of their training templates), not their family's first
# template, the bare question: the frozen LLM's text pretraining also predicts instructions, and after a bare
# question it went on with another template's tail ("a short answer to the question is cup": 31 of 200 OCR answers
# of one run, experiments/README.md, "Session 12"). Caption, question generation and description keep their
# family's first template.
EVALUATION_PROMPT_OF = {
    "shapesworld_vqa": "gqa",
    "shapesworld_count": "gqa",
    "shapesworld_ocr_vqa": "gqa",
    "shapesworld_compositional": "gqa",
    "shapesworld_spatial": "vsr",
    "shapesworld_mc": "iconqa",
    "shapesworld_dialog": "visdial",
    "shapesworld_video_qa": "msvd_qa",
}
# HatefulMemes' prompt says the text is written on the image; here it comes beside it.
BINARY_PROMPT = 'The image comes with the text: "{text}". {question} Answer:'


def _register_evaluation_prompts() -> None:
    from instructblip.data import templates

    for name, real in EVALUATION_PROMPT_OF.items():
        templates.EVALUATION_PROMPTS.setdefault(name, templates.EVALUATION_PROMPTS[real])
    templates.EVALUATION_PROMPTS.setdefault("shapesworld_binary", BINARY_PROMPT)


_register_evaluation_prompts()
