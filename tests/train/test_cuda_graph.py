"""The training step captured as one CUDA graph (``instructblip.train.cuda_graph``): what it refuses (any machine)
and, on a GPU, that replaying it trains like the eager step."""

from __future__ import annotations

import pytest
import torch

from instructblip.errors import ConfigError
from instructblip.model.instructblip import InstructBlip
from instructblip.model.presets import get_preset
from instructblip.testing import preset_training_batch
from instructblip.train.cuda_graph import CudaGraphTrainStep
from instructblip.train.module import freeze_unused


def _tiny_trainable_model(device: str) -> InstructBlip:
    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-llama")).place(device)
    model.vision.trunk.requires_grad_(False)
    model.llm.requires_grad_(False)
    freeze_unused(model)
    return model.eval()  # no dropout: the graphed and eager runs must see the same numbers


def _optimizer(model, capturable: bool = False, fused: bool = True):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=fused,
                             capturable=capturable)


def _plain_steps(model, optimizer, batches) -> list[torch.Tensor]:
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _nan_batch(device: str) -> dict:
    batch = preset_training_batch(device, 9)
    batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
    return batch


def test_a_step_without_a_capturable_or_fused_optimizer_is_refused():
    model = _tiny_trainable_model("cpu")
    with pytest.raises(ConfigError, match=r"capturable optimizer: param groups \[0\] have capturable=False"):
        CudaGraphTrainStep(model, _optimizer(model), preset_training_batch("cpu", 0))
    with pytest.raises(ConfigError, match=r"needs a fused optimizer \(fused=True\)"):
        CudaGraphTrainStep(model, _optimizer(model, fused=False), preset_training_batch("cpu", 0), capture=False)


def test_the_step_trains_like_a_plain_loop_and_skips_a_non_finite_step_whole():
    """The step's body without the graph (capture=False, here on the CPU): plain fused AdamW steps, and a batch
    whose loss is NaN changes no weight, moment or step count and is counted."""
    models = [_tiny_trainable_model("cpu") for _ in range(2)]
    optimizers = [_optimizer(m) for m in models]
    batches = [preset_training_batch("cpu", seed) for seed in range(3)]
    step = CudaGraphTrainStep(models[0], optimizers[0], batches[0], {"return_logits": False}, autocast_dtype=None,
                              capture=False)
    losses = [step(batch).clone() for batch in batches[:2]]
    before = {name: p.detach().clone() for name, p in models[0].named_parameters()}
    state = {k: v.clone() for k, v in optimizers[0].state[models[0].query_tokens].items()}
    assert not torch.isfinite(step(_nan_batch("cpu"))) and int(step.skipped_steps) == 1
    for name, param in models[0].named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)
    for key, value in optimizers[0].state[models[0].query_tokens].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    losses.append(step(batches[2]).clone())
    assert int(step.skipped_steps) == 1
    expected = _plain_steps(models[1], optimizers[1], batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_steps_train_like_eager_steps():
    models = [_tiny_trainable_model("cuda") for _ in range(2)]
    optimizers = [_optimizer(m, capturable=True) for m in models]
    # the first (the warm-up's and the capture's) without padding: eager transformers would skip its mask there
    batches = [preset_training_batch("cuda", seed, padded=seed > 0) for seed in range(4)]
    before = {name: p.detach().clone() for name, p in models[0].named_parameters()}
    graphed = CudaGraphTrainStep(models[0], optimizers[0], batches[0], {"return_logits": False},
                                 autocast_dtype=None, warmup_steps=2)
    for name, param in models[0].named_parameters():  # the warm-up steps trained nothing
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)
    graphed_losses = [graphed(batch).clone() for batch in batches[:2]]
    graphed(_nan_batch("cuda"))  # skipped whole, inside the graph
    assert int(graphed.skipped_steps) == 1
    graphed_losses += [graphed(batch).clone() for batch in batches[2:]]
    eager_losses = _plain_steps(models[1], optimizers[1], batches)
    torch.testing.assert_close(torch.stack(graphed_losses), torch.stack(eager_losses), rtol=1e-4, atol=1e-5)
    assert len(set(torch.stack(eager_losses).tolist())) == 4, "different batches give different losses"
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] has shape \(2, 7\)"):
        graphed({**batches[0], "input_ids": torch.ones(2, 7, dtype=torch.long, device="cuda")})


def test_a_learning_rate_changed_after_the_capture_is_refused_not_ignored():
    from instructblip.train.cuda_graph import check_learning_rates

    rate = torch.tensor(1e-4)
    groups = [{"lr": 1e-3}, {"lr": rate}]
    check_learning_rates(groups, [1e-3, rate])
    rate.fill_(5e-5)  # in place: the graph reads the new value
    check_learning_rates(groups, [1e-3, rate])
    groups[0]["lr"] = 5e-4  # what a scheduler's step does to a float rate
    with pytest.raises(ValueError, match=r"param group 0: the learning rate changed after the capture \(0.001 -> "):
        check_learning_rates(groups, [1e-3, rate])
    groups[0]["lr"], groups[1]["lr"] = 1e-3, torch.tensor(5e-5)  # a new tensor object: the graph keeps the old one
    with pytest.raises(ValueError, match=r"param group 1: .*tensor learning rate and update it in place"):
        check_learning_rates(groups, [1e-3, rate])
