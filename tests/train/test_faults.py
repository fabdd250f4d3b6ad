"""A NaN/inf loss skips the optimiser step (weights and AdamW state untouched) and is counted; too many in a row
stop the run with a clear message."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from train_helpers import compose, tiny_overrides


class Snapshots(pl.Callback):
    """The trainable weights after every optimiser step."""

    def __init__(self):
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append({k: v.clone() for k, v in pl_module.trainable_state_dict().items()})


def poison(module, bad_batches: set[int] | None):
    """Make the loss of the given micro-batches (all when None) NaN, the rest untouched."""
    original = module.compute_loss

    def compute_loss(batch):
        loss, per_sample = original(batch)
        if bad_batches is None or module.trainer.fit_loop.total_batch_idx in bad_batches:
            loss = loss * float("nan")
        return loss, per_sample

    module.compute_loss = compute_loss


def build_with_snapshots(tiny_checkpoint, generated_data, tmp_path, steps: int):
    """A smoke run (no warm-up, a learning rate that moves every weight) recording its weights after each step."""
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=steps),
                   "scheduler.warmup_steps=0", "optimizer.lr=1e-2"], tmp_path)
    module, datamodule, trainer = build(cfg)
    snapshots = Snapshots()
    trainer.callbacks.append(snapshots)
    return module, datamodule, trainer, snapshots


def test_nonfinite_loss_skips_the_step_and_is_counted(tiny_checkpoint, generated_data, tmp_path):
    module, datamodule, trainer, snapshots = build_with_snapshots(tiny_checkpoint, generated_data, tmp_path, 4)
    poison(module, {1})
    trainer.fit(module, datamodule=datamodule)

    assert module.nonfinite_skipped == 1 and module.nonfinite_in_a_row == 0
    before, skipped, after = snapshots.after_step[0], snapshots.after_step[1], snapshots.after_step[2]
    assert all(torch.equal(before[k], skipped[k]) for k in before), "the NaN step changed weights"
    assert any(not torch.equal(skipped[k], after[k]) for k in before), "training did not continue after the skip"
    assert all(torch.isfinite(v).all() for v in snapshots.after_step[-1].values())
    optimizer = trainer.optimizers[0]
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {3}, f"AdamW counted the skipped step: {steps}"
    assert trainer.global_step == 4  # the skipped step used its batch and its schedule slot


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.module import NonFiniteLossError
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=10),
                   "faults.max_consecutive_nonfinite=2"], tmp_path)
    module, datamodule, trainer = build(cfg)
    poison(module, None)
    with pytest.raises(NonFiniteLossError, match=r"3 optimiser steps in a row had a NaN/inf loss.*"
                                                 r"faults.max_consecutive_nonfinite=2"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2


def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_step(tiny_checkpoint, generated_data, tmp_path):
    module, datamodule, trainer, snapshots = build_with_snapshots(tiny_checkpoint, generated_data, tmp_path, 3)
    poisoned = []

    class PoisonOneGradient(pl.Callback):
        """One inf in one gradient (the last trainable tensor, far from the loss), second micro-batch only."""

        def on_train_start(self, trainer, pl_module):
            name, param = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad][-1]
            poisoned.append(name)

            def poison_grad(grad):
                if trainer.fit_loop.total_batch_idx == 1:
                    grad = grad.clone()
                    grad.view(-1)[0] = float("inf")
                return grad

            param.register_hook(poison_grad)

    trainer.callbacks.append(PoisonOneGradient())
    trainer.fit(module, datamodule=datamodule)

    assert module.nonfinite_skipped == 1, poisoned
    before, skipped = snapshots.after_step[0], snapshots.after_step[1]
    assert all(torch.equal(before[k], skipped[k]) for k in before), "the step with an inf gradient changed weights"
    assert all(torch.isfinite(v).all() for v in snapshots.after_step[-1].values())


def test_clipping_uses_the_norm_of_the_nonfinite_check_and_clips_like_torch(
    tiny_checkpoint, generated_data, tmp_path, monkeypatch
):
    """With gradient_clip_val set the gradients reach AdamW scaled to that norm, as clip_grad_norm_ scales them, and
    the norm is taken once per step (Lightning's clip_grad_norm_, which would take it again, is not called)."""
    module, datamodule, trainer, _ = build_with_snapshots(tiny_checkpoint, generated_data, tmp_path, 3)
    trainer.gradient_clip_val = 1e-3  # far below the gradients' norm: every step clips
    raw, clipped = [], []

    def grads(params):
        return {id(p): p.grad.clone() for p in params if p.grad is not None}

    class GradientsAroundClipping(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(
                lambda opt, args, kwargs: clipped.append(grads(p for g in opt.param_groups for p in g["params"]))
            )

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's hook
            raw.append(grads(pl_module.parameters()))

    def second_norm(*args, **kwargs):
        raise AssertionError("the gradient norm was taken a second time")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", second_norm)
    trainer.callbacks.append(GradientsAroundClipping())
    trainer.fit(module, datamodule=datamodule)

    assert len(raw) == len(clipped) == 3
    for before, after in zip(raw, clipped):
        norm = torch.nn.utils.get_total_norm(list(before.values()))
        assert norm > 10 * trainer.gradient_clip_val
        scale = trainer.gradient_clip_val / (norm + 1e-6)  # clip_grad_norm_'s coefficient
        assert after.keys() == before.keys()
        for key, grad in before.items():
            torch.testing.assert_close(after[key], grad * scale)
