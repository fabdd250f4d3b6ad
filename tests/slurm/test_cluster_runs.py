"""instructblip-train through a real SLURM cluster: a multirun, and a preempted job that resumes exactly.

Both sweeps run the smoke experiment (the tiny model on generated data) as SLURM job arrays through
hydra-submitit-launcher, with real accounting (sacct) behind submitit's job states.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from slurm_helpers import Cluster, wait_for, wandb_records

pytestmark = pytest.mark.slurm

SWEEP_TIMEOUT = 540  # seconds; a smoke job takes ~15 s on an idle 2-core machine, minutes on a loaded one


def finish(process: subprocess.Popen, log: Path, timeout: float = SWEEP_TIMEOUT) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"sweep still running after {timeout} s:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert process.returncode == 0, f"sweep failed ({process.returncode}):\n{text[-3000:]}"
    return text


def array_job_id(sweep_log: Path, sweep_dir: Path) -> str:
    """The SLURM array job id of the sweep: submitit names each task's folder <array job>_<task>."""
    folders = wait_for(lambda: sorted((sweep_dir / ".submitit").glob("*_0")), 120, "the sweep's submission")
    return folders[0].name.split("_")[0]


def ended(cluster: Cluster, job: str) -> list[tuple[str, str]] | None:
    """sacct's records of the job once none is pending or running (SLURM records the end just after submitit
    has collected the results)."""
    attempts = cluster.accounting(job)
    return attempts if attempts and not {state for _, state in attempts} & {"PENDING", "RUNNING"} else None


def weights(path: Path) -> dict:
    return load_file(str(path))


def job_log(sweep_dir: Path, job: str) -> str:
    folder = sweep_dir / ".submitit" / job
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("*_log.*")))


def test_cluster_runs_a_batch_job_and_accounts_for_it(slurm_cluster: Cluster, tmp_path):
    job = slurm_cluster.run("sbatch", "--parsable", f"--output={tmp_path}/%j.out", "--wrap", "echo hello from $SLURM_JOB_ID").strip()
    wait_for(lambda: ("COMPLETED" in dict(slurm_cluster.accounting(job)).get(job, "")), 60, f"job {job} in sacct")
    assert (tmp_path / f"{job}.out").read_text().strip() == f"hello from {job}"


def test_two_job_multirun_of_the_smoke_experiment(slurm_cluster: Cluster, tmp_path):
    sweep = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    process = slurm_cluster.train("experiment=smoke", "seed=1,2", f"hydra.sweep.dir={sweep}", log=log)
    text = finish(process, log)
    job = array_job_id(log, sweep)

    assert "#0 : experiment=smoke seed=1" in text and "#1 : experiment=smoke seed=2" in text
    attempts = wait_for(lambda: ended(slurm_cluster, job), 60, "the sweep's jobs to end in sacct")
    assert sorted(attempts) == [(f"{job}_0", "COMPLETED"), (f"{job}_1", "COMPLETED")]
    finals = []
    for number, seed in ((0, 1), (1, 2)):
        run = sweep / str(number)
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == seed
        assert (run / "checkpoints" / "last.ckpt").exists()
        finals.append(weights(run / "trainable.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    assert any(not finals[0][name].equal(finals[1][name]) for name in finals[0]), "two seeds, identical weights"


def test_preempted_job_is_requeued_and_resumes_to_the_same_weights(slurm_cluster: Cluster, tmp_path):
    """Job 0 runs undisturbed; job 1, the same training logged to W&B, gets SLURM's preemption signal mid-run."""
    sweep = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    steps = 12
    process = slurm_cluster.train(
        "experiment=smoke", "logger=csv,wandb", f"trainer.max_steps={steps}", f"validation.every_n_steps={steps}",
        "checkpoint.every_n_steps=3", f"hydra.sweep.dir={sweep}", log=log,
    )
    job = array_job_id(log, sweep)
    # Mid-run: job 1 has written its step-3 checkpoint and has 9 steps to go.
    wait_for(lambda: (sweep / "1" / "checkpoints" / "step=3.ckpt").exists(), SWEEP_TIMEOUT, "job 1 at step 3")
    slurm_cluster.run("scancel", "--signal=USR2", f"{job}_1")
    finish(process, log)

    # SLURM: the first attempt of task 1 ended REQUEUED, the second COMPLETED; task 0 ran once.
    attempts = wait_for(lambda: ended(slurm_cluster, job), 60, "the sweep's jobs to end in sacct")
    assert attempts.count((f"{job}_1", "REQUEUED")) == 1, attempts
    assert (f"{job}_1", "COMPLETED") in attempts and attempts.count((f"{job}_0", "COMPLETED")) == 1, attempts

    # The checkpoint was taken at a step boundary after the signal, and the requeued run resumed from it.
    text = job_log(sweep, f"{job}_1")
    saved = re.search(r"preemption: SIGUSR2 received by SLURM job \S+; saving (\S+) at global step (\d+)", text)
    assert saved, text[-3000:]
    assert saved.group(1) == str(sweep / "1" / "checkpoints" / "last.ckpt")
    assert 3 <= int(saved.group(2)) < steps
    assert f"resuming from {saved.group(1)}" in text

    # Exactly the weights of the uninterrupted job.
    undisturbed = weights(sweep / "0" / "trainable.safetensors")
    resumed = weights(sweep / "1" / "trainable.safetensors")
    assert undisturbed.keys() == resumed.keys()
    different = [name for name in undisturbed if not undisturbed[name].equal(resumed[name])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"

    # W&B (offline): both attempts logged to the one run whose id comes from the SLURM job, in the sweep's group,
    # with the config; the second continues the step axis where the checkpoint left it, up to the end, and
    # logs the table of validation predictions with their images.
    runs = sorted((sweep / "1" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, sorted((sweep / "1" / "wandb").iterdir())
    attempts = [wandb_records(run) for run in runs]
    steps_logged = []
    for records in attempts:
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.run_group) == (f"instructblip-{job}_1", str(sweep))
        config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for item in r.config.update}
        assert config["seed"] == 42 and config["trainer"]["max_steps"] == steps
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        steps_logged.append(sorted({row["trainer/global_step"] for row in history if "train/loss" in row}))
    preempted_at = int(saved.group(2))
    assert steps_logged[0][-1] < preempted_at <= steps_logged[1][0], steps_logged
    assert steps_logged[1][-1] == steps - 1
    table = {item.nested_key[1]: json.loads(item.value_json) for r in attempts[1]
             if r.WhichOneof("record_type") == "history" for item in r.history.item
             if list(item.nested_key[:1]) == ["val/predictions"]}
    assert table.get("_type") == "table-file" and table["nrows"] > 0 and table["ncols"] == 7, table
    rows = json.loads((runs[1] / "files" / table["path"]).read_text())
    assert rows["columns"] == ["step", "dataset", "id", "image", "instruction", "prediction", "references"]
    images = [path for r in attempts[1] if r.WhichOneof("record_type") == "artifact"
              for path in (entry.path for entry in r.artifact.manifest.contents) if path.endswith(".png")]
    assert 0 < len(images) <= table["nrows"], images  # one file per distinct image
