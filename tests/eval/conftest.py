"""Fixtures for the evaluation tests: a tiny random checkpoint and tiny shards of several held-out datasets, written
with webdataset's TarWriter in the project's shard format (instructblip.data.record)."""

import io
import random

import pytest
import webdataset as wds
from PIL import Image

from instructblip.data.record import Record

SAMPLES_PER_DATASET = 6


def _png(seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):
        image.putpixel((rng.randrange(32), rng.randrange(32)), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _records(name: str, split: str, index: int) -> Record:
    """One record per dataset family, with the fields its converter writes."""
    rid = f"{name}_{index:03d}"
    base = dict(dataset=name, id=rid, split=split, image_id=rid)
    colors = ["red", "blue", "green"]
    if name == "gqa":
        return Record(task="vqa", question=f"What color is object {index}?", answers=[colors[index % 3]], **base)
    if name == "textvqa":
        return Record(task="vqa", question="What does the sign say?", ocr_tokens=["stop", "here"],
                      answers=["stop"] * 6 + ["stop here"] * 4, **base)
    if name == "flickr30k":
        return Record(task="caption", answers=[f"a {c} square on a field" for c in colors], **base)
    if name == "scienceqa":
        return Record(task="mc", question="Which is a mammal?", choices=["frog", "whale", "trout"],
                      answer_index=1, answers=["whale"], context="Mammals feed milk." if index % 2 else "",
                      **base)
    if name == "hateful_memes":
        label = index % 2
        return Record(task="classification", text=f"meme text {index}", label=label,
                      answers=["yes", "true"] if label else ["no", "false"], **base)
    if name == "visdial":
        candidates = [f"answer {k}" for k in range(5)]
        return Record(task="dialog", question="is it sunny", caption="a park", candidates=candidates,
                      answer_index=index % 5, answers=[candidates[index % 5]],
                      dialog_history=[{"question": "is there a dog", "answer": "yes"}],
                      relevance=[1.0, 0.5, 0.0, 0.0, 0.0] if index % 2 == 0 else None, **base)
    if name == "msvd_qa":
        return Record(task="video_qa", question="what is the man doing?", answers=[["run", "swim", "eat"][index % 3]],
                      num_frames=2, **base)
    raise KeyError(name)


FIXTURE_DATASETS = {  # registry name -> eval split
    "gqa": "testdev_balanced",
    "textvqa": "val",
    "flickr30k": "test",
    "scienceqa": "test",
    "hateful_memes": "dev_seen",
    "visdial": "val",
    "msvd_qa": "test",
}


def write_dataset_shards(root, name: str, split: str, count: int = SAMPLES_PER_DATASET, per_shard: int = 3):
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, per_shard):
        with wds.TarWriter(str(root / f"{name}-{split}-{start // per_shard:06d}.tar")) as writer:
            for index in range(start, min(start + per_shard, count)):
                record = _records(name, split, index)
                sample = {"__key__": record.id, "json": record.to_json()}
                if record.num_frames:
                    for frame in range(record.num_frames):
                        sample[f"frame{frame}.jpg"] = _jpeg(_png(index * 10 + frame))
                else:
                    sample["png"] = _png(index)
                writer.write(sample)


def _jpeg(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def fixture_datasets():
    """(registry name -> eval split, samples per dataset) of the ``eval_shards`` fixture."""
    return dict(FIXTURE_DATASETS), SAMPLES_PER_DATASET


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_shards")
    for name, split in FIXTURE_DATASETS.items():
        write_dataset_shards(root, name, split)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from instructblip.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_eval") / "llama", "llama")


@pytest.fixture
def run_app(monkeypatch, capsys):
    """Run a console script's Hydra app in this process: ``run_app(main, name, *overrides) -> (exit code, stdout,
    stderr)``."""
    import sys

    def run(main, name: str, *overrides: str):
        monkeypatch.setattr(sys, "argv", [name, *overrides])
        code = 0
        try:
            main()
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
