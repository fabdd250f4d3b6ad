"""experiments/spatial_learnability.py's statements: each label follows from the scene text written before it, so a
model stuck at chance there failed to learn, not to be told."""

from __future__ import annotations

import random

import pytest

from instructblip.testing import import_script


@pytest.fixture(scope="module")
def script():
    return import_script("experiments", "spatial_learnability")


def _read_scene(context: str, cells: dict) -> dict[str, tuple[int, int]]:
    """'small red square top left . large blue circle center .' -> {'red square': (0, 0), 'blue circle': (1, 1)}"""
    by_name = {name: cell for cell, name in cells.items()}
    scene = {}
    for sentence in context.split(" . "):
        words = sentence.strip(" .").split()
        if len(words) >= 4 and words[0] in ("small", "large"):
            scene[f"{words[1]} {words[2]}"] = by_name[" ".join(words[3:])]
    return scene


@pytest.mark.parametrize("statement", ["relation", "side"])
@pytest.mark.parametrize("cells", ["demo", "regular"])
@pytest.mark.parametrize("context", ["whole", "focused"])
def test_each_label_follows_from_the_scene_text(script, statement, cells, context):
    opts = {**script.OPTIONS, "statement": statement, "cells": cells, "context": context}
    table = script.DEMO_CELLS if cells == "demo" else script.REGULAR_CELLS
    rng, labels = random.Random(0), []
    for _ in range(300):
        words, answer = script.example(rng, opts)
        text = " ".join(words)
        scene_text, statement_text = text.split(" <s> is this true or false ? ")
        scene = _read_scene(scene_text, table)
        said = statement_text.removesuffix(" . answer :").removeprefix("the ").split(" is ")
        subject = scene[said[0]]
        if statement == "side":
            side = said[1].removeprefix("at the ").removesuffix(" of the image")
            truth = script.SIDES[side](subject)
        else:
            relation = next(r for r in script.HOLDS if said[1].startswith(r + " the "))
            truth = script.HOLDS[relation](subject, scene[said[1].removeprefix(relation + " the ")])
        assert truth == (answer == "true"), text
        if context == "focused":
            assert len(scene) == (1 if statement == "side" else 2)
        labels.append(truth)
    assert 0.4 < sum(labels) / len(labels) < 0.6


def test_the_control_is_decided_by_the_relation_word(script):
    rng = random.Random(0)
    for _ in range(100):
        words, answer = script.example(rng, {**script.OPTIONS, "statement": "relation_word"})
        relation = " ".join(words[words.index("is", words.index("?")) + 1:][:2]).removesuffix(" the")
        assert (answer == "true") == (relation in ("left of", "above"))
