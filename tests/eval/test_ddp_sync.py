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


@pytest.mark.timeout(300)  # a forked child that hangs must not hang the suite
def test_two_process_sync_drops_repeated_ids(tmp_path):
    port = 29500 + os.getpid() % 1000
    # spawn, not fork: after a long test session the parent holds threads (OpenMP pool, tqdm monitor) whose locks a
    # forked child inherits mid-use, and then hangs in its first torch op.
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    single_acc, single_auc = build_metric("accuracy"), build_metric("auroc")
    single_acc.update(ROWS)
    single_auc.update(SCORED)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["n"] == len(ROWS)
        assert result["accuracy"] == pytest.approx(single_acc.compute().item())
        assert result["auroc"] == pytest.approx(single_auc.compute().item())


def _runner_worker(rank: int, world_size: int, port: int, checkpoint: str, shards: str, out_dir: str) -> None:
    from pathlib import Path

    from instructblip.data import registry
    from instructblip.eval.runner import Benchmark, Distributed, evaluate_benchmark
    from instructblip.model.instructblip import InstructBlip

    torch.set_num_threads(1)
    model = InstructBlip.from_pretrained(checkpoint).eval()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for name in ("gqa", "visdial"):
            result = evaluate_benchmark(model, Benchmark(registry.get(name), {"num_beams": 1, "max_new_tokens": 3}),
                                        shards, Path(out_dir), batch_size=2, progress=False,
                                        dist=Distributed(rank, world_size))
            assert (result is None) == (rank != 0)
            if result is not None:
                Path(out_dir, f"{name}.result.json").write_text(json.dumps([result.score, result.n]))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_runner_two_ranks_split_shards_and_merge(tmp_path, eval_shards, tiny_checkpoint):
    """Two ranks take one shard each, write their parts, sync the metric; rank 0 merges the parts. The merged
    predictions and the score equal a single-process run's."""
    from instructblip.data import registry
    from instructblip.eval.runner import Benchmark, evaluate_benchmark, load_predictions
    from instructblip.model.instructblip import InstructBlip

    model = InstructBlip.from_pretrained(tiny_checkpoint).eval()
    port = 30500 + os.getpid() % 1000
    mp.start_processes(_runner_worker, args=(2, port, str(tiny_checkpoint), str(eval_shards), str(tmp_path / "ddp")),
                       nprocs=2, start_method="spawn")  # spawn: see test_two_process_sync_drops_repeated_ids
    for name in ("gqa", "visdial"):
        single = evaluate_benchmark(model, Benchmark(registry.get(name), {"num_beams": 1, "max_new_tokens": 3}),
                                    eval_shards, tmp_path / "single", batch_size=2, progress=False)
        parts = list((tmp_path / "ddp" / "predictions").glob(f"{name}.rank*.jsonl"))
        assert parts == []  # merged into one file and removed
        merged = {line["id"]: line for line in load_predictions(tmp_path / "ddp" / "predictions" / f"{name}.jsonl")}
        alone = {line["id"]: line for line in load_predictions(tmp_path / "single" / "predictions" / f"{name}.jsonl")}
        assert sorted(merged) == sorted(alone)
        assert {k: v["prediction"] for k, v in merged.items()} == {k: v["prediction"] for k, v in alone.items()}
        score, n = json.loads((tmp_path / "ddp" / f"{name}.result.json").read_text())
        assert score == pytest.approx(single.score) and n == single.n == len(alone)
