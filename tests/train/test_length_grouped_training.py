"""``data.group_by_length=true``: the training loader's micro-batches regrouped by text length. Every sample of the
run once, the same mixture, the same DDP layout and exact resume as the plain loader, less padding; and a short
run through the real Lightning path, stopped and resumed, trains on the grouped run's batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from train_helpers import compose, tiny_overrides

SEED, BATCH, WINDOW = 5, 4, 8


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from instructblip.processing import InstructBlipProcessor

    return InstructBlipProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def shard_globs(generated_data):
    from instructblip.train.synthetic import write_generated_shards

    return write_generated_shards(generated_data, samples_per_dataset=32, samples_per_shard=16, image_size=32)


def batches(shard_globs, processor, grouped: bool, steps: int = 16, rank: int = 0, world: int = 1,
            consumed: int = 0, accumulate: int = 1) -> list[dict]:
    from instructblip.train.data import InstructBlipDataModule

    module = InstructBlipDataModule(datasets=shard_globs, batch_size=BATCH, seed=SEED, group_by_length=grouped,
                                    length_window_batches=WINDOW)
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=accumulate,
                                     max_steps=steps, lightning_module=SimpleNamespace(processor=processor))
    module.setup()
    module.load_state_dict({"batches_consumed": consumed, "seed": SEED})
    return list(module.train_dataloader())


def indices(run: list[dict]) -> list[list[int]]:
    return [batch["sample_index"].tolist() for batch in run]


def test_every_sample_once_same_mixture_less_padding(shard_globs, processor):
    from instructblip.data.length_grouping import padding_stats

    plain, grouped = batches(shard_globs, processor, False), batches(shard_globs, processor, True)
    assert sorted(i for batch in indices(grouped) for i in batch) == list(range(16 * BATCH))
    assert indices(grouped) != indices(plain)
    # the mixture is untouched: each global index draws the same dataset (and the same sample) in both runs
    dataset_of = lambda run: {i: d for b in run for i, d in zip(b["sample_index"].tolist(), b["dataset"])}  # noqa: E731
    assert dataset_of(grouped) == dataset_of(plain)
    # each window of WINDOW micro-batches holds the same samples as the plain loader's, only regrouped
    for start in range(0, 16, WINDOW):
        window = slice(start, start + WINDOW)
        assert sorted(sum(indices(grouped)[window], [])) == sorted(sum(indices(plain)[window], []))

    def padding(run):  # the real token rows of the batches (attention mask), right-padded to each batch's longest
        lengths = [int(n) for b in run for n in b["attention_mask"].sum(1)]
        rows = [list(range(i, i + BATCH)) for i in range(0, len(lengths), BATCH)]
        return padding_stats(lengths, rows)

    assert padding(grouped)["useful_tokens"] == padding(plain)["useful_tokens"]
    assert padding(grouped)["padding_per_useful_token"] < 0.5 * padding(plain)["padding_per_useful_token"]


def test_ranks_share_the_single_process_stream(shard_globs, processor):
    """2 ranks: disjoint, and together micro-batch for micro-batch what one process accumulating 2 sees."""
    single = indices(batches(shard_globs, processor, True, steps=8, accumulate=2))
    ranks = [indices(batches(shard_globs, processor, True, steps=8, rank=r, world=2)) for r in range(2)]
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))
    assert single == [ranks[m % 2][m // 2] for m in range(16)]


def test_resume_yields_the_identical_remaining_batches(shard_globs, processor):
    full = batches(shard_globs, processor, True)
    resumed = batches(shard_globs, processor, True, consumed=5)  # mid-window
    assert len(resumed) == len(full) - 5
    for before, after in zip(full[5:], resumed):
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(value, after[key]) if torch.is_tensor(value) else value == after[key], key


def test_config_composes_with_the_flag(tmp_path):
    from hydra.utils import instantiate

    for data in ("generated", "instruction_mixture"):
        assert compose([f"data={data}"], tmp_path).data.group_by_length is False
        module = instantiate(compose([f"data={data}", "data.group_by_length=true"], tmp_path).data)
        assert module.group_by_length is True and module.length_window_batches == 64


def test_lightning_run_stopped_and_resumed_trains_on_the_batches_of_the_run(tiny_checkpoint, generated_data, tmp_path):
    """Through the real Lightning path: 2 of 4 steps, a checkpoint, a stop (as a kill right after it), then a new
    build resuming from the checkpoint for steps 3-4; together they train on exactly the grouped run's batches."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from instructblip.train.run import build

    class Record(Callback):
        def __init__(self, stop_after: int | None = None):
            self.seen, self.stop_after = [], stop_after

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(batch["sample_index"].tolist())
            if self.stop_after is not None and trainer.global_step >= self.stop_after:
                trainer.should_stop = True

    overrides = [*tiny_overrides(tiny_checkpoint, generated_data, steps=4), "data.group_by_length=true",
                 "data.length_window_batches=4"]

    def run(name: str, callback: Record, ckpt_path=None, checkpoint_dir=None):
        module, datamodule, trainer = build(compose(overrides, tmp_path / name))
        trainer.callbacks.append(callback)
        if checkpoint_dir is not None:
            trainer.callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=2, save_top_k=-1,
                                                     filename="step={step}", auto_insert_metric_name=False))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        return trainer, datamodule

    first = Record(stop_after=2)
    trainer, datamodule = run("first", first, checkpoint_dir=tmp_path / "ckpt")
    assert trainer.global_step == 2 and datamodule.batches_consumed == 2
    second = Record()
    trainer, _ = run("second", second, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert trainer.global_step == 4 and len(second.seen) == 2

    # the whole run's grouped batches, from the loader alone: 4 micro-batches of 2, one window of 4
    from instructblip.data.length_grouping import LengthGroupedBatchSampler

    samples = datamodule.train_dataloader().dataset
    expected = list(LengthGroupedBatchSampler(2, 0, 1, 0, 4, length_of=samples.text_length, window_batches=4,
                                              seed=datamodule.seed))
    assert first.seen + second.seen == expected
    assert expected != [[2 * i, 2 * i + 1] for i in range(4)] and sorted(sum(expected, [])) == list(range(8))
