"""Video QA converters (MSVD-QA, MSRVTT-QA, iVQA): frames sampled uniformly at prep time, stored as JPEG."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from conftest import check, convert, garbage, grey_video, write_json
from data_prep.media import BAD_FIELD, MISSING_VIDEO, UNREADABLE_VIDEO, uniform_indices
from data_prep.sources import MissingFilesError
from instructblip.errors import ConfigError


def _levels(media: dict[str, bytes]) -> list[float]:
    names = sorted(media, key=lambda name: int(name[len("frame"):-len(".jpg")]))
    assert names == [f"frame{i}.jpg" for i in range(len(names))]
    return [float(np.asarray(Image.open(io.BytesIO(media[name])).convert("L")).mean()) for name in names]


def test_uniform_indices_are_segment_centres():
    assert uniform_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]  # shorter than num_frames: frames repeat


def test_msvd_qa_maps_video_ids_through_youtube_mapping(src, out):
    levels = grey_video(src / "YouTubeClips/-4wsuPCjDBc_5_15.avi")
    garbage(src / "YouTubeClips/broken_1_2.avi")
    (src / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nbroken_1_2 vid2\ngone_0_1 vid3\n")
    write_json(src / "test_qa.json", [
        {"answer": "cat", "id": 0, "question": "what is playing?", "video_id": 1},
        {"answer": "piano", "id": 1, "question": "what does the cat play?", "video_id": 1},
        {"answer": "x", "id": 2, "question": "q?", "video_id": 2},
        {"answer": "x", "id": 3, "question": "q?", "video_id": 3},
        {"answer": "x", "id": 4, "question": "q?", "video_id": 4},  # not in the mapping
        {"id": 5, "question": "q?", "video_id": 1},
    ])
    convert("msvd_qa", src, out)  # registry default: test, 4 frames
    common = {"task": "video_qa", "image_id": "-4wsuPCjDBc_5_15", "num_frames": 4}
    samples = check(out, "msvd_qa", "test", {
        "0": {**common, "question": "what is playing?", "answers": ["cat"]},
        "1": {**common, "question": "what does the cat play?", "answers": ["piano"]},
    }, {"2": UNREADABLE_VIDEO, "3": MISSING_VIDEO, "4": BAD_FIELD, "5": BAD_FIELD})
    expected = [levels[i] for i in uniform_indices(len(levels), 4)]
    for record_id in ("0", "1"):
        assert np.allclose(_levels(samples[record_id][1]), expected, atol=10)


def test_msrvtt_qa_num_frames_option(src, out):
    levels = grey_video(src / "video/video7010.mp4", num_frames=12)
    write_json(src / "test_qa.json", [
        {"answer": "man", "category_id": 3, "id": 10, "question": "who is talking?", "video_id": 7010},
        {"answer": "x", "category_id": 3, "id": 11, "question": "q?", "video_id": 7011},
    ])
    convert("msrvtt_qa", src, out, split="test", num_frames=3)
    samples = check(out, "msrvtt_qa", "test", {"10": {
        "task": "video_qa", "image_id": "video7010", "question": "who is talking?", "answers": ["man"],
        "num_frames": 3}}, {"11": MISSING_VIDEO})
    assert samples["10"][0].extra == {"category_id": 3}
    assert np.allclose(_levels(samples["10"][1]), [levels[i] for i in uniform_indices(12, 3)], atol=10)


def test_ivqa_five_answers_clips_and_time_windows(src, out):
    clip_levels = grey_video(src / "video/abcdefghijk_3_9.mp4")
    full_levels = grey_video(src / "video/zyxwvutsrqp.mp4")  # 10 frames at 10 fps: 0.0 .. 0.9 s
    columns = ["video_id", "start", "end", "question", "answer1", "answer2", "answer3", "answer4", "answer5"]
    rows = [
        ["abcdefghijk", "3", "9", "what is the man cooking?", "pasta", "pasta", "noodles", "pasta", "spaghetti"],
        ["zyxwvutsrqp", "0.5", "0.9", "what is in the bowl?", "soup", "soup", "", "broth", "soup"],
        ["missingclip", "1", "2", "q?", "a", "a", "a", "a", "a"],
        ["abcdefghijk", "3", "9", "no answers?", "", "", "", "", ""],
    ]
    (src / "test.csv").parent.mkdir(exist_ok=True)
    with open(src / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    convert("ivqa", src, out)  # registry default: test
    samples = check(out, "ivqa", "test", {
        "000000": {"task": "video_qa", "image_id": "abcdefghijk", "question": "what is the man cooking?",
                   "answers": ["pasta", "pasta", "noodles", "pasta", "spaghetti"], "num_frames": 4},
        "000001": {"task": "video_qa", "image_id": "zyxwvutsrqp", "question": "what is in the bowl?",
                   "answers": ["soup", "soup", "broth", "soup"], "num_frames": 4},
    }, {"000002": MISSING_VIDEO, "000003": BAD_FIELD})
    assert np.allclose(_levels(samples["000000"][1]), [clip_levels[i] for i in uniform_indices(10, 4)], atol=10)
    window = full_levels[5:10]  # only [0.5, 0.9] s of the full video
    assert np.allclose(_levels(samples["000001"][1]), [window[i] for i in uniform_indices(5, 4)], atol=10)


def test_missing_files_and_video_folder_are_named(src, out):
    with pytest.raises(MissingFilesError, match=r"msvd_qa: missing test_qa.json, youtube_mapping.txt \(looked in"):
        convert("msvd_qa", src, out)
    write_json(src / "MSVD-QA/test_qa.json", [])
    (src / "MSVD-QA/youtube_mapping.txt").write_text("")
    with pytest.raises(MissingFilesError, match=r"msvd_qa: missing the video folder \(looked for .*YouTubeClips"):
        convert("msvd_qa", src, out)
    with pytest.raises(ConfigError, match="num_frames must be >= 1"):
        convert("msvd_qa", src, out, num_frames=0)
    assert not out.exists()
