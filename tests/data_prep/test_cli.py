"""``instructblip-prep``: the dataset list, a conversion, and one-line errors with a non-zero exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import convert, png, read_shards, write_jsonl
from instructblip.errors import ConfigError

PREP = Path(sys.executable).parent / "instructblip-prep"


def prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PREP), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def test_dataset_list_prints_every_dataset_with_its_facts():
    result = prep("dataset=list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["dataset", "category", "held"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert "26 datasets: 13 held-in, 13 held-out, 11 categories" in lines[-1]
    assert "visual conversational question answering" in rows["visdial"]
    assert rows["visdial"].split()[-6:] == ["held-out", "dialog", "mrr", "rank", "-", "val"]
    assert rows["vqav2"].split()[-6:] == ["held-in", "vqa", "vqa_accuracy", "generate", "train2014", "val2014"]


def test_convert_from_the_command_line(tmp_path):
    src = tmp_path / "hm"
    image = png(src / "data/img/42953.png")
    write_jsonl(src / "data/dev_seen.jsonl", [
        {"id": 42953, "img": "img/42953.png", "label": 0, "text": "meme text"},
        {"id": 1, "img": "img/00001.png", "label": 1, "text": "gone"}])
    out = tmp_path / "shards"
    result = prep("dataset=hateful_memes", f"src={src}", f"out={out}", "shard_size=10", "progress=false")
    assert result.returncode == 0, result.stderr
    summary_file = out / "hateful_memes-dev_seen-summary.json"
    assert result.stdout.splitlines()[-1] == str(summary_file)
    assert "1 records in 1 shard " in result.stdout and "1 missing image" in result.stdout
    assert json.loads(summary_file.read_text())["skipped"] == {"missing image": 1}
    assert read_shards(out, "hateful_memes", "dev_seen")["42953"][1] == {"png": image}


def test_errors_are_one_line_and_exit_non_zero(tmp_path):
    unknown = prep("dataset=coco", f"src={tmp_path}", f"out={tmp_path}/o")
    assert unknown.returncode != 0
    assert unknown.stderr.strip().count("\n") == 0
    assert "unknown dataset 'coco'; known: aokvqa" in unknown.stderr and "vqav2" in unknown.stderr

    missing = prep("dataset=okvqa", f"src={tmp_path}", f"out={tmp_path}/o", "split=val2014")
    assert missing.returncode != 0 and missing.stderr.strip().count("\n") == 0
    assert ("okvqa: missing OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json "
            f"(looked in {tmp_path}, {tmp_path}/Questions") in missing.stderr

    unknown_setting = prep("dataset=okvqa", "frames=8")
    assert unknown_setting.returncode != 0 and unknown_setting.stderr.strip().count("\n") == 0
    assert "unknown setting 'frames'; allowed: dataset, src, out, split" in unknown_setting.stderr


def test_bad_split_and_unknown_option_name_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="gqa: unknown split 'testdev'; allowed: train_balanced"):
        convert("gqa", tmp_path, tmp_path / "o", split="testdev")
    with pytest.raises(ConfigError, match=r"gqa: unknown option\(s\) num_frames; allowed: images"):
        convert("gqa", tmp_path, tmp_path / "o", num_frames=8)
    assert not (tmp_path / "o").exists()
