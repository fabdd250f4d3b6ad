"""``stage.module.loss_weighting``: the training loss as LAVIS takes it (the mean over every answer token of the
micro-batch) or with every sample weighing the same (the mean of each sample's own token mean), on batches of the
real loader; a wrong value names the key and the allowed values."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from train_helpers import compose, tiny_overrides


def one_row(batch: dict, row: int) -> dict:
    return {k: v[row:row + 1] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}


class LossesOfEachWeighting(pl.Callback):
    """Before each training step, in eval mode (no dropout, so the batch and its rows compute the same things): the
    module's loss under each weighting, and each labelled row's loss computed on that row alone."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modes = {m: m.training for m in pl_module.model.modules()}
        configured = pl_module.loss_weighting
        pl_module.model.eval()
        with torch.no_grad():
            losses = {}
            for weighting in ("token", "sample"):
                pl_module.loss_weighting = weighting
                losses[weighting] = float(pl_module.compute_loss(batch)[0])
            pl_module.loss_weighting = "token"  # a single row's token mean is that sample's loss
            labelled = (batch["labels"] != -100).sum(dim=1)
            rows = [float(pl_module.compute_loss(one_row(batch, i))[0]) for i in range(len(labelled)) if labelled[i]]
        pl_module.loss_weighting = configured
        for module, training in modes.items():
            module.train(training)
        self.seen.append(dict(losses=losses, rows=rows, labelled=labelled.tolist()))


def test_sample_weighting_averages_each_samples_mean_and_token_weighting_every_token(
    tiny_checkpoint, generated_data, tmp_path
):
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=4), "data.batch_size=4",
                   "stage.module.loss_weighting=sample"], tmp_path)
    module, datamodule, trainer = build(cfg)
    assert module.loss_weighting == "sample"
    record = LossesOfEachWeighting()
    trainer.callbacks.append(record)
    trainer.fit(module, datamodule=datamodule)

    assert len(record.seen) == 4
    uneven = 0
    for step in record.seen:
        counts = [n for n in step["labelled"] if n]
        rows = torch.tensor(step["rows"])
        assert step["losses"]["sample"] == pytest.approx(float(rows.mean()), rel=1e-5)
        weights = torch.tensor(counts, dtype=torch.float64)
        token_mean = float((rows.double() * weights).sum() / weights.sum())
        assert step["losses"]["token"] == pytest.approx(token_mean, rel=1e-5)
        if len(set(counts)) > 1:  # answers of different lengths: the two weightings differ
            uneven += 1
            assert step["losses"]["token"] != pytest.approx(step["losses"]["sample"], rel=1e-4)
    assert uneven, "no batch mixed answer lengths; the test could not tell the weightings apart"


def test_a_wrong_weighting_names_the_key_and_the_choices():
    from instructblip.errors import ConfigError
    from instructblip.train.module import InstructBlipModule

    with pytest.raises(ConfigError, match=r"stage\.module\.loss_weighting='mean'; allowed: token, sample"):
        InstructBlipModule(model=lambda: None, optimizer=None, scheduler=None, loss_weighting="mean")


def test_the_config_check_names_the_key_and_the_choices(tmp_path):
    """On the command line the check comes before the module is built: one line, not Hydra's instantiation error."""
    from instructblip.errors import ConfigError
    from instructblip.train.validate import check_config

    cfg = compose(["experiment=smoke", "stage.module.loss_weighting=mean"], tmp_path)
    with pytest.raises(ConfigError, match=r"stage\.module\.loss_weighting='mean' \(str\); expected token, sample"):
        check_config(cfg)
