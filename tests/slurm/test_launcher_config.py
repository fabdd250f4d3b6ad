"""The submitit presets map the trainer config to SLURM resources (composed and rendered, nothing submitted)."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from instructblip.train.validate import CONF_DIR

pytestmark = [
    pytest.mark.slurm,
    # the presets keep the plugin's names, so Hydra matches them with its schemas (see instructblip.train.slurm)
    pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning"),
]


def launcher_config(*overrides: str):
    import instructblip.train  # noqa: F401 - registers the presets' resolvers, as instructblip-train does

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return cfg


def sbatch_script(cfg, tmp_path) -> str:
    """The sbatch file submitit would write for this config, built the way the Hydra launcher builds it."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    launcher = instantiate(cfg.hydra.launcher)  # the real SlurmLauncher: resolves every interpolation
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")


def sbatch_flags(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, flags=re.M))


def test_gpu_trainer_maps_devices_and_nodes_to_slurm(tmp_path):
    cfg = launcher_config(
        "hydra/launcher=submitit_slurm", "experiment=smoke", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu", "hydra.launcher.account=vlm", "hydra.launcher.timeout_min=1440",
    )
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    flags = sbatch_flags(sbatch_script(cfg, tmp_path))
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "8"
    assert flags["gpus-per-node"] == "8"
    assert flags["time"] == "1440"
    assert flags["partition"] == "gpu"
    assert flags["account"] == "vlm"
    assert flags["signal"] == "USR2@120"  # the signal PreemptionCheckpoint handles
    assert "requeue" not in flags or flags["requeue"] is None


def test_cpu_trainer_requests_no_gpus(tmp_path):
    cfg = launcher_config("hydra/launcher=submitit_slurm", "experiment=smoke", "trainer=ddp_cpu", "trainer.devices=2")
    assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.nodes) == (2, None, 1)
    flags = sbatch_flags(sbatch_script(cfg, tmp_path))
    assert flags["ntasks-per-node"] == "2"
    assert "gpus-per-node" not in flags


def test_local_launcher_runs_one_task_that_sees_every_device():
    cfg = launcher_config("hydra/launcher=submitit_local", "trainer=ddp", "trainer.devices=4")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "LocalLauncher"
    assert (launcher.params["tasks_per_node"], launcher.params["gpus_per_node"], launcher.params["nodes"]) == (1, 4, 1)


def test_devices_slurm_cannot_express_is_named():
    cfg = launcher_config("hydra/launcher=submitit_slurm", "trainer.devices=auto")
    with pytest.raises(Exception, match=r"trainer.devices='auto' cannot be mapped to SLURM tasks_per_node"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
