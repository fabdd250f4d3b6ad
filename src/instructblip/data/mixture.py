"""The training mixture: one resampled WebDataset pipeline per dataset, mixed per sample with sampling weights.

Quick use (what the training DataModule does)::

    from instructblip.data import build_mixture, Collator, make_loader

    mixture = build_mixture("shards/", ["coco_caption", "vqav2", "okvqa", "aokvqa"], strategy="sqrt", seed=0)
    loader = make_loader(mixture, Collator(processor, train=True), batch_size=32, num_workers=4)
    mixture.set_epoch(epoch)          # from on_train_epoch_start: workers see it without being recreated
    mixture.skip_counts()             # {dataset: {reason: n}}, summed over this rank's workers

Sampling weights (:func:`sampling_weights`), chosen by ``strategy``:

* ``sqrt`` (the paper): p_d proportional to sqrt(S_d), S_d the number of training samples of dataset d, then the
  paper's manual adjustments: A-OKVQA lowered, OK-VQA raised. The paper does not publish the multipliers;
  :data:`PAPER_ADJUSTMENTS` holds ours (0.5 and 2.0), an explicit config value to override (``adjustments``);
* ``proportional``: p_d proportional to S_d (plain concatenation of the datasets);
* ``uniform``: every dataset equally often;
* ``explicit``: ``weights={name: w}`` given by name (normalised; every dataset of the mixture must be named).

``adjustments`` (multipliers by name, applied before normalising) work with every strategy but ``explicit``.
S_d comes from the converter's ``{dataset}-{split}-summary.json`` (its ``written`` count) next to the shards, or is
given explicitly (:class:`MixtureSource`).

Streams and determinism: each sample's dataset is drawn with a ``random.Random`` seeded from (seed, epoch, rank,
DataLoader worker); each dataset's shards are resampled (``wds.ResampledShards``) and shuffled in a buffer with seeds
derived from the same tuple and the dataset name. So the stream of a given (seed, epoch, rank, worker) is
reproducible, and different ranks and workers draw different, independent streams -- this is how a resampled
pipeline is "split" by node and worker (webdataset's own resampled mode does the same): no shard is owned by one
consumer, and every consumer samples from all shards. To resume a run without replaying the data seen since the
epoch began, change the seed (e.g. fold in the global step). The mixture also draws a per-sample seed
(:attr:`Example.seed`) from which the collator draws the template and the target, so those are reproducible too.

An epoch is ``samples_per_epoch`` samples per rank (each worker yields its equal share, rounded up), or endless if
None (train by ``max_steps``). Corrupt samples are skipped and counted per dataset and reason
(:meth:`MixtureDataset.skip_counts`); they never stop the run. The run stops with a :class:`DataError` only when a
dataset yields nothing usable at all (:data:`MAX_EMPTY_SHARDS` shards in a row without a sample, or
:data:`MAX_CORRUPT_IN_A_ROW` corrupt samples in a row), instead of spinning forever.

Memory: every worker holds one open tar stream and one shuffle buffer of raw (undecoded) samples per dataset:
about ``len(datasets) * shuffle_buffer * (mean sample bytes)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import webdataset as wds

from instructblip.data.shards import CountingHandler, Example, ExampleDecoder, SkipCounter
from instructblip.errors import ConfigError, DataError

SAMPLING_STRATEGIES = ("sqrt", "proportional", "uniform", "explicit")

#: Our values for the paper's unpublished manual adjustments of the sqrt rule (multipliers before normalising).
PAPER_ADJUSTMENTS: dict[str, float] = {"aokvqa": 0.5, "okvqa": 2.0}

#: A dataset whose resampled shards give no sample at all in this many draws in a row is broken: stop, say so.
MAX_EMPTY_SHARDS = 50
#: ... and likewise when this many of its samples in a row are corrupt.
MAX_CORRUPT_IN_A_ROW = 1000


@dataclass(frozen=True)
class MixtureSource:
    """One dataset of the mixture: its registry name, its shard paths and its training size S_d."""

    name: str
    shards: tuple[str, ...]
    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"dataset {self.name!r}: size must be >= 1, got {self.size}")
        if not self.shards:
            raise ConfigError(f"dataset {self.name!r}: no shards")


# ------------------------------------------------------------------------------------------------ sizes and weights


def summary_file(shard_dir: str | Path, dataset: str, split: str) -> Path:
    """Where the converter's summary of (dataset, split) is: ``shard_dir`` itself or ``shard_dir/dataset/``."""
    candidates = [Path(shard_dir) / f"{dataset}-{split}-summary.json",
                  Path(shard_dir) / dataset / f"{dataset}-{split}-summary.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"no converter summary for {dataset}/{split}: looked for {', '.join(str(p) for p in candidates)}; "
        f"run instructblip-prep dataset={dataset} split={split} or give the sizes explicitly"
    )


def source_from_summary(shard_dir: str | Path, dataset: str, split: str) -> MixtureSource:
    """A :class:`MixtureSource` from the converter summary: the shards it lists (beside it) and its ``written``
    count as the size."""
    path = summary_file(shard_dir, dataset, split)
    try:
        summary = json.loads(path.read_text())
        size = int(summary["written"])
        shards = tuple(str(path.parent / name) for name in summary["shards"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read the sample count and shard list from {path}: {err!r}") from err
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{path} lists shards that do not exist: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return MixtureSource(dataset, shards, size)


def sampling_weights(
    sizes: Mapping[str, int],
    strategy: str = "sqrt",
    adjustments: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Sampling probabilities by dataset name (they sum to 1). See the module docstring for the strategies."""
    if not sizes:
        raise ConfigError("the mixture has no datasets")
    if strategy not in SAMPLING_STRATEGIES:
        raise ConfigError(f"unknown sampling strategy {strategy!r}; allowed: {', '.join(SAMPLING_STRATEGIES)}")
    bad_sizes = {name: size for name, size in sizes.items() if not size or size < 0}
    if bad_sizes and strategy in ("sqrt", "proportional"):
        raise ConfigError(f"dataset sizes must be positive for strategy {strategy!r}; got {bad_sizes}")
    if strategy == "explicit":
        if not weights:
            raise ConfigError("strategy 'explicit' needs weights={dataset: weight}")
        if adjustments:
            raise ConfigError("adjustments do not apply to strategy 'explicit': put them into the weights")
        unnamed = sorted(set(sizes) - set(weights))
        extra = sorted(set(weights) - set(sizes))
        if unnamed or extra:
            raise ConfigError(
                f"explicit weights must name exactly the mixture's datasets {sorted(sizes)}; "
                f"missing {unnamed}, not in the mixture {extra}"
            )
        raw = {name: float(weights[name]) for name in sizes}
    else:
        if weights:
            raise ConfigError(f"weights are only used with strategy 'explicit', not {strategy!r}")
        base = {"sqrt": math.sqrt, "proportional": float, "uniform": lambda size: 1.0}[strategy]
        raw = {name: base(size) for name, size in sizes.items()}
        for name, factor in (adjustments or {}).items():
            if name in raw:
                raw[name] *= float(factor)
            elif not _is_registered(name):
                raise ConfigError(f"adjustment for unknown dataset {name!r}; mixture datasets: {sorted(sizes)}")
    negative = {name: w for name, w in raw.items() if w < 0 or not math.isfinite(w)}
    if negative or sum(raw.values()) <= 0:
        raise ConfigError(f"sampling weights must be finite, >= 0 and not all 0; got {raw}")
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


def _is_registered(name: str) -> bool:
    from instructblip.data.registry import DATASETS

    return name in DATASETS


# ------------------------------------------------------------------------------------------------ seeds


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same in every process and Python run (unlike ``hash``)."""
    text = "/".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _no_worker_seed() -> int:
    # ResampledShards folds (rank, worker) in by default; our seed already contains them
    return 0


class SharedEpoch:
    """The epoch number in shared memory, so persistent DataLoader workers see ``set_epoch`` (open_clip's trick;
    a shared torch tensor, which forked and spawned workers alike receive as the same memory)."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.tensor([epoch], dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value[0] = epoch

    def get(self) -> int:
        return int(self._value[0])


# ------------------------------------------------------------------------------------------------ the mixture


class _Liveness:
    """Stops an endless resampled stream that can never yield (every shard unreadable or every sample corrupt)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shards_without_sample = 0
        self.corrupt_in_a_row = 0

    def count_shards(self, urls: Iterator[dict]) -> Iterator[dict]:
        for url in urls:
            self.shards_without_sample += 1
            if self.shards_without_sample > MAX_EMPTY_SHARDS:
                raise DataError(
                    f"dataset {self.name!r}: {MAX_EMPTY_SHARDS} shards in a row gave no sample "
                    f"(last: {url['url']}); see the skip counts and warnings above"
                )
            yield url

    def saw_sample(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            self.shards_without_sample = 0
            yield sample

    def decoded(self, examples: Iterator[Example | None]) -> Iterator[Example]:
        for example in examples:
            if example is None:
                self.corrupt_in_a_row += 1
                if self.corrupt_in_a_row >= MAX_CORRUPT_IN_A_ROW:
                    raise DataError(
                        f"dataset {self.name!r}: {MAX_CORRUPT_IN_A_ROW} corrupt samples in a row; "
                        "see the skip counts and warnings above"
                    )
                continue
            self.corrupt_in_a_row = 0
            yield example


class MixtureDataset(torch.utils.data.IterableDataset):
    """Per-sample mixture of per-dataset resampled pipelines (see the module docstring).

    ``probabilities``: {dataset name: p} over ``sources`` (e.g. from :func:`sampling_weights`).
    ``shuffle_buffer``: raw samples buffered per dataset and worker. ``require_target``: skip (and count as
    ``missing_field``) records without a training target.
    """

    def __init__(
        self,
        sources: Sequence[MixtureSource],
        probabilities: Mapping[str, float],
        *,
        seed: int = 0,
        shuffle_buffer: int = 500,
        samples_per_epoch: int | None = None,
        require_target: bool = True,
    ) -> None:
        super().__init__()
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"a dataset appears twice in the mixture: {names}")
        if set(names) != set(probabilities):
            raise ConfigError(f"probabilities are for {sorted(probabilities)}, the sources are {sorted(names)}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        self.sources = list(sources)
        self.probabilities = {name: float(probabilities[name]) for name in names}
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.require_target = require_target
        self.epoch = SharedEpoch()
        self.counters = {name: SkipCounter(name) for name in names}

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """{dataset: {reason: n}} over this process and its DataLoader workers (see :class:`SkipCounter`)."""
        return {name: counter.counts() for name, counter in self.counters.items()}

    def samples_per_worker(self) -> int | None:
        if self.samples_per_epoch is None:
            return None
        _, world_size, _, num_workers = wds.utils.pytorch_worker_info()
        return math.ceil(self.samples_per_epoch / world_size / num_workers)

    def _dataset_stream(self, source: MixtureSource, stream: tuple) -> Iterator[Example]:
        counter = self.counters[source.name]
        live = _Liveness(source.name)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                list(source.shards),
                seed=derive_seed("shards", *stream, source.name),
                worker_seed=_no_worker_seed,
                deterministic=True,
            ),
            live.count_shards,
            wds.tarfile_to_samples(handler=CountingHandler(counter)),
            live.saw_sample,
            wds.shuffle(
                self.shuffle_buffer,
                initial=min(self.shuffle_buffer, 100),
                seed=derive_seed("shuffle", *stream, source.name),
            ),
            ExampleDecoder(counter, require_target=self.require_target).map_or_none,
            live.decoded,
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[Example]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        stream = (self.seed, self.epoch.get(), rank, worker)
        rng = random.Random(derive_seed("mixture", *stream))
        names = list(self.probabilities)
        cumulative = []
        total = 0.0
        for name in names:
            total += self.probabilities[name]
            cumulative.append(total)
        by_name = {source.name: source for source in self.sources}
        streams: dict[str, Iterator[Example]] = {}
        limit = self.samples_per_worker()
        produced = 0
        while limit is None or produced < limit:
            name = rng.choices(names, cum_weights=cumulative)[0]
            if name not in streams:  # opened on first use: a worker never opens a dataset it does not draw
                streams[name] = self._dataset_stream(by_name[name], stream)
            example = next(streams[name])
            yield example._replace(seed=rng.getrandbits(63), source=name)
            produced += 1


def build_mixture(
    shard_dir: str | Path,
    datasets: Sequence[str],
    *,
    split: str | Mapping[str, str] | None = None,
    strategy: str = "sqrt",
    adjustments: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
    sizes: Mapping[str, int] | None = None,
    **dataset_kwargs: Any,
) -> MixtureDataset:
    """The training mixture of ``datasets`` from the shards under ``shard_dir``.

    ``split``: the split to train on (one name for all, a {dataset: split} map, or None: each dataset's registry
    ``train_split``). ``sizes``: S_d by name, overriding the converter summaries (shards are then every ``.tar`` of
    ``{shard_dir}/{dataset}-{split}-*.tar``). ``adjustments``: None means :data:`PAPER_ADJUSTMENTS` for ``sqrt`` and
    none otherwise; pass ``{}`` for none. Other keyword arguments go to :class:`MixtureDataset`.
    """
    if not datasets:
        raise ConfigError("build_mixture needs at least one dataset")
    sources = []
    for name in datasets:
        dataset_split = _split_of(name, split)
        if sizes is not None and name in sizes:
            shards = _shards_by_pattern(shard_dir, name, dataset_split)
            sources.append(MixtureSource(name, tuple(shards), int(sizes[name])))
        else:
            sources.append(source_from_summary(shard_dir, name, dataset_split))
    if adjustments is None:
        adjustments = PAPER_ADJUSTMENTS if strategy == "sqrt" else {}
    probabilities = sampling_weights(
        {s.name: s.size for s in sources}, strategy, adjustments=adjustments or None, weights=weights
    )
    return MixtureDataset(sources, probabilities, **dataset_kwargs)


def _split_of(name: str, split: str | Mapping[str, str] | None) -> str:
    if isinstance(split, str):
        return split
    if isinstance(split, Mapping) and name in split:
        return split[name]
    from instructblip.data.registry import get

    try:
        train_split = get(name).train_split
    except KeyError as err:
        raise ConfigError(f"{err.args[0]}; or give split= explicitly") from None
    if train_split is None:
        raise ConfigError(f"dataset {name!r} is held out (no train_split in the registry); give split= explicitly")
    return train_split


def _shards_by_pattern(shard_dir: str | Path, name: str, split: str) -> list[str]:
    for folder in (Path(shard_dir), Path(shard_dir) / name):
        found = sorted(folder.glob(f"{name}-{split}-*.tar"))
        if found:
            return [str(p) for p in found]
    raise DataError(f"no shards {name}-{split}-*.tar in {shard_dir} or {Path(shard_dir) / name}")
