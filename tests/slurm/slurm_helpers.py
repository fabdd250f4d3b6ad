"""Helpers for the SLURM tests: the cluster handle, polling, and reading offline W&B runs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "slurm"
TRAIN = Path(sys.executable).parent / "instructblip-train"


def free_port_base(start: int = 16817, span: int = 4) -> int:
    """The first base port B >= start with B..B+span-1 all free on localhost."""
    for base in range(start, start + 2000, span):
        try:
            for port in range(base, base + span):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for the test cluster")


@dataclass
class Cluster:
    directory: Path
    env: dict[str, str]  # the environment for slurm commands and instructblip-train (SLURM_CONF, ...)

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def accounting(self, job: str) -> list[tuple[str, str]]:
        """[(job id, state)] from sacct, i.e. the accounting database, every attempt of a requeued job included."""
        out = self.run("sacct", "--noheader", "--parsable2", "--allocations", "--duplicates",
                       "--format=JobID,State", "--jobs", job)
        return [tuple(line.split("|")[:2]) for line in out.splitlines() if line]

    def train(self, *overrides: str, log: Path, timeout: float = 600) -> subprocess.Popen:
        """``instructblip-train -m hydra/launcher=submitit_slurm <overrides>`` in the background."""
        handle = open(log, "w")
        return subprocess.Popen(
            [str(TRAIN), "-m", "hydra/launcher=submitit_slurm", *overrides],
            env=self.env, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent,
        )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run (its ``run-<id>.wandb`` file), as ``wandb_internal_pb2.Record``.

    W&B keeps no Python reader for this file any more (wandb-core, in Go, writes and syncs it). The format is
    LevelDB's log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last); block tails under 7 bytes are padding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        else:
            continue  # zero padding
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
