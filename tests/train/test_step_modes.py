"""``stage.module.step_mode``: the whole training step (forward, backward, non-finite skip, clipping, optimizer) run
by the module itself, as one CUDA graph (``cuda_graph``, GPU) or eagerly (``manual``, any device), inside
Lightning's loop: it trains like Lightning's own step, counts steps, follows the schedule, resumes exactly, skips
non-finite steps; the combinations it cannot run are refused at config time."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from train_helpers import Killed, compose, stop_before_step, tiny_overrides

FIXED = "data.fixed_lengths={instruction: 40, target: 12, qformer: 40}"
# two length buckets: the generated data's first five batches take both (four the second, then one the first)
BUCKETS = ("data.fixed_lengths=[{instruction: 32, target: 24, qformer: 16}, "
           "{instruction: 48, target: 32, qformer: 32}]")
# the default callbacks (checkpoints every 2 steps among them) without the progress bar and throughput monitor
CHECKPOINTING = ("stage.module.step_mode=manual", "callbacks=default", "callbacks.progress_bar=null",
                 "callbacks.throughput=null")


class Record(pl.Callback):
    """Per optimiser step: the logged loss and learning rate, and the trainable weights after it."""

    def __init__(self):
        self.losses, self.lrs, self.weights = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.lrs.append(float(trainer.callback_metrics["train/lr"]))
        self.weights.append({k: v.clone() for k, v in pl_module.trainable_state_dict().items()})


def build(tiny_checkpoint, generated_data, run_dir, steps: int, *overrides: str, lengths: str = FIXED):
    from instructblip.train.run import build as build_run

    # the smoke experiment's schedule (a warm-up, then cosine) and clipping (gradient_clip_val=1.0)
    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=steps),
                   "checkpoint.every_n_steps=2", "optimizer.lr=1e-2", lengths, *overrides], run_dir)
    module, datamodule, trainer = build_run(cfg)
    record = Record()
    trainer.callbacks.append(record)
    return module, datamodule, trainer, record


def test_manual_step_mode_trains_like_lightnings_step(tiny_checkpoint, generated_data, tmp_path):
    """Over batches padded to two length buckets, with the smoke run's clipping and warm-up schedule."""
    runs = {}
    for mode in ("automatic", "manual"):
        module, datamodule, trainer, record = build(tiny_checkpoint, generated_data, tmp_path / mode, 5,
                                                    f"stage.module.step_mode={mode}", lengths=BUCKETS)
        trainer.fit(module, datamodule=datamodule)
        runs[mode] = (module, trainer, record)
    (_, auto_trainer, auto), (module, trainer, manual) = runs["automatic"], runs["manual"]
    assert trainer.global_step == auto_trainer.global_step == 5  # Lightning counted every whole step
    assert manual.lrs == pytest.approx(auto.lrs, rel=1e-6) and len(set(manual.lrs)) >= 4  # the schedule moved
    assert manual.losses == pytest.approx(auto.losses, rel=1e-5) and len(set(auto.losses)) == 5
    for step, (ours, theirs) in enumerate(zip(manual.weights, auto.weights)):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
    # every weight moved (clipping at 1.0 and the schedule applied, not a step that did nothing)
    first = manual.weights[0]
    assert all(not torch.equal(first[k], manual.weights[-1][k]) for k in first)
    optimizer = trainer.optimizers[0]
    assert {int(state["step"]) for state in optimizer.state.values()} == {5}
    assert all(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups)
    assert module.nonfinite_skipped == 0


def test_manual_step_mode_resumes_exactly(tiny_checkpoint, generated_data, tmp_path):
    module, datamodule, trainer, reference = build(tiny_checkpoint, generated_data, tmp_path / "whole", 5,
                                                   *CHECKPOINTING)
    trainer.fit(module, datamodule=datamodule)

    run_dir = tmp_path / "killed"
    module, datamodule, trainer, _ = build(tiny_checkpoint, generated_data, run_dir, 5,
                                           *CHECKPOINTING)
    trainer.callbacks.append(stop_before_step(3))
    with pytest.raises(Killed):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3 and (run_dir / "checkpoints" / "step=2.ckpt").exists()
    module, datamodule, trainer, resumed = build(tiny_checkpoint, generated_data, run_dir, 5,
                                                 *CHECKPOINTING)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(run_dir / "checkpoints" / "step=2.ckpt"),
                weights_only=False)
    assert trainer.global_step == 5 and len(resumed.weights) == 3  # steps 3, 4 and 5
    assert resumed.lrs == reference.lrs[2:]
    final, expected = resumed.weights[-1], reference.weights[-1]
    assert all(torch.equal(final[k], expected[k]) for k in expected), "the resumed run ended elsewhere"


def test_manual_step_mode_skips_a_nonfinite_step_and_stops_after_too_many(tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.module import NonFiniteLossError

    class NanImages(pl.Callback):
        def __init__(self, steps: set[int] | None):
            self.steps = steps

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.steps is None or trainer.global_step in self.steps:
                batch["pixel_values"].fill_(float("nan"))

    module, datamodule, trainer, record = build(tiny_checkpoint, generated_data, tmp_path / "one", 4,
                                                "stage.module.step_mode=manual")
    trainer.callbacks.append(NanImages({1}))
    trainer.fit(module, datamodule=datamodule)
    assert module.nonfinite_skipped == 1 and module.nonfinite_in_a_row == 0 and trainer.global_step == 4
    before, skipped, after = record.weights[0], record.weights[1], record.weights[2]
    assert all(torch.equal(before[k], skipped[k]) for k in before), "the NaN step changed weights"
    assert any(not torch.equal(skipped[k], after[k]) for k in before), "training did not go on after the skip"
    assert {int(state["step"]) for state in trainer.optimizers[0].state.values()} == {3}

    module, datamodule, trainer, _ = build(tiny_checkpoint, generated_data, tmp_path / "many", 10,
                                           "stage.module.step_mode=manual", "faults.max_consecutive_nonfinite=2")
    trainer.callbacks.append(NanImages(None))
    with pytest.raises(NonFiniteLossError, match=r"3 optimiser steps in a row had a NaN/inf loss"):
        trainer.fit(module, datamodule=datamodule)

    # a step's skip is read one step late (no host wait between steps), or at once on logging and checkpointing
    # steps (none here): the run's end reads the last step's
    module, datamodule, trainer, _ = build(tiny_checkpoint, generated_data, tmp_path / "last", 4,
                                           "stage.module.step_mode=manual", "faults.max_consecutive_nonfinite=1",
                                           "trainer.log_every_n_steps=50", "checkpoint.every_n_steps=50")
    trainer.callbacks.append(NanImages({2, 3}))
    with pytest.raises(NonFiniteLossError, match=r"2 optimiser steps in a row had a NaN/inf loss"):
        trainer.fit(module, datamodule=datamodule)


def test_step_modes_refuse_what_they_cannot_run(tmp_path):
    from instructblip.errors import ConfigError
    from instructblip.train.validate import check_config

    graph, manual = "stage.module.step_mode=cuda_graph", "stage.module.step_mode=manual"
    cases = {
        ("stage.module.step_mode=eager",): r"stage.module.step_mode='eager'.*automatic, cuda_graph, manual",
        (graph, FIXED): r"step_mode=cuda_graph needs a GPU \(trainer.accelerator=cpu\).*step_mode=manual",
        (graph, "trainer=gpu"): r"step_mode=cuda_graph replays captured batch shapes: set data.fixed_lengths",
        (manual, "trainer=fsdp", "trainer.accelerator=cpu"): r"step_mode=manual runs on one device .* or under DDP "
                                                             r"\(trainer=ddp, trainer=ddp_cpu\).*trainer=fsdp use",
        (manual, "trainer=cpu", "trainer.devices=2"): r"step_mode=manual runs on one device",
        (manual, "trainer.accumulate_grad_batches=2"): r"trainer.accumulate_grad_batches=2 needs .*automatic",
        (manual, "trainer.precision=16-mixed"): r"trainer.precision=16-mixed; allowed: 32-true, bf16-mixed",
        (manual, "stage.module.loss_weighting=sample"): r"loss_weighting=sample needs stage.module.step_mode=auto",
        (manual, "model.overrides.pack_sequences=true"): r"pack_sequences=true reads the sample lengths",
        (manual, "stage.module.compile=true", "stage.module.compile_scope=whole"): r"compile_scope=whole is untes",
        (manual, "trainer.gradient_clip_algorithm=value"): r"clips by the global norm only",
        ("data.fixed_lengths={instruction: 8, target: 4}",): r"data.fixed_lengths has keys \['instruction', 'tar",
        ("stage=blip2_stage1", "data=captions", FIXED): r"data.fixed_lengths is set but data.collate='caption'",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            check_config(compose(list(overrides), tmp_path))
        assert "\n" not in str(caught.value)
    check_config(compose([graph, "trainer=gpu", FIXED], tmp_path))  # what it needs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_mode_trains_like_the_manual_step(tiny_checkpoint, generated_data, tmp_path):
    """On a GPU, through instructblip-train's module (bf16-mixed, frozen towers in bf16, as trainer=gpu trains): the
    captured and replayed steps, two graphs in one memory pool for two length buckets, give the eager step's
    losses, learning rates and weights. The same kernels run in both, and dropout draws the same numbers (each
    step reseeded; a replay reads the generator's seed and offset)."""
    runs = {}
    for mode in ("manual", "cuda_graph"):
        module, datamodule, trainer, record = build(tiny_checkpoint, generated_data, tmp_path / mode, 5,
                                                    f"stage.module.step_mode={mode}", "trainer=gpu", lengths=BUCKETS)
        trainer.fit(module, datamodule=datamodule)
        runs[mode] = (module, trainer, record)
    (_, _, eager), (module, trainer, graphed) = runs["manual"], runs["cuda_graph"]
    steps = list(module._whole_steps.values())
    assert trainer.global_step == 5 and len(steps) == 2 and all(step.capture for step in steps)
    assert graphed.lrs == pytest.approx(eager.lrs, rel=1e-6)
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-3) and len(set(eager.losses)) == 5
    for ours, theirs in zip(graphed.weights, eager.weights):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-4, msg=name)
