"""SLURM: resources from the trainer config, and preemption handled by one owner.

Resources. The `hydra/launcher=submitit_slurm` preset takes the job's shape from the trainer config, the one
place where it is written: ``tasks_per_node = trainer.devices`` (Lightning's SLURM environment requires it, one
rank per srun task), ``gpus_per_node = trainer.devices`` when the accelerator is a GPU, ``nodes =
trainer.num_nodes``. The resolvers below do that mapping and reject what SLURM cannot express
(``devices: auto``) with a message naming the key.

Preemption. submitit asks SLURM for ``--signal=USR2@<signal_delay_s>`` and installs its own USR2 handler, which
re-pickles the Hydra job, runs ``scontrol requeue`` and exits at once, from inside the signal handler, wherever
the training step happens to be. Lightning, for its part, listens on USR1 and saves inside its handler too.
Saving inside a signal handler can deadlock (the signal may land in the middle of a backward or a collective),
so here one owner is picked:

* the signal is submitit's (USR2, or ``$SUBMITIT_PREEMPT_SIGNAL``), and requeueing stays submitit's, so that its
  bookkeeping (timeout countdown, ``max_num_timeout``, the re-pickled job) keeps working;
* :class:`PreemptionCheckpoint` replaces the handler (before the data loaders fork) with one that only sets a
  flag; at the next training step boundary every rank agrees on the flag, the full training state is written
  to ``last.ckpt`` (atomically), and only then is submitit's handler called to requeue the job;
* Lightning's own SLURM auto-requeue is switched off, so that a stray USR1 cannot start a second save.

The requeued job is the same Hydra job (same overrides, same ``${hydra.sweep.dir}/${hydra.job.num}`` output
directory), so the training entry point's ``resume: auto`` finds ``last.ckpt`` there and resumes from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from instructblip.errors import ConfigError

log = logging.getLogger(__name__)

PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # the variable submitit reads; it defaults to USR2
LAST_CHECKPOINT = "last.ckpt"

# --------------------------------------------------------------------------------------------- resources


def tasks_per_node(devices: Any) -> int:
    """SLURM tasks per node for ``trainer.devices``: one task per device, as Lightning's SLURM environment needs."""
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        count = len(devices)  # an explicit list of device indices
    else:
        text = str(devices).strip()
        count = int(text) if text.lstrip("-").isdigit() else 0
        if "," in text:  # "0,1,3": device indices as a string
            count = len([part for part in text.split(",") if part.strip()])
    if count < 1:
        raise ConfigError(
            f"trainer.devices={devices!r} cannot be mapped to SLURM tasks_per_node: under hydra/launcher=submitit_slurm"
            " set trainer.devices to the number of devices per node (a positive integer, or a list of indices)"
        )
    return count


def gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """GPUs to request per node: one per device on a GPU trainer, none otherwise."""
    if str(accelerator).lower() in ("gpu", "cuda"):
        return tasks_per_node(devices)
    return None


def nodes(num_nodes: Any) -> int:
    """SLURM nodes for ``trainer.num_nodes``."""
    text = str(num_nodes).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"trainer.num_nodes={num_nodes!r} must be a positive integer under hydra/launcher=submitit_slurm")
    return int(text)


_RESOLVERS = {
    "instructblip.tasks_per_node": tasks_per_node,
    "instructblip.gpus_per_node": gpus_per_node,
    "instructblip.nodes": nodes,
}


def register_hydra_extensions() -> None:
    """Register what the ``conf/hydra/launcher`` presets use; the training entry point imports this module first.

    Our presets keep the plugin's names (``submitit_slurm``, ``submitit_local``), so Hydra validates them against
    the plugin's schemas of the same name (SlurmQueueConf, LocalQueueConf). It warns that this automatic matching
    is deprecated, but the plugin registers those names itself and re-registers them on every plugin scan, so a
    renamed schema in a defaults list is not available to extend; the presets also name ``_target_`` themselves.
    """
    from omegaconf import OmegaConf

    for name, function in _RESOLVERS.items():
        OmegaConf.register_new_resolver(name, function, replace=True)
    warnings.filterwarnings(
        "ignore", message=r"(?s).*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema"
    )


register_hydra_extensions()

# --------------------------------------------------------------------------------------------- job identity


def slurm_job_id() -> str | None:
    """The job id as SLURM and submitit name it (``<array job>_<task>`` for an array task), or None outside SLURM."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


# --------------------------------------------------------------------------------------------- preemption


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before a preemption or the time limit (USR2 unless overridden)."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ConfigError(f"{PREEMPT_SIGNAL_ENV}={name!r} is not a signal name; use e.g. USR2") from None


class PreemptionCheckpoint(Callback):
    """On the preemption signal: checkpoint at the next training step boundary, then requeue through submitit.

    Args:
        dirpath: where ``last.ckpt`` goes; default: the ModelCheckpoint callback's directory, else
            ``<default_root_dir>/checkpoints``. The training entry point resumes from the same file.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.signal = preemption_signal()
        self._requested = False
        self._previous_handler: Any = None
        self._installed = False
        self._active = False
        self._owner_pid = os.getpid()

    # -- signal: only a flag, nothing else may run inside the handler
    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._owner_pid:
            return  # a forked DataLoader worker inherited the handler: the training process acts, not the worker
        if self._active:
            self._requested = True
        elif callable(self._previous_handler):
            # The fit is over, but Lightning, restoring the handlers it found at its start, put this one back:
            # the signal belongs to its previous owner again.
            self._previous_handler(signum, frame)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # One owner: with Lightning's auto-requeue on, USR1 would trigger a save inside Lightning's signal handler.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is None:
            environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False
        # Before the data loaders start: their forked workers inherit this handler (which ignores the signal there)
        # rather than submitit's (which would requeue the job from a worker).
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: trainer.fit is not on the main thread, cannot handle %s", self.signal.name)
            return
        self._owner_pid = os.getpid()
        self._requested = False
        self._active = True
        if not self._installed:
            self._previous_handler = signal.signal(self.signal, self._on_signal)
            self._installed = True

    def _restore_handler(self) -> None:
        self._active = False
        if self._installed:
            signal.signal(self.signal, self._previous_handler if self._previous_handler is not None else signal.SIG_DFL)
            self._installed = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()  # Lightning skips the teardown hooks when the fit ends with an exception

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Every rank must take part in the save, but the signal may reach the ranks at different steps:
        # agree first (one tiny all-reduce per step; a no-op on one process).
        if trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            self._checkpoint_and_requeue(trainer)

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        directory = self.dirpath
        if directory is None and trainer.checkpoint_callback is not None:
            directory = getattr(trainer.checkpoint_callback, "dirpath", None)
        if directory is None:
            directory = os.path.join(trainer.default_root_dir, "checkpoints")
        return Path(directory) / LAST_CHECKPOINT

    def _checkpoint_and_requeue(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        job = slurm_job_id()
        log.warning(
            "preemption: %s received%s; saving %s at global step %d",
            self.signal.name, f" by SLURM job {job}" if job else "", path, trainer.global_step,
        )
        save_atomically(trainer, path)
        # Flush the loggers now: once the job is requeued, SLURM signals every process of the job, W&B's too.
        from instructblip.train.wandb_logging import finish

        for logger in trainer.loggers:
            logger.save()
        finish(trainer.loggers, exit_code=1, preempting=True)
        previous = self._previous_handler
        if callable(previous):
            # submitit's handler: re-pickles the Hydra job, requeues it (rank 0 only) and exits. On other ranks
            # it returns, and they stop too; the requeue ends the whole allocation anyway.
            previous(self.signal, None)
        elif job is not None and trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
            log.warning("preemption: requeued SLURM job %s", job)
        sys.exit(f"preempted by {self.signal.name} at global step {trainer.global_step}; resume from {path}")


def save_atomically(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to a temporary name, then renamed: a kill mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    trainer.save_checkpoint(partial)  # collective: every rank calls it (sharded strategies write a directory)
    if trainer.is_global_zero:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(partial, path)
    trainer.strategy.barrier("preemption checkpoint")
