"""The training mixture: sampling weights, observed frequencies, reproducible and independent streams."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from data_prep.shards import Sample, write_shards
from instructblip.data import mixture as mixture_module
from instructblip.data.mixture import (
    PAPER_ADJUSTMENTS,
    MixtureDataset,
    MixtureSource,
    build_mixture,
    sampling_weights,
    source_from_summary,
)
from instructblip.errors import ConfigError, DataError


def four_sigma(n: int, p: float) -> float:
    """Half-width of the binomial 4-sigma band: a correct sampler falls outside it with probability ~6e-5 per
    dataset (the streams are seeded, so a pass is also reproducible; the band says the seed is not cherry-picked)."""
    return 4 * math.sqrt(n * p * (1 - p))


# Tests use small shuffle buffers: the fixture shards hold 5 samples, and filling the default 500-sample buffer
# would open 100 shards per dataset before the first sample.


def take(dataset, n: int):
    return list(itertools.islice(iter(dataset), n))


@pytest.fixture()
def three_datasets(shards):
    """Sizes 100, 400, 1600 (sqrt ratio 1:2:4), written as 2, 2 and 4 shards of 5 samples (the stated size is what
    the weights use; the shards only need to exist)."""
    sizes = {"small": 100, "medium": 400, "large": 1600}
    layout = {"small": 2, "medium": 2, "large": 4}
    return [MixtureSource(name, tuple(shards.dataset(name, layout[name], 5)), sizes[name]) for name in sizes]


def test_sqrt_proportional_uniform_and_explicit_weights():
    sizes = {"a": 100, "b": 400, "c": 1600}
    assert sampling_weights(sizes, "sqrt") == pytest.approx({"a": 1 / 7, "b": 2 / 7, "c": 4 / 7})
    assert sampling_weights(sizes, "proportional") == pytest.approx({"a": 1 / 21, "b": 4 / 21, "c": 16 / 21})
    assert sampling_weights(sizes, "uniform") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert sampling_weights(sizes, "explicit", weights={"a": 2, "b": 1, "c": 1}) == pytest.approx(
        {"a": 0.5, "b": 0.25, "c": 0.25})
    adjusted = sampling_weights(sizes, "sqrt", adjustments={"a": 3.0})
    assert adjusted == pytest.approx({"a": 3 / 9, "b": 2 / 9, "c": 4 / 9})


def test_paper_adjustments_lower_aokvqa_and_raise_okvqa():
    sizes = {"vqav2": 443_757, "okvqa": 9_009, "aokvqa": 17_056}
    plain = sampling_weights(sizes, "sqrt")
    adjusted = sampling_weights(sizes, "sqrt", adjustments=PAPER_ADJUSTMENTS)
    assert adjusted["aokvqa"] < plain["aokvqa"] and adjusted["okvqa"] > plain["okvqa"]
    ratio = adjusted["okvqa"] / adjusted["aokvqa"]
    assert ratio == pytest.approx(PAPER_ADJUSTMENTS["okvqa"] / PAPER_ADJUSTMENTS["aokvqa"] * math.sqrt(9009 / 17056))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="temperature"), "unknown sampling strategy 'temperature'; allowed: sqrt, proportional"),
        (dict(strategy="explicit"), "needs weights"),
        (dict(strategy="explicit", weights={"a": 1}), r"missing \['b'\]"),
        (dict(strategy="sqrt", weights={"a": 1, "b": 1}), "only used with strategy 'explicit'"),
        (dict(strategy="sqrt", adjustments={"nonexistent_set": 2.0}), "unknown dataset 'nonexistent_set'"),
        (dict(strategy="explicit", weights={"a": -1, "b": 1}), ">= 0"),
    ],
)
def test_bad_weight_configs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sampling_weights({"a": 10, "b": 20}, **kwargs)


@pytest.mark.parametrize("strategy, weights", [("sqrt", None), ("explicit", {"small": 5, "medium": 3, "large": 2})])
def test_observed_frequencies_match_the_weights(three_datasets, strategy, weights):
    sizes = {s.name: s.size for s in three_datasets}
    probabilities = sampling_weights(sizes, strategy, weights=weights)
    n = 2000
    dataset = MixtureDataset(three_datasets, probabilities, seed=3, shuffle_buffer=10)
    counts = Counter(example.source for example in take(dataset, n))
    for name, p in probabilities.items():
        assert abs(counts[name] - n * p) <= four_sigma(n, p), (name, counts[name], n * p)


def test_every_sample_carries_its_dataset_and_a_seed(three_datasets):
    dataset = MixtureDataset(three_datasets, {"small": 0.2, "medium": 0.3, "large": 0.5}, shuffle_buffer=10)
    examples = take(dataset, 50)
    assert all(e.record.dataset == e.source for e in examples)
    assert len({e.seed for e in examples}) == 50


def stream(dataset, n=120):
    return [(e.source, e.record.id, e.seed) for e in take(dataset, n)]


def test_streams_are_reproducible_from_the_seed_and_change_with_seed_and_epoch(three_datasets):
    probabilities = {"small": 0.2, "medium": 0.3, "large": 0.5}
    first = stream(MixtureDataset(three_datasets, probabilities, seed=7, shuffle_buffer=10))
    assert first == stream(MixtureDataset(three_datasets, probabilities, seed=7, shuffle_buffer=10))
    assert first != stream(MixtureDataset(three_datasets, probabilities, seed=8, shuffle_buffer=10))
    later = MixtureDataset(three_datasets, probabilities, seed=7, shuffle_buffer=10)
    later.set_epoch(1)
    assert stream(later) != first
    later.set_epoch(0)
    assert stream(later) == first


def test_ranks_and_workers_draw_different_independent_streams(three_datasets, distributed_env):
    probabilities = {"small": 0.2, "medium": 0.3, "large": 0.5}
    streams = {}
    for rank, worker in itertools.product(range(2), range(2)):
        distributed_env(rank, 2, worker, 2)
        streams[rank, worker] = stream(MixtureDataset(three_datasets, probabilities, seed=1, shuffle_buffer=10))
        distributed_env(rank, 2, worker, 2)
        assert stream(MixtureDataset(three_datasets, probabilities, seed=1, shuffle_buffer=10)) == streams[rank, worker]
    for a, b in itertools.combinations(streams.values(), 2):
        # independent streams agree on (dataset, sample) at a position about as often as chance does:
        # 0.2/10 + 0.3/10 + 0.5/20 = 7.5% here (9 of 120); 25% would mean shared randomness
        same = sum(x[:2] == y[:2] for x, y in zip(a, b))
        assert same < 0.25 * len(a), same
        assert {x[2] for x in a}.isdisjoint({y[2] for y in b})


def test_samples_per_epoch_is_shared_over_ranks_and_workers(three_datasets, distributed_env):
    distributed_env(1, 2, 0, 2)
    dataset = MixtureDataset(three_datasets, {"small": 0.2, "medium": 0.3, "large": 0.5}, samples_per_epoch=10,
                             shuffle_buffer=10)
    assert len(list(dataset)) == 3  # ceil(10 / (2 ranks * 2 workers))


def test_dataloader_workers_draw_different_samples_and_report_skips(shards):
    good = shards.dataset("clean", 2, 5)
    bad_samples = [shards.sample(shards.vqa_record("dirty", i)) for i in range(4)]
    bad_samples += [{"__key__": f"dirty_x{i}", "jpg": shards.image_bytes(i), "json": b"{oops"} for i in range(4)]
    dirty = shards.write("dirty-train-000000.tar", bad_samples)
    sources = [MixtureSource("clean", tuple(good), 10), MixtureSource("dirty", (dirty,), 8)]
    dataset = MixtureDataset(sources, {"clean": 0.5, "dirty": 0.5}, seed=0, samples_per_epoch=200,
                             shuffle_buffer=10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=10, num_workers=2, collate_fn=list)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 200
    by_worker = [[(e.source, e.record.id) for e in b] for b in batches[:2]]  # batch 0 from worker 0, 1 from 1
    assert by_worker[0] != by_worker[1]
    counts = dataset.skip_counts()
    assert counts["dirty"]["bad_json"] > 0 and counts["clean"]["bad_json"] == 0
    assert sum(counts["dirty"].values()) == counts["dirty"]["bad_json"]


def test_a_dataset_that_yields_nothing_stops_with_a_clear_error(shards, monkeypatch):
    monkeypatch.setattr(mixture_module, "MAX_CORRUPT_IN_A_ROW", 20)
    monkeypatch.setattr(mixture_module, "MAX_EMPTY_SHARDS", 5)
    rotten = shards.write("rotten-train-000000.tar",
                          [{"__key__": f"r{i}", "jpg": b"x", "json": b"{"} for i in range(3)])
    with pytest.raises(DataError, match="'rotten': 20 corrupt samples in a row"):
        take(MixtureDataset([MixtureSource("rotten", (rotten,), 3)], {"rotten": 1.0}), 1)
    gone = str(shards.root / "gone-train-000000.tar")
    with pytest.raises(DataError, match="'gone': 5 shards in a row gave no sample"):
        take(MixtureDataset([MixtureSource("gone", (gone,), 3)], {"gone": 1.0}), 1)


def test_build_mixture_reads_sizes_and_shards_from_converter_summaries(shards, tmp_path):
    for name, count in (("okvqa", 9), ("aokvqa", 16)):
        items = [Sample(shards.vqa_record(name, i), {"jpg": shards.image_bytes(i)}) for i in range(count)]
        write_shards(items, tmp_path / "out", dataset=name, split="train", shard_size=4, progress=False)
    source = source_from_summary(tmp_path / "out", "okvqa", "train")
    assert source.size == 9 and len(source.shards) == 3
    mixture = build_mixture(tmp_path / "out", ["okvqa", "aokvqa"], split="train", seed=0)
    expected = sampling_weights({"okvqa": 9, "aokvqa": 16}, "sqrt", adjustments=PAPER_ADJUSTMENTS)
    assert mixture.probabilities == pytest.approx(expected)
    assert {e.source for e in take(mixture, 40)} == {"okvqa", "aokvqa"}
    uniform = build_mixture(tmp_path / "out", ["okvqa", "aokvqa"], split="train", strategy="uniform")
    assert uniform.probabilities == pytest.approx({"okvqa": 0.5, "aokvqa": 0.5})
    with pytest.raises(DataError, match="no converter summary for vqav2/train"):
        build_mixture(tmp_path / "out", ["vqav2"], split="train")
    with pytest.raises(ConfigError, match="held out"):
        build_mixture(tmp_path / "out", ["gqa"])


def test_spawned_persistent_workers_see_the_epoch_and_report_skips(shards):
    """The shared epoch and the skip counters are shared-memory tensors: spawned workers (not only forked ones)
    write and read the main process's values."""
    good = shards.dataset("clean", 2, 4)
    broken = shards.write("clean-train-000009.tar", [{"__key__": "b", "jpg": b"x", "json": b"{"}])
    dataset = MixtureDataset([MixtureSource("clean", (*good, broken), 9)], {"clean": 1.0}, seed=0,
                             shuffle_buffer=4, samples_per_epoch=24)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1, collate_fn=list,
                                         multiprocessing_context="spawn", persistent_workers=True)
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        epochs.append([e.record.id for batch in loader for e in batch])
    assert len(epochs[0]) == len(epochs[1]) == 24 and epochs[0] != epochs[1]
    assert dataset.skip_counts()["clean"]["bad_json"] > 0
