"""The converter writes shards that read back as Records, images and frames included."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

import data_prep
from instructblip.data.record import Record
from instructblip.errors import ConfigError
from instructblip.shapesworld import tasks, world


def test_shards_read_back_as_records(tmp_path):
    summary = data_prep.convert("shapesworld_vqa", None, tmp_path, split="train", shard_size=5, n=12, seed=4,
                                progress=False)
    assert summary.written == 12 and len(summary.shards) == 3
    records = []
    for shard in summary.shards:
        with tarfile.open(tmp_path / shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                record = Record.from_json(data)
                image = Image.open(io.BytesIO(members[name.removesuffix(".json") + ".png"]))
                assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
                records.append(record)
    assert [r.id for r in records] == [f"shapesworld_vqa_train_{i:07d}" for i in range(12)]
    assert records[3] == Record.from_json(tasks.build("shapesworld_vqa", "train", 3, seed=4)[0].to_json())


def test_video_shards_hold_four_frames(tmp_path):
    summary = data_prep.convert("shapesworld_video_qa", None, tmp_path, split="test", shard_size=10, n=3, seed=0,
                                progress=False)
    with tarfile.open(tmp_path / summary.shards[0]) as tar:
        names = tar.getnames()
    key = "shapesworld_video_qa_test_0000000"
    assert {f"{key}.frame{t}.jpg" for t in range(4)} <= set(names)
    assert json.loads((tmp_path / "shapesworld_video_qa-test-summary.json").read_text())["written"] == 3


def test_rerun_keeps_complete_shards(tmp_path):
    data_prep.convert("shapesworld_caption", None, tmp_path, split="val", shard_size=4, n=8, seed=0, progress=False)
    again = data_prep.convert("shapesworld_caption", None, tmp_path, split="val", shard_size=4, n=8, seed=0,
                              progress=False)
    assert again.reused == 8


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        data_prep.convert("shapesworld_vqa", None, tmp_path, split="train2014", n=2)
    with pytest.raises(ConfigError, match="unknown ShapesWorld dataset"):
        data_prep.convert("shapesworld_nope", None, tmp_path, split="train", n=2)
