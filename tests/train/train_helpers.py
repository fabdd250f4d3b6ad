"""Helpers shared by the training tests (composing the real config tree for a temporary run directory)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def compose(overrides: list[str], run_dir: Path):
    """The composed train config with the given overrides, its run directory ``run_dir`` (no Hydra run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    import instructblip.train  # noqa: F401  (registers the resolvers)

    os.environ.setdefault("INSTRUCTBLIP_ROOT", str(REPO))
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.checkpoint_dir = str(run_dir / "checkpoints")
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


def tiny_overrides(checkpoint: Path, data: Path, steps: int = 1) -> list[str]:
    """Everything an experiment needs to run on this machine: the tiny model, generated shards, a CPU."""
    return [
        "model=tiny", f"model.pretrained={checkpoint}", "model.init_from=null", "trainer=cpu",
        f"trainer.max_steps={steps}", "trainer.devices=1", "trainer.num_nodes=1", "logger=none", "callbacks=none",
        "data=generated", f"data.generate.out_dir={data}", "data.generate.samples_per_dataset=32",
        "data.generate.samples_per_shard=16", "data.generate.image_size=32", "data.batch_size=2",
        "data.num_workers=0", "validation.every_n_steps=null", "+trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


class Killed(Exception):
    """What :func:`stop_before_step` raises."""


def stop_before_step(step: int):
    """A Lightning callback that raises :class:`Killed` at the start of ``step``, as a kill would (after the
    checkpoint of the step before)."""
    import lightning.pytorch as pl

    class StopBeforeStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise Killed

    return StopBeforeStep()
