"""Fixture helpers for the converter tests: tiny native-format datasets written by the tests themselves.

Every builder writes the dataset's official file names and fields, tiny JPEG/PNG images (PIL) and tiny videos
(PyAV), plus the three kinds of corrupt input the converters must survive: a missing image, an unreadable image,
and a record with a missing field.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

# This folder is named like the package it tests: with pytest's default import mode, tests/ is on sys.path and
# ``import data_prep`` would find this folder as a namespace package (the editable install's finder comes after
# the path finder). The repo root on sys.path makes the regular package win, as under ``python -m pytest``.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)
if "data_prep" in sys.modules and getattr(sys.modules["data_prep"], "__file__", None) is None:
    del sys.modules["data_prep"]

import pytest  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

import data_prep  # noqa: E402
from instructblip.data.record import Record  # noqa: E402

_colour = iter(range(10_000))


def jpeg(path: Path, size=(8, 6)) -> bytes:
    """A tiny JPEG with a colour of its own (so images are distinguishable); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shade = next(_colour) * 37 % 256
    Image.new("RGB", size, (shade, 255 - shade, 128)).save(path, format="JPEG")
    return path.read_bytes()


def png(path: Path, size=(8, 6)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    shade = next(_colour) * 53 % 256
    Image.new("RGB", size, (shade, 64, 255 - shade)).save(path, format="PNG")
    return path.read_bytes()


def garbage(path: Path) -> None:
    """A file with an image name that is not an image (an unreadable image / video)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image, it is a truncated download")


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows, extra_lines=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def grey_video(path: Path, num_frames: int = 10, size=(32, 32), fps: int = 10) -> list[int]:
    """A tiny video whose frame i is a flat grey of level 20 + 20*i; returns the levels."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [20 + 20 * i for i in range(num_frames)]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), level, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return levels


def convert(dataset: str, src: Path, out: Path, split: str | None = None, **options):
    return data_prep.convert(dataset, src, out, split=split, shard_size=options.pop("shard_size", 3),
                             progress=False, **options)


def read_shards(out: Path, dataset: str, split: str) -> dict[str, tuple[Record, dict[str, bytes]]]:
    """id -> (record, media members) for every sample in the shards, read back with webdataset."""
    paths = sorted(str(p) for p in Path(out).glob(f"{dataset}-{split}-*.tar"))
    samples: dict[str, tuple[Record, dict[str, bytes]]] = {}
    if not paths:
        return samples
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        record = Record.from_json(sample["json"])
        assert record.id == sample["__key__"]
        assert record.id not in samples, f"duplicate id {record.id}"
        media = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
        samples[record.id] = (record, media)
    return samples


def summary(out: Path, dataset: str, split: str) -> dict:
    return json.loads((Path(out) / f"{dataset}-{split}-summary.json").read_text())


def check(out: Path, dataset: str, split: str, expected: dict[str, dict], skipped: dict[str, str],
          filtered: dict[str, int] | None = None) -> dict[str, tuple[Record, dict[str, bytes]]]:
    """Every expected record is in the shards with exactly the expected field values (fields not named must hold
    their defaults, except ``extra``), nothing else is; every skip is listed with its reason; counts add up."""
    samples = read_shards(out, dataset, split)
    assert sorted(samples) == sorted(expected)
    defaults = Record(dataset="", task="", id="", split="")
    for record_id, want in expected.items():
        record, media = samples[record_id]
        assert record.dataset == dataset
        want = dict(want)
        image = want.pop("image", None)
        for f in fields(Record):
            if f.name in ("dataset", "id", "version"):
                continue
            if f.name in want:
                assert getattr(record, f.name) == want[f.name], (record_id, f.name)
            elif f.name not in ("extra", "split", "task", "image_id"):
                assert getattr(record, f.name) == getattr(defaults, f.name), (record_id, f.name, "should be unset")
        if image is not None:  # (member name, bytes): copied as they are on disk
            assert media == {image[0]: image[1]}, record_id
    report = summary(out, dataset, split)
    assert {r["id"]: r["reason"] for r in report["skipped_records"]} == skipped
    assert report["written"] == len(expected)
    assert sum(report["skipped"].values()) == len(skipped)
    assert report["filtered"] == (filtered or {})
    assert report["records_read"] == len(expected) + len(skipped) + sum((filtered or {}).values())
    return samples


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "shards"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir()
    return path
