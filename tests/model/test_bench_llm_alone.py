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


def generation_setup(bench, llm: str):
    """(the generation benchmark's module, a tiny pair in eval mode, ours' unpadded batch of 2 prompts)."""
    common, _ = bench
    generate_throughput = import_script("experiments/bench", "generate_throughput")
    torch.manual_seed(0)
    pair = common.build_pair("tiny", llm, "cpu")
    pair.ours.eval()
    ours_batch, _ = generate_throughput.generation_inputs(pair, 2, 24, "cpu")
    return generate_throughput, pair, ours_batch


def test_generation_phases_prefill_predicts_the_first_new_token(bench):
    """``generate_throughput --phases`` subtracts its encode+prefill time from each call: that callable must do the
    call's own pre-decoding work, so its last logits choose the token greedy decoding emits first."""
    generate_throughput, pair, ours_batch = generation_setup(bench, "llama")
    phases = generate_throughput.prefill_phases(pair, ours_batch, cuda=False)
    assert set(phases) == {"encode", "encode_prefill"}
    visual = phases["encode"]()
    assert visual.shape[:2] == (2, pair.config.num_query_tokens)
    prefill = phases["encode_prefill"]()
    assert prefill.logits.shape[1] == 1 and prefill.past_key_values is not None
    first = pair.ours.generate_ids(ours_batch, num_beams=1, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    torch.testing.assert_close(prefill.logits[:, -1].argmax(-1), first[:, 0])


def test_generation_phases_prefill_of_t5_is_the_encoder_pass_generation_makes(bench):
    """For T5 the prefill is the encoder's pass over the prompt: the same hidden states ours' generate computes."""
    generate_throughput, pair, ours_batch = generation_setup(bench, "t5")
    seen = []
    encoder = pair.ours.llm.hf_model.get_encoder()
    hook = encoder.register_forward_hook(lambda module, args, output: seen.append(output[0].detach().clone()))
    try:
        prefill = generate_throughput.prefill_phases(pair, ours_batch, cuda=False)["encode_prefill"]()
        pair.ours.generate_ids(ours_batch, num_beams=1, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == 2
    torch.testing.assert_close(prefill.last_hidden_state, seen[1])
