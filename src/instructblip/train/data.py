"""Training data for every stage: shards -> a deterministic mixture -> processor batches.

Why not a streaming pipeline here: exact resume and "2 ranks follow the same trajectory as 1" both need the data
order to be a pure function of the position in the run. So every training example is addressed by its *global
sample index* ``g`` (0, 1, 2, ... over the whole run, all ranks together) and is a pure function of ``(seed, g)``:
the dataset it comes from is drawn with the mixture weights, the record within it uniformly (sampling with
replacement, as webdataset's resampled shards do), and so are the template and the image augmentation. Micro-batch
``b`` of rank ``r`` holds ``g`` in ``[b*G + r*B, b*G + (r+1)*B)`` with ``B`` the per-device batch and ``G = B *
world size``, so one process with gradient accumulation over ``world size`` micro-batches sees exactly the samples
that the ranks see together, and resuming is restarting the sampler at the saved micro-batch count.

Random access into the tar shards comes from one pass over their headers (:class:`ShardIndex`); the bytes are read
with a seek, so no shard is ever decoded just to be skipped. A record that cannot be read or decoded is skipped,
counted per reason, and replaced by the next draw for the same ``g``.

Two speed options keep all of the above. ``group_by_length``: the micro-batches of a window of the global stream are
regrouped so that samples of similar text length share a batch (``LengthGroupedBatchSampler``; the length of ``g`` is
the text of its first draw, read from the record alone), which cuts the padding of mixed VQA/LLaVA batches.
``image_features``: the frozen trunk's output, precomputed by ``instructblip.data.features``, is read instead of
decoding and transforming the images, and the batch carries ``image_features`` instead of ``pixel_values``.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import tarfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from instructblip.data.mixture import derive_seed
from instructblip.errors import ConfigError, DataError

MAX_REDRAWS = 16  # a g whose draws are all corrupt means the data is broken, not unlucky


def expand_shards(spec: str | Sequence[str], what: str) -> list[str]:
    """Shard paths from a glob, a brace-free list, or a list of globs; an empty result is a one-line error."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = sorted(p for pattern in patterns for p in glob.glob(os.path.expanduser(str(pattern))))
    if not paths:
        raise DataError(f"{what}: no shard matches {patterns}")
    return paths


class ShardIndex:
    """Random access to the samples of WebDataset tar shards, from one pass over the tar headers.

    A sample is the group of consecutive members sharing a key (webdataset's rule: the path up to the first dot of
    the file name); ``read(i)`` returns ``{extension: bytes}`` for sample ``i``.
    """

    def __init__(self, shard_paths: Sequence[str]):
        self.shards = list(shard_paths)
        self.entries: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for shard_id, path in enumerate(self.shards):
            try:
                with tarfile.open(path, "r:") as tar:
                    current_key, members = None, {}
                    for info in tar:
                        if not info.isfile():
                            continue
                        directory, name = os.path.split(info.name)
                        key, _, ext = name.partition(".")
                        key = os.path.join(directory, key)
                        if key != current_key and members:
                            self.entries.append((shard_id, current_key, members))
                            members = {}
                        current_key = key
                        members[ext] = (info.offset_data, info.size)
                    if members:
                        self.entries.append((shard_id, current_key, members))
            except (tarfile.TarError, OSError) as error:
                # A truncated shard keeps the samples before the damage; the rest is lost and said so.
                raise DataError(f"shard {path}: unreadable tar ({error})") from error
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        return self.entries[i][1]

    def shard_id(self, i: int) -> int:
        return self.entries[i][0]

    def read(self, i: int, only: Sequence[str] | None = None) -> dict[str, bytes]:
        """The members of sample ``i`` (``only``: just these extensions, e.g. the ``json`` without the image)."""
        if os.getpid() != self._pid:  # a forked DataLoader worker must not share file offsets with its parent
            self._handles, self._pid = {}, os.getpid()
        shard_id, _, members = self.entries[i]
        handle = self._handles.get(shard_id)
        if handle is None:
            handle = self._handles[shard_id] = open(self.shards[shard_id], "rb")
        out = {}
        for ext, (offset, size) in members.items():
            if only is not None and ext not in only:
                continue
            handle.seek(offset)
            out[ext] = handle.read(size)
        out["__key__"], out["__url__"] = self.entries[i][1], self.shards[shard_id]
        return out

    def where(self, i: int) -> str:
        return f"{self.shards[self.entries[i][0]]}:{self.entries[i][1]}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class MixtureSamples(Dataset):
    """Global sample index ``g`` -> one example dict, a pure function of ``(seed, g)``.

    ``to_example(record, rng) -> dict | None`` turns a record into what the collate needs (an instruction and a
    target); ``None`` means the record has nothing for this stage (counted as ``missing_field``). Decoding and
    the skip counts are the data pipeline's (:class:`~instructblip.data.shards.ExampleDecoder`,
    :class:`~instructblip.data.shards.SkipCounter`, shared with the DataLoader workers).

    ``features`` (:class:`~instructblip.data.features.ImageFeatures`): only the record is read and decoded, and the
    example carries the stored trunk features (``image_features``) instead of the image; a sample without stored
    features (its image was corrupt when they were written) is skipped as a corrupt image is on the pixel path, so
    both paths draw the same samples.
    """

    def __init__(
        self,
        indexes: dict[str, ShardIndex],
        probabilities: dict[str, float],
        to_example: Callable[[Any, random.Random], dict | None],
        seed: int,
        length: int,
        counters: dict[str, Any],
        features: Any | None = None,
    ):
        from instructblip.data.shards import ExampleDecoder

        self.indexes = indexes
        self.names = sorted(indexes)
        self.cumulative = list(itertools.accumulate(probabilities[name] for name in self.names))
        self.to_example = to_example
        self.seed = int(seed)
        self.length = int(length)
        self.counters = counters
        self.decoders = {name: ExampleDecoder(counters[name], require_target=True) for name in self.names}
        self.features = features

    def __len__(self) -> int:
        return self.length

    def _draw(self, g: int, attempt: int) -> tuple[random.Random, str, int]:
        rng = random.Random(derive_seed("train", self.seed, int(g), attempt))
        name = rng.choices(self.names, cum_weights=self.cumulative)[0]
        return rng, name, rng.randrange(len(self.indexes[name]))

    def text_length(self, g: int) -> int:
        """Characters of instruction + target of the first draw for ``g``, from its record alone (no image read):
        the length that length-grouped batching sorts by. 0 when that draw is unusable (the loader redraws it)."""
        rng, name, position = self._draw(g, 0)
        try:
            record = _parse_record(self.indexes[name].read(position, only=("json",)).get("json"))
            example = self.to_example(record, rng) if record is not None else None
        except (OSError, ValueError, TypeError):
            return 0
        return len(example["instruction"]) + len(example["target"]) if example else 0

    def __getitem__(self, g: int) -> dict:
        for attempt in range(MAX_REDRAWS):
            rng, name, position = self._draw(g, attempt)
            index = self.indexes[name]
            try:
                members = index.read(position, only=("json",) if self.features is not None else None)
            except OSError as error:
                self.counters[name].add("unreadable_shard", f"{index.where(position)}: {error}")
                continue
            if self.features is not None:
                example = self._with_features(name, index, position, members, rng)
                if example is None:
                    continue
            else:
                decoded = self.decoders[name](members)
                if decoded is None:
                    continue
                example = self.to_example(decoded.record, rng)
                if example is None:
                    self.counters[name].add("missing_field", f"{index.where(position)}: nothing to train on")
                    continue
                several = decoded.record.task == "video_qa" or len(decoded.images) > 1
                example.update(image=decoded.images if several else decoded.images[0])
            example.update(dataset=name, index=int(g))
            return example
        raise DataError(
            f"sample {g}: {MAX_REDRAWS} draws in a row were unusable; the shards of {self.names} look broken "
            f"(skips so far: { {n: c.counts() for n, c in self.counters.items()} })"
        )

    def _with_features(self, name: str, index: ShardIndex, position: int, members: dict, rng) -> dict | None:
        """The example of a record with its stored trunk features, or None (counted) as the pixel path skips."""
        from instructblip.data.templates import missing_fields

        counter, where = self.counters[name], index.where(position)
        raw = members.get("json")
        if raw is None:
            counter.add("missing_json", where)
            return None
        try:
            record = _parse_record(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            counter.add("bad_json", f"{where}: {error}")
            return None
        except (ValueError, TypeError) as error:
            counter.add("missing_field" if "lacks required" in str(error) else "bad_record", f"{where}: {error}")
            return None
        missing = missing_fields(record, need_target=True)
        if missing:
            counter.add("missing_field", f"{where}: task {record.task!r} needs {', '.join(missing)}")
            return None
        features = self.features.get(name, index.shard_id(position), index.key(position))
        if features is None:
            counter.add("bad_image", f"{where}: no stored features (its image was skipped when they were written)")
            return None
        example = self.to_example(record, rng)
        if example is None:
            counter.add("missing_field", f"{where}: nothing to train on")
            return None
        example["image_features"] = features if record.task == "video_qa" or features.shape[0] > 1 else features[0]
        return example


def _parse_record(raw: bytes | None):
    """The shard record from its JSON member (None when there is none); raises ValueError/TypeError if invalid."""
    from instructblip.data.record import Record

    return None if raw is None else Record.from_json(raw)


class GlobalBatchSampler(Sampler[list[int]]):
    """Micro-batch ``b`` of rank ``r``: the global indices ``[b*G + r*B, b*G + (r+1)*B)``, from ``start``."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start: int, num_batches: int):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start, self.num_batches = start, num_batches

    def __len__(self) -> int:
        # The whole epoch, the batches already consumed included: on a mid-epoch resume Lightning counts the
        # restored progress as already fetched, so a shorter length ends the epoch early and the next epoch
        # would replay the data from ``start``.
        return self.start + self.num_batches

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.start + self.num_batches):
            first = b * global_batch + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))


def position_seed(seed: int, index: int, salt: str = "augment") -> int:
    """A torch seed for work that must be a function of the data position (augmentation, dropout)."""
    from instructblip.data.mixture import derive_seed

    return derive_seed(salt, seed, index)


class InstructionCollate:
    """A list of examples -> the model batch (through the model's processor) plus bookkeeping.

    The image augmentation runs under a torch seed derived from the first sample's global index, so the batch is
    the same whichever worker builds it and whether or not the run was resumed. Examples that carry stored trunk
    features give ``image_features`` (B, [T,] tokens, width) instead of ``pixel_values``.
    """

    def __init__(self, processor, seed: int, train: bool = True):
        self.processor, self.seed, self.train = processor, seed, train

    def __call__(self, examples: list[dict]) -> dict:
        instructions, targets = [e["instruction"] for e in examples], [e["target"] for e in examples]
        if "image_features" in examples[0]:
            batch = dict(self.processor.training_batch(None, instructions, targets))
            batch["image_features"] = torch.stack([e["image_features"] for e in examples])
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(position_seed(self.seed, examples[0]["index"]))
                batch = self.processor.training_batch(
                    [e["image"] for e in examples], instructions, targets, train_transform=self.train,
                )
            batch = dict(batch)
        batch["dataset"] = [e["dataset"] for e in examples]
        batch["sample_index"] = torch.tensor([e["index"] for e in examples])
        return batch


class CaptionCollate:
    """Stage 1: images and caption text for the Q-Former's own tokenizer (no LLM)."""

    def __init__(self, processor, seed: int, max_text_length: int = 32, train: bool = True):
        self.processor, self.seed, self.max_text_length, self.train = processor, seed, max_text_length, train

    def __call__(self, examples: list[dict]) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(position_seed(self.seed, examples[0]["index"]))
            pixel_values = self.processor.pixel_values([e["image"] for e in examples], train=self.train)
        text = self.processor.qformer_tokenizer(
            [e["target"] for e in examples], padding="longest", truncation=True,
            max_length=self.max_text_length, return_token_type_ids=False, return_tensors="pt",
        )
        return {
            "pixel_values": pixel_values,
            "text_input_ids": text["input_ids"],
            "text_attention_mask": text["attention_mask"],
            "dataset": [e["dataset"] for e in examples],
            "sample_index": torch.tensor([e["index"] for e in examples]),
        }


def instruction_example(record, rng: random.Random) -> dict | None:
    """A record -> one (instruction, target) pair through the task templates (drawn with ``rng``)."""
    from instructblip.data.templates import render

    instruction, target = render(record, rng)
    return {"instruction": instruction, "target": target} if target else None


def caption_example(record, rng: random.Random) -> dict | None:
    """BLIP-2 pretraining (stages 1 and 2) learns from captions without instructions: one reference, drawn."""
    if record.task != "caption" or not record.answers:
        return None
    return {"instruction": "", "target": record.answers[rng.randrange(len(record.answers))]}


EXAMPLE_BUILDERS = {"instruction": instruction_example, "caption": caption_example}


def check_image_features(image_features: str | None, augment: bool, collate: str) -> None:
    """Stored trunk features are of un-augmented images and stand in for pixel_values of the instruction collate."""
    if image_features and augment:
        raise ConfigError(
            "data.image_features is set but data.augment=true: the stored features are of un-augmented images; "
            "set data.augment=false or data.image_features=null"
        )
    if image_features and collate != "instruction":
        raise ConfigError(f"data.image_features needs data.collate=instruction, got {collate!r} (stage 1 "
                          "trains on pixel_values)")


def check_fixed_lengths(fixed_lengths, collate: str) -> list[dict[str, int]] | None:
    """``data.fixed_lengths``: None, one ``{instruction, target, qformer}`` of positive token counts, or a list of
    them (length buckets, shortest first); returned as a list (``processing.check_length_buckets``)."""
    from instructblip.processing import check_length_buckets

    if fixed_lengths is None:
        return None
    checked = check_length_buckets([fixed_lengths] if isinstance(fixed_lengths, Mapping) else list(fixed_lengths))
    if collate != "instruction":
        raise ConfigError(f"data.fixed_lengths is set but data.collate={collate!r}; fixed lengths apply to the "
                          "instruction collate only")
    return checked


class InstructBlipDataModule(pl.LightningDataModule):
    """The training mixture and the held-in validation split for one stage.

    ``datasets``: ``{registry name: shard glob, or list of globs}``. ``sampling``: ``sqrt`` (the paper),
    ``proportional`` (the "no data balancing" ablation), ``uniform`` or ``explicit`` (``weights``); ``adjustments``
    multiply the rule's weights (None: the data pipeline's paper adjustments for ``sqrt``). ``examples``:
    ``instruction`` (templates) or ``caption`` (BLIP-2 pretraining); ``collate``: ``instruction`` or ``caption``
    (stage 1, Q-Former text only). ``generate``: when set, the generated shards are written there first (the smoke
    run, the tests). The processor is the model's, taken from the LightningModule.

    ``group_by_length``: length-grouped micro-batches (windows of ``length_window_batches`` micro-batches of the
    global stream, see :class:`~instructblip.data.length_grouping.LengthGroupedBatchSampler`); the same samples,
    the same mixture, the same resume and DDP layout, less padding. ``image_features``: a directory written by
    ``python -m instructblip.data.features`` for these training shards; needs ``augment=false`` and the
    ``instruction`` collate. ``fixed_lengths``: ``{instruction, target, qformer}`` token counts, or a list of them
    (length buckets, shortest first): every training batch is padded to the first that holds its rows, rows longer
    than the last truncated to it (``InstructBlipProcessor.with_fixed_lengths``), so batches take a few shapes, as
    ``stage.module.step_mode=cuda_graph`` needs (one graph per shape); ``instruction`` collate only.
    """

    def __init__(
        self,
        datasets: dict[str, Any] | None,
        batch_size: int,
        sampling: str = "sqrt",
        adjustments: dict[str, float] | None = None,
        weights: dict[str, float] | None = None,
        examples: str = "instruction",
        collate: str = "instruction",
        num_workers: int = 0,
        seed: int = 0,
        val_datasets: dict[str, Any] | None = None,
        val_samples_per_dataset: int = 64,
        val_batch_size: int | None = None,
        generate: dict | None = None,
        max_text_length: int = 32,
        augment: bool = True,
        group_by_length: bool = False,
        length_window_batches: int = 64,
        image_features: str | None = None,
        fixed_lengths: dict[str, int] | None = None,
    ):
        super().__init__()
        check_image_features(image_features, augment, collate)
        self.fixed_lengths = check_fixed_lengths(fixed_lengths, collate)
        if int(length_window_batches) < 1:
            raise ConfigError(f"data.length_window_batches={length_window_batches}; must be >= 1")
        if examples not in EXAMPLE_BUILDERS:
            raise ConfigError(f"data.examples={examples!r}; allowed: {', '.join(sorted(EXAMPLE_BUILDERS))}")
        if collate not in ("instruction", "caption"):
            raise ConfigError(f"data.collate={collate!r}; allowed: caption, instruction")
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size={batch_size}; must be >= 1")
        self.dataset_specs = dict(datasets or {})
        self.batch_size, self.sampling = int(batch_size), sampling
        self.adjustments = None if adjustments is None else dict(adjustments)
        self.weights = None if weights is None else dict(weights)
        self.examples, self.collate, self.num_workers, self.seed = examples, collate, int(num_workers), int(seed)
        self.val_specs = dict(val_datasets or {})
        self.val_samples_per_dataset = int(val_samples_per_dataset)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.generate, self.max_text_length = generate, max_text_length
        # augment=False: no random crop/flip (ShapesWorld, whose answers name left/right and positions)
        self.augment = bool(augment)
        self.group_by_length, self.length_window_batches = bool(group_by_length), int(length_window_batches)
        self.image_features_dir = str(image_features) if image_features else None
        self.features = None
        self.batches_consumed = 0  # micro-batches of the global group already trained on (restored on resume)
        self.indexes: dict[str, ShardIndex] = {}
        self.val_indexes: dict[str, ShardIndex] = {}
        self.probabilities: dict[str, float] = {}
        self.skip_counters: dict[str, Any] = {}

    # --- state: the data position travels in the checkpoint ------------------------------------------------
    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(f"data.seed={self.seed} but the checkpoint was trained with seed {state['seed']}")
        self.batches_consumed = int(state["batches_consumed"])

    # --- setup -------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.indexes:
            return
        from instructblip.data.mixture import PAPER_ADJUSTMENTS, sampling_weights
        from instructblip.data.shards import SkipCounter

        if self.generate:  # rank 0 writes them (idempotent), then every rank finds them
            from instructblip.train.build import rank_zero_first
            from instructblip.train.synthetic import write_generated_shards

            rank_zero_first(lambda: write_generated_shards(**self.generate))
            globs = write_generated_shards(**self.generate)
            self.dataset_specs = self.dataset_specs or globs
            self.val_specs = self.val_specs or globs
        if not self.dataset_specs:
            raise ConfigError("data.datasets is empty; name at least one dataset and its shards")
        self.indexes = {
            name: ShardIndex(expand_shards(spec, f"data.datasets.{name}")) for name, spec in self.dataset_specs.items()
        }
        empty = sorted(name for name, index in self.indexes.items() if len(index) == 0)
        if empty:
            raise DataError(f"data.datasets: no samples in the shards of {empty}")
        adjustments = self.adjustments
        if adjustments is None:
            adjustments = {k: v for k, v in PAPER_ADJUSTMENTS.items() if k in self.indexes} if self.sampling == "sqrt" else {}
        self.probabilities = sampling_weights(
            {name: len(index) for name, index in self.indexes.items()}, self.sampling,
            adjustments=adjustments or None, weights=self.weights,
        )
        self.skip_counters = {name: SkipCounter(name) for name in self.indexes}
        if self.image_features_dir:
            from instructblip.data.features import ImageFeatures

            self.features = ImageFeatures(self.image_features_dir, self.indexes)
        self.val_indexes = {
            name: self.indexes[name] if spec == self.dataset_specs.get(name)
            else ShardIndex(expand_shards(spec, f"data.val_datasets.{name}"))
            for name, spec in self.val_specs.items()
        }

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """{dataset: {reason: n}} skipped on this rank so far (its DataLoader workers included)."""
        return {name: counter.counts() for name, counter in self.skip_counters.items()}

    @property
    def processor(self):
        return self.trainer.lightning_module.processor

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._world()
        accumulate = self.trainer.accumulate_grad_batches
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0:
            raise ConfigError("trainer.max_steps must be set (the mixture is endless, so epochs do not end it)")
        # One "epoch" is the rest of the run; a skipped (non-finite) step still consumes its batches.
        remaining = max(1, max_steps * accumulate - self.batches_consumed)
        global_batch = self.batch_size * world_size
        samples = MixtureSamples(
            self.indexes, self.probabilities, EXAMPLE_BUILDERS[self.examples], self.seed,
            length=(self.batches_consumed + remaining) * global_batch, counters=self.skip_counters,
            features=self.features,
        )
        if self.features is not None:
            self.features.check_model(self.trainer.lightning_module.model)
        if self.group_by_length:
            from instructblip.data.length_grouping import LengthGroupedBatchSampler

            sampler = LengthGroupedBatchSampler(
                self.batch_size, rank, world_size, self.batches_consumed, remaining, length_of=samples.text_length,
                window_batches=self.length_window_batches, seed=self.seed,
            )
        else:
            sampler = GlobalBatchSampler(self.batch_size, rank, world_size, self.batches_consumed, remaining)
        processor = self.processor
        if self.fixed_lengths is not None:
            processor = processor.with_fixed_lengths(self.fixed_lengths)
        collate = (
            CaptionCollate(processor, self.seed, self.max_text_length, train=self.augment)
            if self.collate == "caption" else InstructionCollate(processor, self.seed, train=self.augment)
        )
        return DataLoader(
            samples, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self):
        if not self.val_indexes:
            return []
        rank, world_size = self._world()
        records = [
            (name, i) for name in sorted(self.val_indexes)
            for i in range(min(len(self.val_indexes[name]), self.val_samples_per_dataset))
        ]
        return DataLoader(
            ValidationSamples(self.val_indexes, records[rank::world_size]), batch_size=self.val_batch_size,
            collate_fn=list, num_workers=0,
        )


class ValidationSamples(Dataset):
    """Held-in validation examples (the first ``n`` records of each dataset): the decoded images, the record and
    its dataset name; the prompt is the dataset's fixed evaluation prompt, so validation is the evaluation
    protocol. Corrupt ones are counted and left out (``None``, dropped by the module)."""

    def __init__(self, indexes: dict[str, ShardIndex], records: list[tuple[str, int]]):
        from instructblip.data.shards import ExampleDecoder, SkipCounter

        self.indexes, self.records = indexes, records
        self.decoders = {name: ExampleDecoder(SkipCounter(f"{name} (validation)")) for name in indexes}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | None:
        name, position = self.records[i]
        decoded = self.decoders[name](self.indexes[name].read(position))
        if decoded is None:
            return None
        images = decoded.images if len(decoded.images) > 1 else decoded.images[0]
        return {"image": images, "record": decoded.record, "dataset": name}
