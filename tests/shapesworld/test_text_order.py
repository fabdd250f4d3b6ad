"""``shuffled_objects``: the LLM's scene text lists a share of its scenes' objects in a random, seeded order."""

from __future__ import annotations

import random

from instructblip.shapesworld import text as world_text


def _objects(context: str) -> list[str]:
    return sorted(context.removesuffix(".").split(". "))


def test_shuffle_objects_permutes_the_objects_and_keeps_frame_headers():
    scene = "large red circle top left. small blue square right. medium green triangle bottom. word cat top."
    orders = {world_text.shuffle_objects(scene, random.Random(seed)) for seed in range(20)}
    assert len(orders) > 1
    assert all(_objects(order) == _objects(scene) and order.endswith(".") for order in orders)
    video = "frame 1: large red circle top. small blue square right. frame 2: large red circle left. small blue square right."
    for seed in range(10):
        shuffled = world_text.shuffle_objects(video, random.Random(seed))
        first, second = shuffled.removeprefix("frame 1: ").split(" frame 2: ")
        assert _objects(first) == ["large red circle top", "small blue square right"]
        assert _objects(second) == ["large red circle left", "small blue square right"]
    assert world_text.shuffle_objects(scene, random.Random(3)) == world_text.shuffle_objects(scene, random.Random(3))


def test_shuffled_documents_change_only_the_order_and_are_seeded():
    plain = world_text.documents(96, seed=0, unmarked_words=0.5)
    assert plain == world_text.documents(96, seed=0, unmarked_words=0.5, shuffled_objects=0.0)
    shuffled = world_text.documents(96, seed=0, unmarked_words=0.5, shuffled_objects=0.5)
    assert shuffled == world_text.documents(96, seed=0, unmarked_words=0.5, shuffled_objects=0.5)
    changed = [i for i, (a, b) in enumerate(zip(plain, shuffled)) if a.context != b.context]
    assert 10 <= len(changed) <= 60, len(changed)   # about half of the multi-object scenes
    for a, b in zip(plain, shuffled):
        assert (a.instruction, a.answer) == (b.instruction, b.answer)
        if not a.context.startswith("frame"):
            assert _objects(a.context) == _objects(b.context)
    everything = world_text.documents(96, seed=0, unmarked_words=0.5, shuffled_objects=1.0)
    assert sum(a.context != b.context for a, b in zip(plain, everything)) > len(changed)
    other_seed = world_text.documents(96, seed=1, unmarked_words=0.5, shuffled_objects=0.5)
    assert [d.context for d in other_seed] != [d.context for d in shuffled]
