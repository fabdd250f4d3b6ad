"""The shard writer: naming, shard size, atomic completion, resume, the summary, and media member checks."""

from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image

from conftest import jpeg, read_shards, summary
from data_prep.media import BAD_FIELD, MISSING_IMAGE, UNREADABLE_IMAGE, SkipRecord, image_member
from data_prep.shards import Filtered, Sample, Skip, safe_key, write_shards
from instructblip.data.record import Record


class Loads:
    """Counts media loads, to prove a rerun does not read the images of complete shards again."""

    def __init__(self, image):
        self.image, self.count = image, 0

    def __call__(self):
        self.count += 1
        return image_member(self.image)


def _items(image, loads, n=7, fail_after=None):
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise KeyboardInterrupt("interrupted")
        yield Sample(Record(dataset="toy", task="vqa", id=f"q{i:02d}", split="val", question=f"q{i}?",
                            answers=[str(i)]), loads)


def test_shards_are_named_sized_and_hold_the_record_members(tmp_path):
    image = tmp_path / "a.jpg"
    data = jpeg(image)
    report = write_shards(_items(image, Loads(image)), tmp_path / "out", "toy", "val", shard_size=3, progress=False)
    names = [f"toy-val-{i:06d}.tar" for i in range(3)]
    assert report.shards == names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names + ["toy-val-summary.json"]
    members = [tarfile.open(tmp_path / "out" / name).getnames() for name in names]
    assert [len(m) for m in members] == [6, 6, 2]
    assert members[2] == ["q06.jpg", "q06.json"]
    samples = read_shards(tmp_path / "out", "toy", "val")
    assert sorted(samples) == [f"q{i:02d}" for i in range(7)]
    assert all(media == {"jpg": data} for _, media in samples.values())
    assert samples["q03"][0].answers == ["3"]


def test_rerun_keeps_complete_shards_and_rewrites_only_missing_ones(tmp_path):
    image = tmp_path / "a.jpg"
    jpeg(image)
    out = tmp_path / "out"
    write_shards(_items(image, Loads(image)), out, "toy", "val", shard_size=3, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}

    loads = Loads(image)
    report = write_shards(_items(image, loads), out, "toy", "val", shard_size=3, progress=False)
    assert loads.count == 0 and report.reused == 7 and report.written == 7

    (out / "toy-val-000001.tar").unlink()
    loads = Loads(image)
    report = write_shards(_items(image, loads), out, "toy", "val", shard_size=3, progress=False)
    assert loads.count == 3 and report.reused == 4
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before  # same boundaries, same bytes


def test_an_interrupted_run_leaves_only_complete_shards_and_resumes(tmp_path):
    image = tmp_path / "a.jpg"
    jpeg(image)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(_items(image, Loads(image), fail_after=5), out, "toy", "val", shard_size=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["toy-val-000000.tar"]  # the half-written shard is gone
    (out / "toy-val-000001.tar.tmp").write_bytes(b"left by a killed run")
    loads = Loads(image)
    report = write_shards(_items(image, loads), out, "toy", "val", shard_size=3, progress=False)
    assert loads.count == 4 and report.reused == 3
    assert not list(out.glob("*.tmp"))
    assert sorted(read_shards(out, "toy", "val")) == [f"q{i:02d}" for i in range(7)]


def test_summary_counts_and_lists_every_skip(tmp_path):
    good = tmp_path / "a.jpg"
    jpeg(good)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    def items():
        yield Sample(Record(dataset="toy", task="vqa", id="ok", split="val"), lambda: image_member(good))
        yield Sample(Record(dataset="toy", task="vqa", id="bad", split="val"),
                     lambda: image_member(tmp_path / "bad.jpg"))
        yield Sample(Record(dataset="toy", task="vqa", id="gone", split="val"),
                     lambda: image_member(tmp_path / "gone.jpg"))
        yield Sample(Record(dataset="toy", task="vqa", id="has.dot", split="val"), lambda: image_member(good))
        yield Skip("nofield", BAD_FIELD, "missing field(s) ['question']")
        yield Filtered("outside the subset")
        yield Filtered("outside the subset")

    write_shards(items(), tmp_path / "out", "toy", "val", shard_size=10, options={"num_frames": 4}, progress=False)
    report = summary(tmp_path / "out", "toy", "val")
    assert report["records_read"] == 7 and report["written"] == 1
    assert report["skipped"] == {BAD_FIELD: 2, MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1}
    assert report["filtered"] == {"outside the subset": 2}
    assert [(r["id"], r["reason"]) for r in report["skipped_records"]] == [
        ("bad", UNREADABLE_IMAGE), ("gone", MISSING_IMAGE), ("has.dot", BAD_FIELD), ("nofield", BAD_FIELD)]
    assert str(tmp_path / "gone.jpg") in report["skipped_records"][1]["detail"]
    assert report["options"] == {"num_frames": 4}
    assert list(read_shards(tmp_path / "out", "toy", "val")) == ["ok"]


def test_image_members_follow_content_not_extension(tmp_path):
    png_as_jpg = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (4, 4), "blue").save(png_as_jpg, format="PNG")
    assert image_member(png_as_jpg) == {"png": png_as_jpg.read_bytes()}
    truncated = tmp_path / "truncated.jpg"
    jpeg(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(SkipRecord) as error:
        image_member(truncated)
    assert error.value.reason == UNREADABLE_IMAGE
    webp = io.BytesIO()
    Image.new("RGB", (4, 4), "green").save(webp, format="WEBP")
    (tmp_path / "x.webp").write_bytes(webp.getvalue())
    assert list(image_member(tmp_path / "x.webp")) == ["jpg"]


def test_safe_key_and_member_name_checks(tmp_path):
    assert safe_key("a.b/c d") == "a_b_c_d"
    bad = Sample(Record(dataset="toy", task="vqa", id="x", split="val"), {"image.gif": b"GIF89a"})
    with pytest.raises(ValueError, match="not jpg, png or frameN.jpg"):
        write_shards([bad], tmp_path / "out", "toy", "val", progress=False)
    assert not list((tmp_path / "out").glob("*.tar*"))
