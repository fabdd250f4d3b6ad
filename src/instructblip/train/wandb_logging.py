"""W&B tracking: a WandbLogger that works on clusters without network and survives SLURM requeues.

* Offline when there is no API key (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``), so a run never
  blocks on the network; upload later with ``wandb sync <output_dir>/wandb/offline-run-*``. ``WANDB_MODE`` in the
  environment wins over that guess.
* Run id derived from the SLURM job (``<cluster>-<array job>_<task>`` or ``<cluster>-<job>``): a requeued job
  has the same id, and with ``resume="allow"`` it continues the same run. Outside SLURM the id is generated once
  and kept in ``<save_dir>/wandb_run_id``, so a restarted run with the same output directory continues too.
* Grouped by sweep: every job of one ``-m`` multirun has its sweep directory as the group; named after its
  overrides (``seed=2``).
* The resolved config is logged by the training entry point (``log_hyperparams``), the metrics by Lightning, and
  :class:`PredictionTable` logs sample predictions with their images at each validation.
* The run is finished when the fit ends (success, failure or preemption: Lightning calls ``finalize``), and
  :func:`finish` is the ``finally`` guard of the training entry point, so sequential jobs in one process never
  share a run.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import secrets
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from instructblip.errors import ConfigError
from instructblip.train.slurm import slurm_job_id

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


def has_api_key() -> bool:
    """Whether W&B could authenticate: an API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(offline: bool | None) -> str:
    """``online`` or ``offline``: explicit ``offline`` first, then ``WANDB_MODE``, then whether a key exists."""
    if offline is not None:
        return "offline" if offline else "online"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env in ("online", "run", "disabled"):
        return "disabled" if env == "disabled" else "online"
    return "online" if has_api_key() else "offline"


def run_id(save_dir: str | os.PathLike) -> str:
    """A run id that is the same for every run of the same job (see the module docstring)."""
    job = slurm_job_id()
    if job is not None:
        cluster = os.environ.get("SLURM_CLUSTER_NAME", "slurm")
        # Job ids are unique within one cluster only (and restart when a cluster is reinstalled).
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{cluster}-{job}")
    path = Path(save_dir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    new_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new_id + "\n")
    return new_id


def _hydra_job() -> tuple[str | None, str | None]:
    """(group, name) from the Hydra job: the sweep directory and the job's overrides in a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app
        return None, None
    if hydra.mode != RunMode.MULTIRUN:
        return None, None
    name = hydra.job.override_dirname or f"{hydra.job.name}-{hydra.job.num}"
    return str(hydra.sweep.dir)[-128:], name[:128]  # W&B's limit for both


class InstructBlipWandbLogger(WandbLogger):
    """WandbLogger that finishes its W&B run when Lightning finalises the fit, whatever the outcome."""

    def finalize(self, status: str) -> None:
        super().finalize(status)
        finish([self], exit_code=0 if status == "success" else 1)


def wandb_logger(
    project: str = "instructblip",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    job_type: str = "train",
    entity: str | None = None,
    offline: bool | None = None,
    id: str | None = None,  # noqa: A002 - W&B's name for it
    log_model: bool | str = False,
) -> WandbLogger:
    """The project's WandbLogger (``conf/logger/wandb.yaml`` instantiates it). ``None`` means: derive it."""
    mode = wandb_mode(offline)
    if log_model and mode != "online":
        raise ConfigError(
            f"logger.wandb.log_model={log_model!r} needs W&B online (mode is {mode}: no API key, or WANDB_MODE); "
            "set logger.wandb.log_model=false, or log in with `wandb login`"
        )
    import wandb

    if wandb.run is not None:  # left open by an earlier job of this process (a sequential multirun)
        log.warning("finishing W&B run %s left open by an earlier job", wandb.run.id)
        wandb.finish(exit_code=1)
    sweep_group, job_name = _hydra_job()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    identifier = id or run_id(save_dir)
    log.info("W&B run %s (%s) in %s", identifier, mode, save_dir)
    return InstructBlipWandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or job_name,
        group=group or sweep_group,
        tags=list(tags),
        job_type=job_type,
        entity=entity,
        id=identifier,
        log_model=log_model,
        mode=mode,
    )


def finish(loggers: list[Any], exit_code: int | None = None, preempting: bool = False) -> None:
    """Finish the W&B runs these loggers opened; a no-op for other loggers and for runs already finished.

    It never raises: it runs while a job is ending (after an error, or on preemption while SLURM is already
    signalling the job's processes, W&B's service process included), where an error here would replace the
    job's real outcome. ``preempting`` marks the run as preempted first (the requeued job resumes it).
    """
    for logger in loggers:
        run = getattr(logger, "_experiment", None)
        if not isinstance(logger, WandbLogger) or run is None:
            continue
        logger._experiment = None
        try:
            if preempting:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.warning("W&B run %s did not finish cleanly: %s", getattr(run, "id", "?"), error)


class PredictionTable(Callback):
    """Logs a W&B table of validation samples: image, instruction, prediction, references (first ``max_rows``).

    It reads the validation batch (examples with ``image``, ``record`` and ``dataset``) and the predictions that
    ``validation_step`` returns for it. Without a WandbLogger it does nothing.
    """

    columns = ["step", "dataset", "id", "image", "instruction", "prediction", "references"]

    def __init__(self, max_rows: int = 16, key: str = "val/predictions") -> None:
        self.max_rows = max_rows
        self.key = key
        self._rows: list[list[Any]] = []

    @staticmethod
    def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.is_global_zero or not self._wandb_loggers(trainer) or len(self._rows) >= self.max_rows:
            return
        if not isinstance(outputs, (list, tuple)):
            return  # this module's validation_step returns no predictions
        import wandb

        from instructblip.data.templates import render_evaluation

        examples = [example for example in batch if example is not None]
        for example, prediction in zip(examples, outputs):
            if len(self._rows) >= self.max_rows:
                break
            record, image = example["record"], example["image"]
            if isinstance(image, (list, tuple)):  # a video: its first frame stands for it
                image = image[0]
            self._rows.append([
                trainer.global_step, example["dataset"], record.id, wandb.Image(image),
                render_evaluation(record).instruction, prediction, " | ".join(record.answers),
            ])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rows:
            return
        for logger in self._wandb_loggers(trainer):
            logger.log_table(self.key, columns=self.columns, data=self._rows, step=trainer.global_step)
        self._rows = []
