"""Video QA: MSVD-QA, MSRVTT-QA (xudejing/video-question-answering) and iVQA (antoyang/just-ask).

Native:

- MSVD-QA: ``{train,val,test}_qa.json`` = ``[{"answer", "id", "question", "video_id"}]``; ``youtube_mapping.txt``
  lines ``<youtubeid_start_end> vid<N>`` map ``video_id`` N to ``YouTubeClips/<youtubeid_start_end>.avi``;
- MSRVTT-QA: ``{train,val,test}_qa.json`` (+ ``category_id``); ``video_id`` N is ``video<N>.mp4`` (in
  ``video/``, ``videos/all/``, ``TrainValVideo/`` or ``TestVideo/``);
- iVQA: ``{train,val,test}.csv`` with ``video_id`` (YouTube id), ``start``, ``end``, ``question``,
  ``answer1`` ... ``answer5``; clips ``video/<video_id>_<start>_<end>.mp4`` (just-ask keeps each dataset's videos
  in a ``video/`` subfolder), or the full ``<video_id>.mp4``, then only [start, end] seconds are sampled.

``num_frames`` frames (default 4) are sampled uniformly with PyAV and stored as ``frame0.jpg`` ...; a missing or
undecodable video skips its questions (listed). Records: ``answers`` = [answer] (iVQA: the 5 answers, repeats
kept: the iVQA metric counts them), ``num_frames``; ``image_id`` = the video name. ``videos=`` points at the folder
holding the video folders (default ``src``).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from data_prep import Source
from data_prep.media import BAD_FIELD, MISSING_VIDEO, SkipRecord, video_members
from data_prep.shards import Sample, Skip
from data_prep.sources import MissingFilesError, check_split, find_files, load_json, media_root, require
from instructblip.data.record import Record
from instructblip.errors import ConfigError

SPLITS = ("train", "val", "test")
VIDEO_DIRS = {
    "msvd_qa": ("YouTubeClips", "video", "videos"),
    "msrvtt_qa": ("video", "videos/all", "TrainValVideo", "TestVideo", "videos"),  # just-ask: video/
    "ivqa": ("video", "videos", "clips"),
}
QA_SUBDIRS = {"msvd_qa": ("", "MSVD-QA", "msvd_qa"), "msrvtt_qa": ("", "MSRVTT-QA", "msrvtt_qa"),
              "ivqa": ("", "iVQA", "ivqa")}
IVQA_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi")


def records(dataset: str, src: Path, split: str, videos: str | None = None, num_frames: int = 4) -> Source:
    check_split(dataset, split, SPLITS)
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ConfigError(f"{dataset}: num_frames must be >= 1, got {num_frames}")
    if dataset == "ivqa":
        names = [f"{split}.csv"]
    else:
        names = [f"{split}_qa.json"] + (["youtube_mapping.txt"] if dataset == "msvd_qa" else [])
    paths = find_files(dataset, src, names, subdirs=QA_SUBDIRS[dataset])
    root = media_root(src, videos)
    folders = [root / name for name in VIDEO_DIRS[dataset] if (root / name).is_dir()]
    if not folders:
        looked = ", ".join(str(root / name) for name in VIDEO_DIRS[dataset])
        raise MissingFilesError(f"{dataset}: missing the video folder (looked for {looked})")
    frames = lru_cache(maxsize=32)(video_members)  # consecutive questions share a video: decode it once
    if dataset == "ivqa":
        with open(paths[names[0]], encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return Source(_ivqa_items(dataset, split, rows, folders, num_frames, frames), len(rows))
    clip_names = _youtube_mapping(paths["youtube_mapping.txt"]) if dataset == "msvd_qa" else None
    rows = load_json(paths[names[0]])
    return Source(_qa_items(dataset, split, rows, clip_names, folders, num_frames, frames), len(rows))


def _youtube_mapping(path: Path) -> dict[int, str]:
    """``vid<N>`` -> clip name, from lines ``<youtubeid_start_end> vid<N>``."""
    mapping = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("vid") and parts[1][3:].isdigit():
            mapping[int(parts[1][3:])] = parts[0]
    return mapping


def _locate(folders: list[Path], names: list[str]) -> Path:
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise SkipRecord(MISSING_VIDEO, f"{names[0]} (looked in {', '.join(str(f) for f in folders)})")


def _qa_items(dataset, split, rows, clip_names, folders, num_frames, frames):
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Skip(f"row{position}", BAD_FIELD, "not a JSON object")
            continue
        record_id = str(row.get("id", f"row{position}"))
        problem = require(row, ["id", "question", "video_id", "answer"])
        if not problem and not isinstance(row["video_id"], int):
            problem = f"video_id {row['video_id']!r} is not an integer"
        if not problem and clip_names is not None and row["video_id"] not in clip_names:
            problem = f"vid{row['video_id']} is not in youtube_mapping.txt"
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        if clip_names is not None:
            video = clip_names[row["video_id"]]
            names = [f"{video}.avi"]
        else:
            video = f"video{row['video_id']}"
            names = [f"{video}.mp4"]
        record = Record(
            dataset=dataset,
            task="video_qa",
            id=record_id,
            split=split,
            image_id=video,
            question=row["question"],
            answers=[row["answer"]],
            num_frames=num_frames,
            extra={"category_id": row["category_id"]} if "category_id" in row else {},
        )
        yield Sample(record, lambda names=names: frames(_locate(folders, names), num_frames))


def _seconds(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _ivqa_items(dataset, split, rows, folders, num_frames, frames):
    for position, row in enumerate(rows):
        record_id = f"{position:06d}"
        answers = [row[f"answer{k}"] for k in range(1, 6) if row.get(f"answer{k}")]
        problem = require(row, ["video_id", "question"]) or (None if answers else "no answer1..answer5")
        if not problem and (row.get("question") or "").strip() == "":
            problem = "empty question"
        if problem:
            yield Skip(record_id, BAD_FIELD, problem)
            continue
        start, end = _seconds(row.get("start")), _seconds(row.get("end"))
        clip = f"{row['video_id']}_{row.get('start')}_{row.get('end')}"
        record = Record(
            dataset=dataset,
            task="video_qa",
            id=record_id,
            split=split,
            image_id=row["video_id"],
            question=row["question"],
            answers=answers,
            num_frames=num_frames,
            extra={"start": start, "end": end},
        )
        yield Sample(record, lambda clip=clip, row=row, start=start, end=end: _ivqa_frames(
            folders, clip, row["video_id"], start, end, num_frames, frames))


def _ivqa_frames(folders, clip, video_id, start, end, num_frames, frames):
    """The clip ``<video_id>_<start>_<end>.<ext>`` (or any ``<video_id>_*`` clip: one clip per video in iVQA),
    sampled whole; else the full ``<video_id>.<ext>``, sampled within [start, end]."""
    names = [clip + suffix for suffix in IVQA_SUFFIXES]
    for folder in folders:
        clips = [folder / name for name in names if (folder / name).is_file()]
        clips += sorted(p for p in folder.glob(f"{video_id}_*") if p.suffix in IVQA_SUFFIXES)
        if clips:
            return frames(clips[0], num_frames)
    return frames(_locate(folders, [video_id + suffix for suffix in IVQA_SUFFIXES]), num_frames, start, end)
