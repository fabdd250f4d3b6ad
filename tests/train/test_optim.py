"""The optimiser's parameter groups and the warmup + cosine schedule (LAVIS' linear_warmup_cosine_lr)."""

from __future__ import annotations

import math

import torch
from torch import nn

from instructblip.train.optim import adamw, warmup_cosine


def test_no_weight_decay_on_biases_and_1d_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen: not in the optimiser at all
    optimizer = adamw(model.named_parameters(), lr=1e-5, weight_decay=0.05)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                 id(model[2].bias)}
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_linear_warmup_from_warmup_lr_then_cosine_to_min_lr():
    param = nn.Parameter(torch.zeros(2, 2))
    optimizer = adamw([("w", param)], lr=1e-5)
    schedule = warmup_cosine(optimizer, max_steps=100, warmup_steps=10, warmup_lr=1e-8, min_lr=0.0)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert math.isclose(lrs[0], 1e-8, rel_tol=1e-6)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))              # rising through the warmup
    assert math.isclose(lrs[10], 1e-5, rel_tol=1e-6)                     # peak when the warmup ends
    assert math.isclose(lrs[55], 1e-5 * (1 + math.cos(math.pi * 45 / 90)) / 2, rel_tol=1e-6)
    assert lrs[-1] < 1e-8 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    restored = warmup_cosine(adamw([("w", nn.Parameter(torch.zeros(2, 2)))], lr=1e-5), 100, 10, 1e-8)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()


def test_adamw_takes_the_fused_kernel_on_plain_tensors_and_steps_like_the_loop():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = adamw(models[0].named_parameters(), lr=1e-2)
    loop = adamw(models[1].named_parameters(), lr=1e-2, fused=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    ids = torch.tensor([[1, 2, 3]])
    for model, optimizer in zip(models, (fused, loop)):
        for _ in range(3):
            model(ids).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
