"""PreemptionCheckpoint and the W&B settings, in-process (the cluster tests run them through SLURM)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from instructblip.train import slurm, wandb_logging

pytestmark = pytest.mark.slurm


class SignalAt(pl.Callback):
    """Sends the preemption signal to this process during training step ``step`` (inside the step)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR2)


class SameBatches(BoringModel):
    """Every batch alike, so that a resumed run's result does not depend on where its data loader restarts
    (the training DataModule's exact data position is checked by the cluster test with the real data)."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader([torch.full((32,), 0.5)] * 64, batch_size=2)


def fit(tmp_path, *callbacks, ckpt_path=None, steps=8):
    pl.seed_everything(0)
    model = SameBatches()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=list(callbacks),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_signal_checkpoints_at_the_next_step_boundary_then_hands_over_to_submitit(tmp_path, monkeypatch):
    handed_over = []

    def submitit_handler(signum, frame):  # stands in for submitit's: it requeues and exits
        handed_over.append((signum, (tmp_path / "checkpoints" / "last.ckpt").exists()))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            fit(tmp_path, SignalAt(step=3), slurm.PreemptionCheckpoint())
        # submitit's handler ran once, after the checkpoint existed, not from inside the signal
        assert handed_over == [(signal.SIGUSR2, True)]
        with pytest.raises(SystemExit):  # the fit is over: the signal is submitit's again
            os.kill(os.getpid(), signal.SIGUSR2)
        assert len(handed_over) == 2
    finally:
        signal.signal(signal.SIGUSR2, previous)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4  # the signal came during step 3: saved once step 3 had finished
    assert not list((tmp_path / "checkpoints").glob(".*partial"))

    resumed = fit(tmp_path / "resume", ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    undisturbed = fit(tmp_path / "undisturbed")
    for (name, a), (_, b) in zip(resumed.state_dict().items(), undisturbed.state_dict().items()):
        assert torch.equal(a, b), name


def test_lightning_auto_requeue_is_switched_off_under_slurm(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train",
                       "SLURM_JOB_ID": "77", "SLURM_NODELIST": "vm", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            environment = trainer._accelerator_connector.cluster_environment
            seen["slurm"] = isinstance(environment, SLURMEnvironment)
            seen["auto_requeue"] = environment.auto_requeue
            seen["usr1"] = signal.getsignal(signal.SIGUSR1)

    fit(tmp_path, slurm.PreemptionCheckpoint(), Probe(), steps=1)
    assert seen["slurm"] and seen["auto_requeue"] is False
    assert seen["usr1"] in (signal.SIG_DFL, None), "Lightning installed its USR1 requeue handler"


def test_wandb_is_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_logging.wandb_mode(None) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_logging.wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_logging.wandb_mode(None) == "offline"
    assert wandb_logging.wandb_mode(False) == "online"


def test_run_id_follows_the_slurm_job_else_stays_with_the_output_dir(tmp_path, monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CLUSTER_NAME"):
        monkeypatch.delenv(key, raising=False)
    first = wandb_logging.run_id(tmp_path)
    assert wandb_logging.run_id(tmp_path) == first != wandb_logging.run_id(tmp_path / "other")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "gpu-cluster")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert wandb_logging.run_id(tmp_path) == "gpu-cluster-1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert wandb_logging.run_id(tmp_path) == "gpu-cluster-1200_3"


def test_log_model_offline_is_refused_with_the_key_named(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(Exception, match="logger.wandb.log_model"):
        wandb_logging.wandb_logger(save_dir=str(tmp_path), log_model=True)
