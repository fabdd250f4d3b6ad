"""The training benchmark's ``llm_alone`` side (experiments/bench/train_throughput.py): it must replay exactly the
LLM call ours' training path makes, with the inputs ours gave it, and touch nothing of ours' trainable set."""

from __future__ import annotations

import pytest
import torch

from instructblip.testing import import_script


@pytest.fixture(scope="module")
def bench():
    return import_script("experiments/bench", "common"), import_script("experiments/bench", "train_throughput")


@pytest.mark.parametrize("llm", ["t5", "llama"])
def test_llm_alone_replays_the_llm_call_of_ours_training_path(bench, llm):
    common, train_throughput = bench
    torch.manual_seed(0)
    pair = common.build_pair("tiny", llm, "cpu")
    ours_batch, _ = common.synthetic_batch(pair.config, 2, 8, 24, 6, "cpu")
    pair.ours.eval()   # no dropout: the replay and the path's own call must give the same numbers
    seen = []
    llm_module = pair.ours.llm.hf_model
    # the path's outer LLM call: T5's whole model; a decoder-only LLM's body (the head runs on labelled rows only)
    called = llm_module if llm == "t5" else llm_module.base_model
    hook = called.register_forward_hook(lambda module, args, output: seen.append(output[0].detach().clone()))
    try:
        step = train_throughput.make_llm_alone_step(pair.ours, ours_batch, "cpu")
        with torch.no_grad():
            pair.ours(**ours_batch, return_logits=False)
        replayed = step().detach()
    finally:
        hook.remove()
    # captured once while the step was built, once in the plain forward, once in the replay
    assert len(seen) == 3
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(replayed, seen[1])
    assert all(p.grad is None for p in pair.ours.parameters() if p.requires_grad)
