"""Reading shards: every sample decoded, corrupt ones skipped and counted per reason, nothing else lost, and a
non-resampled pass split over ranks and workers without overlap or loss."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from instructblip.data.record import Record
from instructblip.data.shards import SKIP_REASONS, SkipCounter, list_shards, read_shards
from instructblip.errors import DataError


def test_images_videos_and_records_round_trip(shards):
    image_records = [shards.vqa_record("vqav2", i) for i in range(4)]
    video = Record(dataset="msvd_qa", task="video_qa", id="clip_7", split="test", question="what happens?",
                   answers=["run"], num_frames=3)
    frames = {f"frame{i}.jpg": shards.image_bytes(100 + i) for i in range(3)}
    png = Record(dataset="iconqa", task="mc", id="icon_1", split="test", question="which?", choices=["a", "b"],
                 answer_index=1, answers=["b"])
    path = shards.write("mixed-000000.tar", [shards.sample(r) for r in image_records]
                        + [shards.sample(video, **frames), shards.sample(png, png=shards.image_bytes(5, fmt="PNG"))])
    examples = list(read_shards(path))
    assert [e.record for e in examples] == image_records + [video, png]
    assert [len(e.images) for e in examples] == [1, 1, 1, 1, 3, 1]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (24, 16)
               for e in examples for im in e.images)
    # frames come back in frame order, whatever order tar members were written in
    assert list(examples[4].images[2].getdata())[:5] == list(
        Image.open(__import__("io").BytesIO(frames["frame2.jpg"])).convert("RGB").getdata())[:5]
    assert read_shards(path).skip_counter.total() == 0


def corrupt_fixture(shards):
    """Two shards: one with a good sample between every kind of corrupt one, one truncated, plus a missing shard.
    Returns (shard paths, the ids that must come back, the expected counts)."""
    good = [shards.vqa_record("vqav2", i) for i in range(12)]
    vqa = lambda i: shards.vqa_record("bad", i)  # noqa: E731
    bad_jpeg = shards.image_bytes(1)[:200]  # a JPEG cut short: PIL fails on load()
    no_task = json.dumps({"dataset": "bad", "id": "bad_3", "split": "train", "question": "q?"}).encode()
    no_question = Record(dataset="bad", task="vqa", id="bad_4", split="train", answers=["x"])
    unknown_field = json.dumps({**json.loads(vqa(5).to_json()), "colour": "red"}).encode()
    short_video = Record(dataset="bad", task="video_qa", id="bad_7", split="train", question="q?", answers=["a"],
                         num_frames=4)
    samples = [
        shards.sample(good[0]),
        shards.sample(vqa(1), jpg=bad_jpeg),                                          # bad_image
        shards.sample(good[1]),
        {"__key__": "bad_2", "jpg": shards.image_bytes(2), "json": b'{"dataset": "bad", "task": '},  # bad_json
        {"__key__": "bad_2b", "jpg": shards.image_bytes(2), "json": b"\xff\xfe not utf-8"},        # bad_json
        {"__key__": "bad_2c", "jpg": shards.image_bytes(2), "json": b"[1, 2]"},                    # bad_json
        shards.sample(good[2]),
        {"__key__": "bad_3", "jpg": shards.image_bytes(3), "json": no_task},          # missing_field (Record)
        shards.sample(no_question),                                                   # missing_field (task)
        {"__key__": "bad_5", "jpg": shards.image_bytes(5), "json": unknown_field},    # bad_record
        shards.sample(good[3]),
        {"__key__": "bad_6", "json": vqa(6).to_json()},                               # missing_image
        {"__key__": "bad_6b", "txt": b"hello", "json": vqa(6).to_json()},             # missing_image
        shards.sample(short_video, **{f"frame{i}.jpg": shards.image_bytes(i) for i in (0, 1, 3)}),  # missing_image
        {"__key__": "bad_8", "jpg": shards.image_bytes(8)},                           # missing_json
        shards.sample(good[4]),
    ]
    first = shards.write("vqav2-train-000000.tar", samples)
    second = shards.write("vqav2-train-000001.tar", [shards.sample(r) for r in good[5:12]])
    shards.truncate_inside_member(second, good[9].id)  # good[9..11] are lost with the tail of the tar
    missing = str(shards.root / "vqav2-train-000002.tar")
    expected_ids = [r.id for r in good[:9]]
    expected = {"bad_image": 1, "bad_json": 3, "missing_field": 2, "bad_record": 1, "missing_image": 3,
                "missing_json": 1, "truncated_tar": 1, "unreadable_shard": 1}
    return [first, second, missing], expected_ids, expected


def test_corrupt_samples_are_skipped_and_counted_per_reason(shards):
    paths, expected_ids, expected = corrupt_fixture(shards)
    counter = SkipCounter("fixture")
    examples = list(read_shards(paths, counter))
    assert [e.record.id for e in examples] == expected_ids, "every readable sample comes back, in order"
    assert counter.counts() == {reason: expected.get(reason, 0) for reason in SKIP_REASONS}


def test_skip_counts_from_dataloader_workers_reach_the_main_process(shards):
    paths, expected_ids, expected = corrupt_fixture(shards)
    pipeline = read_shards(paths)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    ids = sorted(example.record.id for example in loader)
    assert ids == sorted(expected_ids)
    assert pipeline.skip_counter.counts() == {reason: expected.get(reason, 0) for reason in SKIP_REASONS}


def test_training_reads_require_a_target(shards):
    unlabeled = Record(dataset="vizwiz", task="vqa", id="v1", split="test", question="what is it?")
    path = shards.write("vizwiz-test-000000.tar", [shards.sample(unlabeled)])
    assert [e.record.id for e in read_shards(path)] == ["v1"]
    counter = SkipCounter()
    assert list(read_shards(path, counter, require_target=True)) == []
    assert counter.counts()["missing_field"] == 1


def test_non_resampled_pass_gives_every_sample_to_exactly_one_rank_and_worker(shards, distributed_env):
    paths = shards.dataset("gqa", num_shards=8, per_shard=5, split="testdev")
    everything = [e.record.id for e in read_shards(paths, split=False)]
    assert len(everything) == 40
    seen: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        for worker in range(2):
            distributed_env(rank, 2, worker, 2)
            seen[rank, worker] = [e.record.id for e in read_shards(paths)]
    assert all(len(ids) == 10 for ids in seen.values()), {k: len(v) for k, v in seen.items()}
    merged = [i for ids in seen.values() for i in ids]
    assert sorted(merged) == sorted(everything) and len(set(merged)) == len(merged)


def test_dataloader_workers_split_a_pass_without_duplicates(shards):
    paths = shards.dataset("gqa", num_shards=4, per_shard=3, split="testdev")
    loader = torch.utils.data.DataLoader(read_shards(paths), batch_size=None, num_workers=2)
    ids = [e.record.id for e in loader]
    assert sorted(ids) == sorted(f"gqa_{i}" for i in range(12))


def test_list_shards_accepts_directories_patterns_and_lists(shards, tmp_path):
    paths = shards.dataset("okvqa", num_shards=3, per_shard=1)
    assert list_shards(tmp_path) == paths
    assert list_shards(str(tmp_path / "okvqa-train-{000000..000002}.tar")) == paths
    assert list_shards(str(tmp_path / "okvqa-train-*.tar")) == paths
    assert list_shards(paths[:2]) == paths[:2]
    with pytest.raises(DataError, match="no shards found"):
        list_shards(tmp_path / "nothing-*.tar")


def test_skip_counter_rejects_unknown_reasons():
    with pytest.raises(ValueError, match="unknown skip reason 'gremlins'"):
        SkipCounter().add("gremlins")
