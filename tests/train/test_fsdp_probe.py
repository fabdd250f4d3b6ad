"""The FSDP probe's storage check (experiments/fsdp_probe.py): a parameter whose storage was freed between forward
and backward, as FSDP frees gathered parameters, is named by a Python error before any kernel reads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from instructblip.testing import import_script


@pytest.fixture(scope="module")
def fsdp_probe():
    return import_script("experiments", "fsdp_probe")


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_a_parameter_freed_before_backward_is_named(fsdp_probe):
    model = _two_layers()
    inputs = torch.randn(5, 4, requires_grad=True)
    with fsdp_probe.storage_check(model):
        loss = model(inputs).square().sum()
    model[2].weight.untyped_storage().resize_(0)  # what FSDP's reshard does to a gathered parameter
    # autograd saved the transposed view of the weight (8, 3): matched to the parameter by its storage
    with pytest.raises(fsdp_probe.FreedStorageError, match=r"backward read 2\.weight \(8, 3\) torch\.float32: "
                                                           r"storage of 0 bytes, needs 96"):
        loss.backward()


def test_intact_storages_pass_and_give_the_plain_gradients(fsdp_probe):
    model, plain = _two_layers(), _two_layers()
    inputs = torch.randn(5, 4)
    with fsdp_probe.storage_check(model):
        model(inputs).square().sum().backward()
    plain(inputs).square().sum().backward()
    for checked, reference in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(checked.grad, reference.grad, rtol=0, atol=0)
