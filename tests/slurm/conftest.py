"""A real single-node SLURM cluster for the session, started by scripts/slurm/start.sh.

The cluster (munged, mariadbd + slurmdbd for accounting, slurmctld, slurmd) is started once, in a temporary
directory on free ports, and stopped at the end. Tests that need it are skipped, with the reason, only when the
Debian packages are not installed (scripts/slurm/install_packages.sh; .ci/run installs them) or not as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_helpers import SCRIPTS, Cluster, free_port_base

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "scontrol")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing:
        pytest.skip(f"SLURM packages not installed (no {', '.join(missing)}): run scripts/slurm/install_packages.sh")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd launches the jobs)")
    directory = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin:/sbin"
    env["INSTRUCTBLIP_SLURM_PORT"] = str(free_port_base())
    started = subprocess.run(["bash", str(SCRIPTS / "start.sh"), str(directory)], env=env, capture_output=True,
                             text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh"), str(directory)], env=env, capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm/start.sh failed:\n{started.stdout}\n{started.stderr}")
    env["SLURM_CONF"] = str(directory / "etc" / "slurm.conf")
    # Jobs inherit this environment (sbatch exports it): one thread each, as two jobs share the two cores,
    # and W&B never reaches for the network.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WANDB_API_KEY", None)
    try:
        yield Cluster(directory, env)
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh"), str(directory), "--purge"], env=env, capture_output=True,
                       timeout=180)

