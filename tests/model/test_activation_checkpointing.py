"""Activation checkpointing (``model.overrides.activation_checkpointing``): the same loss and gradients as without,
the Q-Former's and the LLM's blocks really recomputed in the backward pass (also the frozen LLM, which trains in
eval mode), and both speed options reachable from the Hydra config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from instructblip.model.instructblip import InstructBlip

from conftest import LLM_KINDS, PROMPTS  # noqa: E402  (tests/model/conftest.py)

ANSWERS = ["a red square on the left", "three"]
CONF = Path(__file__).resolve().parents[2] / "conf"


def _training_mode(model: InstructBlip) -> InstructBlip:
    """As the LightningModule trains it: dropout on in what trains, the frozen towers in eval mode."""
    model.train()
    model.vision.trunk.eval()
    model.llm.eval()
    return model


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_checkpointing_gives_the_same_loss_and_gradients(kind, tiny_dirs, images):
    results = []
    for checkpointing in (False, True):
        model = _training_mode(InstructBlip.from_pretrained(tiny_dirs[kind], activation_checkpointing=checkpointing))
        # the first module of a block: a recompute in the backward pass calls it again
        qformer_calls = _count_calls(model.qformer.layers[0].self_attention.query)
        llm_block = next(m for m in model.llm.hf_model.modules() if isinstance(m, GradientCheckpointingLayer))
        llm_calls = _count_calls(next(m for m in llm_block.modules() if isinstance(m, torch.nn.Linear)))
        batch = model.processor.training_batch(images, PROMPTS, ANSWERS)
        torch.manual_seed(0)  # the Q-Former's dropout is on: the same masks in both runs (and in the recompute)
        out = model(**batch, return_logits=False)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads, qformer_calls[0], llm_calls[0], list(model.state_dict())))
    (plain, plain_grads, plain_q, plain_llm, plain_keys), (ckpt, ckpt_grads, ckpt_q, ckpt_llm, ckpt_keys) = results
    assert ckpt_keys == plain_keys, "checkpointing leaves the parameter names (checkpoints, export) as they are"
    assert (plain_q, plain_llm) == (1, 1)
    assert (ckpt_q, ckpt_llm) == (2, 2), "each block runs again in the backward pass"
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ckpt.per_sample_loss, plain.per_sample_loss, rtol=1e-6, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads["projection.weight"].abs().sum() > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointed_model_still_generates(tiny_dirs, our_models, images):
    model = InstructBlip.from_pretrained(tiny_dirs["llama"], activation_checkpointing=True)
    settings = dict(num_beams=1, max_new_tokens=4, min_new_tokens=4)
    assert model.generate(images, PROMPTS, **settings) == our_models["llama"].generate(images, PROMPTS, **settings)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import instructblip.train  # noqa: F401  (registers the config resolvers)

    os.environ.setdefault("INSTRUCTBLIP_ROOT", str(CONF.parent))
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=overrides)


def test_speed_options_from_the_hydra_config(tiny_dirs):
    from hydra.utils import instantiate

    cfg = _compose([
        "model=tiny", f"model.pretrained={tiny_dirs['llama']}",
        "model.overrides.pack_sequences=true", "model.overrides.activation_checkpointing=true",
    ])
    model = instantiate(cfg.model)
    assert model.config.pack_sequences and model.config.activation_checkpointing
    assert model.qformer.activation_checkpointing

    default = instantiate(_compose(["model=tiny", f"model.pretrained={tiny_dirs['llama']}"]).model)
    assert not default.config.pack_sequences and not default.config.activation_checkpointing

    t5 = _compose(["model=tiny_t5", f"model.pretrained={tiny_dirs['t5']}", "model.overrides.pack_sequences=true"])
    assert instantiate(t5.model).config.pack_sequences   # encoder-decoder packing (tests/model/test_packing.py)
