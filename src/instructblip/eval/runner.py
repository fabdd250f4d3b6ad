"""The held-out evaluation runner: each benchmark from its shards, with its fixed prompt, its method and its metric.

For every benchmark (a registry name) the runner

1. finds the shards of the registry's evaluation split (``{shards}/{name}-{split}-*.tar`` or
   ``{shards}/{name}/{name}-{split}-*.tar``, as ``instructblip-prep`` writes them);
2. reads them in one non-resampled pass, each process its subset of shards (``instructblip.data.shards``),
   corrupt samples skipped and counted;
3. renders each record's fixed zero-shot prompt (``instructblip.data.templates.render_evaluation``);
4. predicts in batches with the registry's method:

   - ``generate``: ``model.generate`` with the settings of the dataset's answer length (``generation.short`` /
     ``generation.long`` in conf/eval.yaml);
   - ``rank``: ``model.rank`` over the candidates (the paper's vocabulary ranking): binary classification over
     verbalisers (the record's ``candidates`` = [negative, positive], else the paper's yes/true vs no/false; the
     continuous score is log p(positive) - log p(negative), summed over each side's verbalisers); multiple choice
     over ``choices``; dialog over the round's ``candidates``; anything else (MSVD-QA, MSRVTT-QA) over the answer
     vocabulary built from all answers of the dataset's evaluation split;

5. appends the predictions to ``predictions/{name}.jsonl`` after every batch (flushed), one line per sample in
   the format ``instructblip-score`` reads; a rerun skips the ids already there, so a killed evaluation resumes
   where it stopped (a half-written last line is dropped and redone);
6. scores them with the registry's metric (plus companions: R@k, mean rank, NDCG beside VisDial's MRR).

Under DDP (``torchrun``), each rank writes ``predictions/{name}.rank{r}.jsonl``; the metrics sync through
torchmetrics (repeated ids dropped) and rank 0 merges the parts into ``predictions/{name}.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from instructblip.data import registry
from instructblip.data.record import Record
from instructblip.data.shards import Example, list_shards, read_shards
from instructblip.data.templates import render_evaluation
from instructblip.errors import ConfigError, DataError
from instructblip.eval.metrics import COMPANIONS, build_metric

log = logging.getLogger(__name__)

#: The paper's binary verbalisers (positive: "yes", "true"; negative: "no", "false").
POSITIVE_VERBALISERS = ("yes", "true")
NEGATIVE_VERBALISERS = ("no", "false")


@dataclass
class Distributed:
    """Where this process stands: rank and world size (1 on CPU without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


@dataclass
class BenchmarkResult:
    name: str
    metric: str
    split: str
    score: float
    n: int
    extra: dict[str, float] = field(default_factory=dict)   # companion metrics
    skipped: dict[str, int] = field(default_factory=dict)   # corrupt samples per reason (this run, all ranks)
    predictions: str = ""


# ------------------------------------------------------------------------------------------------ shards and files

def find_shards(shard_root: str | os.PathLike, name: str, split: str) -> list[str]:
    """The shards of ``name``'s ``split`` under ``shard_root`` (flat or one directory per dataset)."""
    root = Path(shard_root).expanduser()
    for directory in (root, root / name):
        found = sorted(str(p) for p in directory.glob(f"{name}-{split}-*.tar"))
        if found:
            return list_shards(found)
    raise DataError(f"no shards for {name} split {split!r}: expected {root}/{name}-{split}-*.tar or "
                    f"{root}/{name}/{name}-{split}-*.tar (write them with instructblip-prep dataset={name})")


def shard_total(shard_root: str | os.PathLike, name: str, split: str) -> int | None:
    """The sample count from the converter's summary file, for the progress bar (None when absent)."""
    root = Path(shard_root).expanduser()
    for directory in (root, root / name):
        summary = directory / f"{name}-{split}-summary.json"
        if summary.is_file():
            try:
                return int(json.loads(summary.read_text())["written"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def load_predictions(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """The complete lines of a predictions file written by an earlier (maybe killed) run.

    A last line cut by a kill (no final newline) is not returned, and with ``repair`` it is cut from the file, so
    that appending continues a valid file (only the file's writer may repair it); a bad complete line is an error
    naming the file and line.
    """
    if not path.is_file():
        return []
    raw = path.read_bytes()
    *complete, tail = raw.split(b"\n")  # tail: the bytes after the last newline (b"" for a clean file)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: invalid JSON in a predictions file; delete the file to start "
                            "this benchmark again") from None
        if not isinstance(value, dict) or "id" not in value:
            raise DataError(f"{path}:{number}: not a prediction line (a JSON object with an id)")
        records.append(value)
    if tail and repair:
        log.warning("%s: dropping a half-written last line (%d bytes) of an interrupted run", path, len(tail))
        with path.open("r+b") as handle:
            handle.truncate(len(raw) - len(tail))
    return records


def _json_line(line: Mapping[str, Any]) -> str:
    return json.dumps(line, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------ predicting

@dataclass
class Benchmark:
    """What the runner needs to know to evaluate one dataset."""

    info: registry.DatasetInfo
    generation: dict[str, Any]
    vocabulary: list[str] | None = None  # ranked answer vocabulary (video QA)

    @property
    def name(self) -> str:
        return self.info.name


def answer_vocabulary(shards: list[str]) -> list[str]:
    """Every distinct answer of the split's records, sorted: the candidates of vocabulary ranking.

    Reads only the JSON members (no image decoding), in every process (all ranks need the same list).
    """
    import webdataset as wds

    answers: set[str] = set()
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=wds.warn_and_continue))
    for sample in pipeline:
        if "json" not in sample:
            continue
        try:
            record = Record.from_json(sample["json"])
        except (ValueError, TypeError):
            continue  # the reader counts it as corrupt when the evaluation pass meets it
        answers.update(answer for answer in record.answers if answer.strip())
    if not answers:
        raise DataError(f"no answers in the records of {shards[0]}...: cannot build a ranking vocabulary")
    return sorted(answers)


def _media(example: Example, video: bool):
    return list(example.images) if video or len(example.images) > 1 else example.images[0]


def _is_binary(record: Record) -> bool:
    return record.task == "classification"


def _binary_verbalisers(record: Record) -> tuple[list[str], list[str]]:
    if record.candidates and len(record.candidates) == 2:
        return [record.candidates[1]], [record.candidates[0]]
    return list(POSITIVE_VERBALISERS), list(NEGATIVE_VERBALISERS)


def _logsumexp(values: list[float]) -> float:
    return float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), dim=0))


def _rank_candidates(benchmark: Benchmark, record: Record) -> list[str]:
    if _is_binary(record):
        positive, negative = _binary_verbalisers(record)
        return positive + negative
    if record.choices:
        return list(record.choices)
    if record.candidates:
        return list(record.candidates)
    if benchmark.vocabulary:
        return benchmark.vocabulary
    raise DataError(f"{benchmark.name} record {record.id}: nothing to rank (no choices, candidates or vocabulary)")


def prediction_lines(model, benchmark: Benchmark, batch: list[Example], rank_batch_size: int) -> list[dict]:
    """One predictions-file line per example of ``batch``."""
    video = benchmark.info.video
    records = [example.record for example in batch]
    media = [_media(example, video) for example in batch]
    rendered = [render_evaluation(record) for record in records]
    prompts = [r.instruction for r in rendered]
    # question generation is scored against the question (its target); the answers are part of its prompt
    lines = [{"id": record.id, "prompt": r.instruction,
              "references": [r.target] if record.task == "qg" else list(record.answers)}
             for record, r in zip(records, rendered)]
    if benchmark.info.method == "generate":
        answers = model.generate(media, prompts, **benchmark.generation)
        for line, answer in zip(lines, answers):
            line["prediction"] = answer.strip()
        for line, record in zip(lines, records):
            if record.label is not None:
                line["label"] = record.label
        return lines

    candidate_lists = [_rank_candidates(benchmark, record) for record in records]
    scores = model.rank(media, prompts, candidate_lists, batch_size=rank_batch_size)
    for line, record, candidates, row in zip(lines, records, candidate_lists, scores):
        if _is_binary(record):
            positive, negative = _binary_verbalisers(record)
            positive_ll, negative_ll = row[: len(positive)], row[len(positive):]
            line["score"] = _logsumexp(positive_ll) - _logsumexp(negative_ll)
            side, side_ll = (positive, positive_ll) if line["score"] > 0 else (negative, negative_ll)
            line["prediction"] = side[max(range(len(side)), key=side_ll.__getitem__)]
            if record.label is not None:
                line["label"] = record.label
            continue
        line["prediction"] = candidates[max(range(len(row)), key=row.__getitem__)]
        if candidates is not benchmark.vocabulary:  # a vocabulary's scores are not worth thousands of numbers
            line["scores"] = row
        if record.task == "dialog":
            if record.answer_index is not None:
                line["gt_index"] = record.answer_index
            if record.relevance is not None:
                line["relevance"] = record.relevance
        if record.choices and record.answer_index is not None:
            line["references"] = [record.choices[record.answer_index]]
    return lines


def _batches(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _identity(sample):
    return sample


# ------------------------------------------------------------------------------------------------ one benchmark

def evaluate_benchmark(
    model,
    benchmark: Benchmark,
    shard_root: str | os.PathLike,
    output_dir: Path,
    *,
    batch_size: int = 8,
    rank_batch_size: int = 64,
    limit: int | None = None,
    num_workers: int = 0,
    metric_options: Mapping[str, Any] | None = None,
    dist: Distributed | None = None,
    progress: bool = True,
) -> BenchmarkResult | None:
    """Predict and score one benchmark; returns the result on rank 0 (None on other ranks)."""
    dist = dist or Distributed()
    info = benchmark.info
    if info.eval_split is None:
        raise ConfigError(f"{info.name} has no evaluation split in the registry (training-only dataset)")
    shards = find_shards(shard_root, info.name, info.eval_split)
    if info.method == "rank" and info.task not in ("classification", "mc", "dialog"):
        benchmark.vocabulary = answer_vocabulary(shards)

    prediction_dir = output_dir / "predictions"
    prediction_dir.mkdir(parents=True, exist_ok=True)
    merged_path = prediction_dir / f"{info.name}.jsonl"
    own_path = merged_path if dist.world_size == 1 else prediction_dir / f"{info.name}.rank{dist.rank}.jsonl"

    # Resume: every id in any predictions file of this benchmark is done, whatever world size wrote it. Each file
    # has one owner, who scores its lines and alone may repair a cut last line: rank r its rank-r part, rank 0
    # the merged file and the parts of ranks that no longer exist (an earlier run with more processes).
    done: set[str] = set()
    metric_lines: list[dict[str, Any]] = []
    for path in sorted({merged_path, *prediction_dir.glob(f"{info.name}.rank*.jsonl")}):
        part = _part_rank(path, info.name)
        owner = part if part is not None and part < dist.world_size else 0
        lines = load_predictions(path, repair=owner == dist.rank)
        done.update(str(line["id"]) for line in lines)
        if owner == dist.rank:
            metric_lines.extend(lines)
    dist.barrier()  # every rank has read the files before any rank appends

    names = (info.metric, *COMPANIONS.get(info.metric, ()))
    options = dict(metric_options or {})
    metrics = {name: build_metric(name, **(options if name == info.metric else {})) for name in names}
    for metric in metrics.values():
        metric.update(metric_lines)

    pipeline = read_shards(shards)
    source: Iterable[Example] = pipeline
    if num_workers > 0:
        source = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                             collate_fn=_identity)
    total = shard_total(shard_root, info.name, info.eval_split)

    def pending() -> Iterator[Example]:
        for count, example in enumerate(source):
            if limit is not None and count >= limit:
                return
            if example.record.id not in done:
                yield example

    if dist.world_size == 1 and total is not None:  # per-rank totals are unknown (shards differ in size)
        total = min(total, limit) if limit is not None else total
    bar = tqdm(total=total if dist.world_size == 1 else None, initial=len(done) if dist.world_size == 1 else 0,
               desc=info.name, unit="sample", disable=not progress or dist.rank != 0)
    with own_path.open("a", encoding="utf-8") as handle, torch.inference_mode():
        for batch in _batches(pending(), batch_size):
            lines = prediction_lines(model, benchmark, batch, rank_batch_size)
            handle.write("".join(_json_line(line) for line in lines))
            handle.flush()
            for metric in metrics.values():
                metric.update(lines)
            bar.update(len(lines))
    bar.close()

    skipped = _sum_skips(pipeline.skip_counter.counts(), dist)
    scores = {name: _compute(metric, info.name) for name, metric in metrics.items()}  # syncs across ranks
    n = metrics[info.metric].count(metrics[info.metric].samples())
    dist.barrier()
    if dist.rank != 0:
        return None
    parts = sorted(prediction_dir.glob(f"{info.name}.rank*.jsonl"))
    if parts:
        _merge_parts(merged_path, parts)
    main = scores.pop(info.metric)
    scores = {name: value for name, value in scores.items() if not math.isnan(value)}  # e.g. NDCG without relevance
    if math.isnan(main):
        log.warning("%s: no sample was scored (empty split or every sample corrupt)", info.name)
    return BenchmarkResult(info.name, info.metric, info.eval_split, main, n, scores, skipped, str(merged_path))


def _compute(metric, benchmark: str) -> float:
    """The metric's score; NaN with a warning when the samples cannot be scored (AUC over one class)."""
    try:
        return metric.compute().item()
    except ValueError as error:
        log.warning("%s: %s cannot be computed: %s", benchmark, metric.name, error)
        return math.nan


def _part_rank(path: Path, name: str) -> int | None:
    """k for a rank-k part ``{name}.rank{k}.jsonl``; None for the merged file."""
    suffix = path.name[len(name) + len(".rank"):-len(".jsonl")]
    return int(suffix) if path.name.startswith(f"{name}.rank") and suffix.isdigit() else None


def _sum_skips(counts: dict[str, int], dist: Distributed) -> dict[str, int]:
    if not dist.active:
        return {reason: count for reason, count in counts.items() if count}
    reasons = sorted(counts)
    totals = torch.tensor([counts[r] for r in reasons], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        totals = totals.cuda()
    torch.distributed.all_reduce(totals)
    return {reason: int(count) for reason, count in zip(reasons, totals.tolist()) if count}


def _merge_parts(merged_path: Path, parts: list[Path]) -> None:
    """Rank 0: fold the ranks' files (and an earlier merged file) into one, first line per id kept."""
    seen: set[str] = set()
    lines: list[str] = []
    for path in [merged_path, *parts]:
        for line in load_predictions(path):
            if str(line["id"]) not in seen:
                seen.add(str(line["id"]))
                lines.append(_json_line(line))
    temporary = merged_path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    temporary.replace(merged_path)
    for path in parts:
        path.unlink()
