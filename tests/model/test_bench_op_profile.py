"""The training benchmark's CPU op profile (``common.op_profile``, ``train_throughput.py --profile`` on a CPU): per
side, the ops each call runs and how many times, with the ops that differ between the sides first."""

from __future__ import annotations

import torch

from instructblip.testing import import_script


def test_op_profile_counts_each_sides_ops_per_call_and_ranks_the_differences_first():
    common = import_script("experiments/bench", "common")
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    sides = {
        "three_products": lambda: (a @ b @ b @ b).sum(),
        "one_product": lambda: (a @ b).sum(),
    }
    profile = common.op_profile(sides, rounds=2, steps=3, top=3)

    assert profile["rounds"] == 2 and profile["steps_per_round"] == 3
    assert set(profile["total_ms"]) == set(sides) and all(ms > 0 for ms in profile["total_ms"].values())
    products = profile["ops"]["aten::mm"]
    assert products["three_products"]["calls"] == 3 and products["one_product"]["calls"] == 1
    assert products["three_products"]["ms"] > products["one_product"]["ms"]
    assert next(iter(profile["ops"])) == "aten::mm"   # the largest difference comes first
    assert len(profile["ops"]) == 3
