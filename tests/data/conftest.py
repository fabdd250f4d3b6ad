"""Fixtures for the data tests: tiny WebDataset shards in the project's Record format, written by the tests with
webdataset's own TarWriter (no converter involved), and corrupt variants of them."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from instructblip.data.record import Record


def image_bytes(seed: int, size=(24, 16), fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def vqa_record(dataset: str, index: int, split: str = "train") -> Record:
    return Record(
        dataset=dataset, task="vqa", id=f"{dataset}_{index}", split=split,
        question=f"what is object {index}?", answers=["cube", "cube", "ball"],
    )


def sample(record: Record, **members: bytes) -> dict:
    """A WebDataset sample dict: ``__key__`` = record id, the record as ``json``, plus the given members (default:
    one JPEG)."""
    if not members:
        members = {"jpg": image_bytes(zlib.crc32(record.id.encode()))}
    return {"__key__": record.id, **members, "json": record.to_json()}


class ShardFactory:
    """Writes shards into a temporary directory; also carries the helpers above for the test modules."""

    image_bytes = staticmethod(image_bytes)
    vqa_record = staticmethod(vqa_record)
    sample = staticmethod(sample)

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, name: str, samples: list[dict]) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(path)) as writer:
            for item in samples:
                writer.write(item)
        return str(path)

    def dataset(self, dataset: str, num_shards: int, per_shard: int, split: str = "train") -> list[str]:
        """``num_shards`` shards of ``per_shard`` VQA samples each, named like the converters name them."""
        paths = []
        for shard in range(num_shards):
            records = [vqa_record(dataset, shard * per_shard + i, split) for i in range(per_shard)]
            paths.append(self.write(f"{dataset}-{split}-{shard:06d}.tar", [sample(r) for r in records]))
        return paths

    def truncate_inside_member(self, path: str, key: str, member: str = "jpg") -> None:
        """Cut the tar in the middle of ``key.member``'s data, as an interrupted copy would."""
        with tarfile.open(path) as tar:
            info = tar.getmember(f"{key}.{member}")
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: info.offset_data + info.size // 2])


@pytest.fixture()
def shards(tmp_path) -> ShardFactory:
    return ShardFactory(tmp_path)


@pytest.fixture()
def distributed_env(monkeypatch):
    """Pretend to be (rank, world_size, worker, num_workers) the way webdataset reads it from the environment."""

    def set_env(rank: int, world_size: int, worker: int, num_workers: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", str(num_workers))

    return set_env
