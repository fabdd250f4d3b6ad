"""End-to-end runs through the console script: the smoke experiment, exact resume after SIGKILL, and 2-process DDP
(gloo) following the same trajectory as one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import REPO, compose, tiny_overrides

SCRIPT = Path(sys.executable).parent / "instructblip-train"


def train_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """``instructblip-train experiment=smoke``, uninterrupted: the reference the resume test compares against."""
    run_dir = tmp_path_factory.mktemp("smoke")
    result = train_cli(["experiment=smoke", f"hydra.run.dir={run_dir}"])
    assert "finished at step 6" in result.stdout + result.stderr
    return run_dir


def test_smoke_experiment_through_the_console_script(smoke_run):
    assert {p.name for p in (smoke_run / "checkpoints").iterdir()} == {"step=3.ckpt", "step=6.ckpt", "last.ckpt"}
    assert (smoke_run / "hf" / "config.json").exists()
    weights = load_trainable(smoke_run / "trainable.safetensors")
    assert any(k.startswith("qformer.") for k in weights) and not any(k.startswith("llm.") for k in weights)
    checkpoint = torch.load(smoke_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("model.llm.", "model.vision.trunk.")) for k in checkpoint["state_dict"])
    assert checkpoint["InstructBlipDataModule"]["batches_consumed"] == 6
    assert {"optimizer_states", "lr_schedulers", "loops", "instructblip"} <= set(checkpoint)


def test_sigkill_mid_run_then_resume_ends_bitwise_equal(smoke_run, tmp_path):
    args = ["experiment=smoke", f"hydra.run.dir={tmp_path}"]
    process = subprocess.Popen([str(SCRIPT), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while not (tmp_path / "checkpoints" / "step=3.ckpt").exists():  # killed mid-run: steps 4-6 are left
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "trainable.safetensors").exists(), "killed too late: the run had finished"
    result = train_cli(args)
    assert "resuming from" in result.stdout + result.stderr
    resumed, reference = load_trainable(tmp_path / "trainable.safetensors"), load_trainable(
        smoke_run / "trainable.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "resumed weights differ from the reference"


# 2 processes under gloo: DDP, and FSDP2 (trainer=fsdp on the CPU, fp32: its shards all-gathered, its gradients
# reduce-scattered, the checkpoint gathered on rank 0)
TWO_RANKS = {
    "ddp": ["trainer=ddp_cpu"],
    "fsdp": ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=1",
             "trainer.precision=32-true"],
}


@pytest.mark.parametrize("strategy", sorted(TWO_RANKS))
def test_two_processes_follow_the_single_process_trajectory(strategy, tiny_checkpoint, generated_data, tmp_path):
    """2 ranks x batch 2 (gloo) against 1 process x batch 2 x 2 accumulated micro-batches: the same 4 samples per
    optimiser step (GlobalBatchSampler), the same dropout (seeded by sample position), so the same weights after
    every step up to float rounding (DDP and FSDP average rank gradients, accumulation sums halves)."""
    from instructblip.train.run import build
    from lightning.pytorch.callbacks import Callback

    common = [f"model.pretrained={tiny_checkpoint}", f"data.generate.out_dir={generated_data}",
              "data.generate.samples_per_dataset=32", "data.generate.samples_per_shard=16",
              "data.generate.image_size=32", "data.batch_size=2", "trainer.max_steps=3", "validation.every_n_steps=null"]
    ddp_dir = tmp_path / strategy
    train_cli(["experiment=smoke", *TWO_RANKS[strategy], "logger=none", "checkpoint.every_n_steps=1",
               "checkpoint.keep_last=3", "checkpoint.export_huggingface=false", f"hydra.run.dir={ddp_dir}", *common])

    class Snapshots(Callback):
        def __init__(self):
            self.after_step = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not trainer.fit_loop._should_accumulate():
                self.after_step.append({k: v.clone() for k, v in pl_module.trainable_state_dict().items()})

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=3), *common,
                   "trainer.accumulate_grad_batches=2"], tmp_path / "single")
    module, datamodule, trainer = build(cfg)
    snapshots = Snapshots()
    trainer.callbacks.append(snapshots)
    trainer.fit(module, datamodule=datamodule)
    assert len(snapshots.after_step) == 3
    for step, single in enumerate(snapshots.after_step, start=1):
        state = torch.load(ddp_dir / "checkpoints" / f"step={step}.ckpt", map_location="cpu", weights_only=False)
        ddp = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
        assert ddp.keys() == single.keys()
        for key in single:
            if key.endswith(".key.bias"):
                # A key bias shifts every attention logit of a query equally, so softmax cancels it: its true
                # gradient is 0 and what it gets is rounding noise, which AdamW turns into steps of about lr. The two
                # runs round differently (averaged vs summed halves), so these may differ by up to lr per step.
                assert (ddp[key] - single[key]).abs().max() <= 2 * step * 1e-3, f"step {step}: {key}"
                continue
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")
    first = torch.load(ddp_dir / "checkpoints" / "step=1.ckpt", map_location="cpu", weights_only=False)
    assert any(not torch.equal(first["state_dict"][f"model.{k}"], v) for k, v in snapshots.after_step[-1].items())


def test_progress_bar_off_leaves_the_default_callbacks_usable(tiny_checkpoint, generated_data, tmp_path):
    """`trainer.enable_progress_bar=false` with `callbacks=default` (which lists a progress bar): Lightning refuses
    that pair, so the run leaves the bar's callback out instead of failing."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data), "callbacks=default"],
                  tmp_path)
    assert cfg.trainer.enable_progress_bar is False and "progress_bar" in cfg.callbacks
    _, _, trainer = build(cfg)
    assert not any(isinstance(callback, ProgressBar) for callback in trainer.callbacks)
    assert any(isinstance(callback, ModelCheckpoint) for callback in trainer.callbacks)


def test_manual_step_mode_under_ddp_trains_like_lightnings_ddp_step(tiny_checkpoint, generated_data, tmp_path):
    """stage.module.step_mode=manual on 2 ranks (gloo): the step averages the gradients itself (DDP's reducer kept
    out) and gives, step by step, the weights of Lightning's own DDP step on the same batches."""
    common = ["experiment=smoke", "trainer=ddp_cpu", "logger=none", f"model.pretrained={tiny_checkpoint}",
              f"data.generate.out_dir={generated_data}", "data.generate.samples_per_dataset=32",
              "data.generate.samples_per_shard=16", "data.generate.image_size=32", "data.batch_size=2",
              "trainer.max_steps=3", "validation.every_n_steps=null", "checkpoint.every_n_steps=1",
              "checkpoint.keep_last=3", "checkpoint.export_huggingface=false", "optimizer.lr=1e-2"]
    for mode in ("automatic", "manual"):
        train_cli([*common, f"stage.module.step_mode={mode}", f"hydra.run.dir={tmp_path / mode}"])
    moved = False
    for step in (1, 2, 3):
        states = [torch.load(tmp_path / mode / "checkpoints" / f"step={step}.ckpt", map_location="cpu",
                             weights_only=False)["state_dict"] for mode in ("automatic", "manual")]
        assert states[0].keys() == states[1].keys()
        for key in states[0]:
            torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6, msg=f"{step}: {key}")
        moved = moved or step > 1 and any(not torch.equal(states[0][k], first[k]) for k in first)
        first = states[0] if step == 1 else first
    assert moved, "the weights did not change between steps"
