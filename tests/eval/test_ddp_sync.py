"""The metrics sync across processes (torchmetrics' own sync over a gloo group, 2 CPU processes) and drop the
samples a distributed sampler repeats; a process that saw no sample at all must not break the gather."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instructblip.eval.metrics import build_metric

ROWS = [{"id": f"q{i}", "prediction": "yes" if i % 3 else "no", "references": ["yes"]} for i in range(7)]
SCORED = [{"id": f"m{i}", "score": float(i % 4), "label": i % 2} for i in range(9)]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        # DistributedSampler-style split with padding: rank r takes r, r+2, ...; the last one repeats q0
        padded = ROWS + ROWS[:1]
        accuracy = build_metric("accuracy")
        accuracy.update(padded[rank::world_size])
        results["accuracy"] = accuracy.compute().item()
        results["n"] = len(accuracy.samples())
        auroc = build_metric("auroc")
        auroc.update(SCORED if rank == 0 else [])  # rank 1 saw nothing
        results["auroc"] = auroc.compute().item()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def test_two_process_sync_drops_repeated_ids(tmp_path):
    port = 29500 + os.getpid() % 1000
    # fork: the children reuse this process's imports (spawn would re-import torch in each, tens of seconds)
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    single_acc, single_auc = build_metric("accuracy"), build_metric("auroc")
    single_acc.update(ROWS)
    single_auc.update(SCORED)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["n"] == len(ROWS)
        assert result["accuracy"] == pytest.approx(single_acc.compute().item())
        assert result["auroc"] == pytest.approx(single_auc.compute().item())
