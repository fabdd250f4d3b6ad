"""``train(cfg)``: the composed Hydra config -> a finished (or resumed) run. The CLI is a thin wrapper around it.

Everything is built with ``hydra.utils.instantiate`` from the config tree (model factory, LightningModule, DataModule,
callbacks, loggers, trainer); nothing is chosen by if-chains. Resume: ``ckpt_path`` names a checkpoint, or
``resume: auto`` picks the newest ``<output_dir>/checkpoints/*.ckpt`` when there is one (a requeued or restarted job with the
same output directory continues where it stopped).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("instructblip.train")


def _instantiate_many(section: Any) -> list:
    """Callbacks or loggers: a dict of ``_target_`` configs (null entries dropped), or one, or nothing."""
    from hydra.utils import instantiate

    if section is None:
        return []
    if isinstance(section, DictConfig) and "_target_" in section:
        return [instantiate(section)]
    return [instantiate(value) for value in section.values() if value is not None and "_target_" in value]


def resume_path(cfg: DictConfig) -> str | None:
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.exists():
            from instructblip.errors import CheckpointError

            raise CheckpointError(f"ckpt_path={path} does not exist")
        return str(path)
    if cfg.get("resume", "auto") == "auto":
        # the newest complete checkpoint (files are renamed into place whole): last.ckpt, or a step=N.ckpt written
        # just before a kill that came before last.ckpt was rewritten
        found = sorted(Path(str(cfg.paths.checkpoint_dir)).glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
        if found:
            return str(found[-1])
    return None


def build(cfg: DictConfig):
    """(module, datamodule, trainer) from the config, nothing run yet."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from instructblip.train.validate import check_config

    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model_factory = instantiate(cfg.model, _partial_=True)
    module = instantiate(
        cfg.stage.module, model=model_factory, optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    datamodule = instantiate(cfg.data)
    callbacks = _instantiate_many(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a progress bar callback then
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    loggers = _instantiate_many(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **validation_schedule(cfg))
    return module, datamodule, trainer


def validation_schedule(cfg: DictConfig) -> dict:
    """Trainer arguments for validating every ``validation.every_n_steps`` optimiser steps (Lightning counts
    training batches, so the interval is multiplied by the accumulation), or never."""
    every = cfg.validation.every_n_steps
    if every is None or every > cfg.trainer.max_steps:
        return {"limit_val_batches": 0, "check_val_every_n_epoch": None, "val_check_interval": None}
    return {"val_check_interval": int(every) * int(cfg.trainer.accumulate_grad_batches),
            "check_val_every_n_epoch": None}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the stage; returns the last logged metrics (floats) for sweepers."""
    from instructblip.train.wandb_logging import finish

    module, datamodule, trainer = build(cfg)
    try:
        for lg in trainer.loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        ckpt = resume_path(cfg)
        if ckpt:
            log.info("resuming from %s", ckpt)
        # weights_only=False: our own resume checkpoints carry the RNG states (numpy/python objects) next to the tensors
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)
    finally:  # each job closes its W&B run, whatever happened (the jobs of a local multirun share one process)
        finish(trainer.loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    if trainer.is_global_zero:
        log.info("finished at step %d; %s", trainer.global_step,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("train/loss")))
    return metrics
