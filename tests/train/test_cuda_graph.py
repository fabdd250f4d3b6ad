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


def _tiny_trainable_model(device: str) -> InstructBlip:
    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-llama")).place(device)
    model.vision.trunk.requires_grad_(False)
    model.llm.requires_grad_(False)
    for name, param in model.named_parameters():
        if name in set(model.unused_parameter_names()):
            param.requires_grad_(False)
    return model.eval()  # no dropout: the graphed and eager runs must see the same numbers


def test_a_step_without_a_capturable_optimizer_is_refused():
    model = _tiny_trainable_model("cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match=r"capturable optimizer: param groups \[0\] have capturable=False"):
        CudaGraphTrainStep(model, optimizer, preset_training_batch("cpu", 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_steps_train_like_eager_steps():
    models = [_tiny_trainable_model("cuda") for _ in range(2)]
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=True, capturable=True)
        for m in models
    ]
    # the first (the warm-up's and the capture's) without padding: eager transformers would skip its mask there
    batches = [preset_training_batch("cuda", seed, padded=seed > 0) for seed in range(4)]
    graphed = CudaGraphTrainStep(models[0], optimizers[0], batches[0], {"return_logits": False},
                                 autocast_dtype=None, warmup_steps=2)
    eager_losses, graphed_losses = [], []
    for _ in range(2):  # the warm-up steps, on the first batch
        optimizers[1].zero_grad(set_to_none=True)
        models[1](**batches[0], return_logits=False).loss.backward()
        optimizers[1].step()
    for batch in batches:
        graphed_losses.append(graphed(batch).clone())
        optimizers[1].zero_grad(set_to_none=True)
        loss = models[1](**batch, return_logits=False).loss
        loss.backward()
        optimizers[1].step()
        eager_losses.append(loss.detach())
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
