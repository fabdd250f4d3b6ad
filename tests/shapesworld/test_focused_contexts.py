"""``focused_contexts``: a share of the LLM's lookup and statement documents give as scene text only what they
are about."""

from __future__ import annotations

import pytest

from instructblip.shapesworld import tasks, world
from instructblip.shapesworld import text as world_text
from instructblip.shapesworld.world import Scene


def _val(name: str, index: int):
    record, _, _ = tasks.build(name, "val", index, 0)
    return record, Scene.from_dict(record.extra["scene"])


@pytest.mark.parametrize("index", range(60))
def test_the_focus_of_a_lookup_question_still_answers_it(index):
    record, scene = _val("shapesworld_vqa", index)
    kind = tasks.question_kind(record.question)
    focus = tasks.question_focus(scene, record.question)
    answer = record.answers[0]
    if kind == "exists":
        assert focus is None
        return
    assert focus is not None and len(focus.shapes) == 1 and focus.word is None
    shape = focus.shapes[0]
    assert shape in scene.shapes
    if kind == "side":   # "is the red square at the left of the image?"
        side = record.question.split(" at the ")[1].split()[0]
        assert answer == ("yes" if side in world.sides(shape) else "no")
        return
    assert answer == {"color": shape.color, "shape": shape.kind, "size": shape.size, "where": shape.where}[kind]


def test_an_ocr_question_focuses_on_the_word_alone():
    for index in range(20):
        record, scene = _val("shapesworld_ocr_vqa", index)
        focus = tasks.question_focus(scene, record.question)
        assert focus.shapes == [] and focus.word == scene.word and focus.word.text == record.answers[0]


def test_counting_relational_and_existence_questions_keep_the_whole_scene():
    for name in ("shapesworld_count", "shapesworld_compositional"):
        for index in range(20):
            record, scene = _val(name, index)
            assert tasks.question_focus(scene, record.question) is None, record.question


def test_focused_documents_change_only_the_scene_text_of_lookups():
    plain = world_text.documents(96, seed=0, unmarked_words=0.5)
    assert plain == world_text.documents(96, seed=0, unmarked_words=0.5, focused_contexts=0.0)
    focused = world_text.documents(96, seed=0, unmarked_words=0.5, focused_contexts=1.0)
    assert focused == world_text.documents(96, seed=0, unmarked_words=0.5, focused_contexts=1.0)
    names = list(tasks.TASKS)
    focusable = (*world_text.FOCUSABLE, "shapesworld_spatial")
    changed = 0
    for index, (a, b) in enumerate(zip(plain, focused)):
        assert (a.instruction, a.answer) == (b.instruction, b.answer)
        if names[index % len(names)] not in focusable:
            assert a.context == b.context
            continue
        # the focused text is the plain one with whole objects left out: each of its sentences is one of plain's
        assert set(b.context.removesuffix(".").split(". ")) <= set(a.context.removesuffix(".").split(". "))
        changed += a.context != b.context
    assert changed >= 8
    half = world_text.documents(96, seed=0, unmarked_words=0.5, focused_contexts=0.5)
    assert 0 < sum(a != b for a, b in zip(plain, half)) < changed


def test_a_statement_focus_holds_the_named_shape_alone():
    for index in range(20):
        record, scene = _val("shapesworld_spatial", index)
        focus = tasks.statement_focus(scene, record.text)
        assert [f"the {s.color} {s.kind} is" for s in focus.shapes] == [record.text.split(" at the ")[0]]


def test_focus_keeps_the_scene_text_format():
    scene = Scene(shapes=[world.Shape("circle", "red", "large", (0, 0), (12, 12)),
                          world.Shape("square", "blue", "small", (1, 1), (36, 36))])
    focus = tasks.question_focus(scene, "what size is the blue square?")
    assert world.compact(focus) == "small blue square center."
    assert world.compact(tasks.question_focus(scene, "what shape is the red object?")) == "large red circle top left."
    assert tasks.question_focus(scene, "is there a red circle?") is None
