"""The world: same seed -> same scenes and pixels; every answer holds on the rendered image."""

from __future__ import annotations

import random

import numpy as np
import pytest

from instructblip.shapesworld import tasks, world
from instructblip.shapesworld.world import COLORS, Scene


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_same_seed_same_scenes_and_pixels():
    for name in tasks.TASKS:
        a_record, a_images, a_text = tasks.build(name, "train", 7, seed=3)
        b_record, b_images, b_text = tasks.build(name, "train", 7, seed=3)
        assert a_record == b_record and a_text == b_text
        a_images = a_images if isinstance(a_images, list) else [a_images]
        b_images = b_images if isinstance(b_images, list) else [b_images]
        assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a_images, b_images))


def test_other_seed_or_index_gives_other_scenes():
    base = tasks.build("shapesworld_vqa", "train", 0, seed=0)[0].extra["scene"]
    assert tasks.build("shapesworld_vqa", "train", 0, seed=1)[0].extra["scene"] != base
    assert tasks.build("shapesworld_vqa", "train", 1, seed=0)[0].extra["scene"] != base
    assert tasks.build("shapesworld_vqa", "val", 0, seed=0)[0].extra["scene"] != base


def test_the_color_at_each_shape_centre_is_the_color_named():
    rng = random.Random(0)
    for _ in range(200):
        scene = world.sample_scene(rng)
        pixels = _pixels(world.render(scene))
        for shape in scene.shapes:
            x, y = shape.center
            # a triangle's centroid sits a little below its bounding-box centre: probe there for all kinds
            assert tuple(pixels[y + 1, x]) == COLORS[shape.color], (shape, tuple(pixels[y + 1, x]))


def test_the_word_is_drawn_inside_its_box_and_nowhere_else():
    rng = random.Random(1)
    for _ in range(100):
        scene = world.sample_scene(rng, word_prob=1.0)
        pixels = _pixels(world.render(scene))
        ink = (pixels == 0).all(axis=-1)   # pure black: only the word's glyphs use it
        left, top, right, bottom = scene.word.box
        inside = ink[top:bottom, left:right].sum()
        assert inside >= 10 * len(scene.word.text), "too few glyph pixels for a legible word"
        assert inside == ink.sum(), "ink outside the word's box"


def test_rendering_the_word_differs_between_words():
    scene = Scene(shapes=[], word=world.Word("cat", (1, 1), (23, 26, 41, 37)))
    other = Scene(shapes=[], word=world.Word("dog", (1, 1), (23, 26, 41, 37)))
    assert not np.array_equal(_pixels(world.render(scene)), _pixels(world.render(other)))


@pytest.mark.parametrize("index", range(40))
def test_answers_follow_from_the_scene(index):
    record, _, _ = tasks.build("shapesworld_vqa", "val", index, seed=0)
    scene = Scene.from_dict(record.extra["scene"])
    question, answer = record.question, record.answers[0]
    if question.startswith("what color is the "):
        kind = question.removeprefix("what color is the ").rstrip("?")
        assert [s.color for s in scene.shapes if s.kind == kind] == [answer]
    elif question.startswith("is there a "):
        color, kind = question.removeprefix("is there a ").rstrip("?").split()
        present = any(s.color == color and s.kind == kind for s in scene.shapes)
        assert answer == ("yes" if present else "no")
    elif question.startswith("where is the "):
        color, kind = question.removeprefix("where is the ").rstrip("?").split()
        assert [s.where for s in scene.shapes if (s.color, s.kind) == (color, kind)] == [answer]


def test_sides_are_those_of_the_cell_on_the_frame():
    def at(cell):
        return world.sides(world.Shape("circle", "red", "small", cell, (0, 0)))

    assert at((0, 0)) == ["top", "left"] and at((1, 1)) == [] and at((2, 1)) == ["bottom"]
    assert at((world.GRID - 1, world.GRID - 1)) == ["bottom", "right"]


def test_spatial_statements_are_true_exactly_when_labelled():
    labels = []
    for index in range(100):
        record, image, _ = tasks.build("shapesworld_spatial", "test", index, seed=0)
        scene = Scene.from_dict(record.extra["scene"])
        subject, side = record.text.removeprefix("the ").removesuffix(" of the image.").split(" is at the ")
        (shape,) = [s for s in scene.shapes if f"{s.color} {s.kind}" == subject]
        # on the pixels: the shape's colour at its centre, and that centre in the third of the image the side names
        x, y = shape.center
        assert tuple(_pixels(image)[y + 1, x]) == COLORS[shape.color]
        third = {"left": x < scene.size / 3, "right": x > 2 * scene.size / 3,
                 "top": y < scene.size / 3, "bottom": y > 2 * scene.size / 3}
        assert third[side] == bool(record.label) == (side in world.sides(shape)), record.text
        labels.append(record.label)
    assert 30 < sum(labels) < 70


def test_clip_moves_one_way_and_answers_name_it():
    for index in range(30):
        record, frames, _ = tasks.build("shapesworld_video_qa", "test", index, seed=0)
        clip = record.extra["clip"]
        assert len(frames) == record.num_frames == 4
        (r0, c0), (r1, c1) = clip["positions"][0], clip["positions"][-1]
        step = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}[clip["direction"]]
        assert (r1 - r0, c1 - c0) == (2 * step[0], 2 * step[1])
        if record.question.startswith("which way"):
            assert record.answers == [clip["direction"]]


def test_every_dataset_is_registered_with_its_metric_and_method():
    from instructblip.data import registry

    assert len(tasks.HELD_IN) >= 6 and len(tasks.HELD_OUT) >= 6
    for name in tasks.TASKS:
        info = registry.get(name)
        assert info.world == "shapesworld"
        assert info.method in ("generate", "rank")
    held_out_categories = {registry.get(n).category for n in tasks.HELD_OUT}
    held_in_categories = {registry.get(n).category for n in tasks.HELD_IN}
    assert held_out_categories - held_in_categories, "no category that is never trained on"
    assert held_out_categories & held_in_categories, "no held-out dataset of a seen category"


def test_binary_samples_alternate_their_label_and_the_label_is_true_of_the_scene():
    from instructblip.shapesworld import tasks

    for seed in range(3):
        records = [tasks.build("shapesworld_binary", "test", index, seed)[0] for index in range(4)]
        assert [r.label for r in records] == [0, 1, 0, 1]   # AUC needs both classes, even in the quick demo's 4
        for record in records:
            scene = world.Scene.from_dict(record.extra["scene"])
            color, kind = record.text.removeprefix("a ").split()
            assert any((s.color, s.kind) == (color, kind) for s in scene.shapes) == bool(record.label)


def test_cell_contents_lists_each_cells_shape_and_word_row_by_row():
    record, _, _ = tasks.build("shapesworld_ocr_vqa", "train", 5, seed=0)
    scene = Scene.from_dict(record.extra["scene"])
    contents = world.cell_contents(scene)
    assert len(contents) == world.GRID ** 2
    for index, (shape, word) in enumerate(contents):
        cell = divmod(index, world.GRID)
        assert shape == next((s for s in scene.shapes if s.cell == cell), None)
        assert word == (scene.word if scene.word.cell == cell else None)
    assert sum(shape is not None for shape, _ in contents) == len(scene.shapes)
    assert sum(word is not None for _, word in contents) == 1


def test_every_caption_names_each_shape_with_its_cell():
    for index in range(20):
        record, _, _ = tasks.build("shapesworld_caption", "train", index, seed=0)
        scene = Scene.from_dict(record.extra["scene"])
        assert len(record.answers) == 3
        for caption in record.answers:
            for shape in scene.shapes:
                assert f"a {shape.name} at the {shape.where}" in caption
            assert caption.count(" at the ") == len(scene.shapes)


def test_held_in_short_answers_are_evaluated_with_a_prompt_that_ends_where_the_answer_starts():
    from instructblip.data import templates

    for name in ("shapesworld_vqa", "shapesworld_count", "shapesworld_ocr_vqa"):
        record, _, _ = tasks.build(name, "val", 0, seed=0)
        prompt, answer = templates.render_evaluation(record)
        assert prompt == f"Question: {record.question} Short answer:"
        assert answer == record.answers[0]
    record, _, _ = tasks.build("shapesworld_caption", "val", 0, seed=0)
    assert templates.render_evaluation(record)[0] == templates.TEMPLATES[templates.template_family(record)][0]
