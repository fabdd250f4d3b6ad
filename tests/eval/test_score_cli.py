"""instructblip-score on files of each line format, as a subprocess once and in-process (Hydra's own main)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructblip.cli import score

SCORE_BIN = Path(sys.executable).with_name("instructblip-score")


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_subprocess_last_line_is_the_json_result(tmp_path):
    path = write_jsonl(tmp_path / "vqa.jsonl", [
        {"id": 1, "prediction": "Two", "references": ["2"] * 10},
        {"id": 2, "prediction": "red", "references": ["red"] + ["blue"] * 9},
    ])
    done = subprocess.run([str(SCORE_BIN), "metric=vqa_accuracy", "rule=lavis", f"predictions={path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"metric": "vqa_accuracy", "score": pytest.approx(65.0), "n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqa.jsonl"]  # no Hydra output directory



@pytest.mark.parametrize(
    "metric, rows, expected",
    [
        ("accuracy", [{"id": "a", "prediction": "Bedroom.", "references": ["bedroom"]},
                      {"id": "b", "prediction": "kitchen", "references": ["bedroom"]}], 50.0),
        ("ivqa_accuracy", [{"id": "a", "prediction": "dog", "references": ["dog", "cat", "cat", "x", "y"]}], 50.0),
        ("vqa_accuracy", [{"id": "a", "prediction": "Yes", "references": ["yes"] * 10}], 0.0),  # official rule
        ("mrr", [{"id": "r1", "scores": [0.1, 0.9, 0.5], "gt_index": 2},
                 {"id": "r2", "ranks": [1, 2, 3], "gt_index": 0}], 75.0),
        ("recall_at_1", [{"id": "r1", "scores": [0.1, 0.9, 0.5], "gt_index": 2}], 0.0),
        ("mean_rank", [{"id": "r1", "scores": [0.1, 0.9, 0.5], "gt_index": 0}], 3.0),
        ("ndcg", [{"id": "r1", "scores": [0.1, 0.9, 0.5], "relevance": [0, 1, 0]}], 100.0),
        ("auroc", [{"id": 1, "score": 0.2, "label": 0}, {"id": 2, "score": -1.5, "label": 1},
                   {"id": 3, "score": 3.0, "label": 1}], 50.0),
        ("cider", [{"id": "img1", "prediction": "a dog runs", "references": ["a dog runs"]},
                   {"id": "img2", "prediction": "a cat", "references": ["a cat sits"]}], None),
    ],
)
def test_each_line_format(tmp_path, run_app, metric, rows, expected):
    path = write_jsonl(tmp_path / "p.jsonl", rows + [rows[0]])  # a repeated id is dropped
    code, out, err = run_app(score.main, "instructblip-score", f"metric={metric}", f"predictions={path}")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["metric"] == metric and result["n"] == len(rows)
    if expected is not None:
        assert result["score"] == pytest.approx(expected)
    else:
        assert result["score"] > 0


@pytest.mark.parametrize(
    "metric, content, message",
    [
        ("accuracy", "", "the predictions file is empty"),
        ("accuracy", '{"id": 1, "prediction": "x"}\n', 'p.jsonl:1: missing field "references"'),
        ("accuracy", '{"id": 1, "prediction": "x", "references": ["x"]}\n\n{"id": 2, "prediction": 5, '
                     '"references": ["x"]}\n', 'p.jsonl:3: field "prediction" must be a string, got int'),
        ("accuracy", '[1, 2]\n', "p.jsonl:1: a line must be a JSON object, got list"),
        ("vqa_accuracy", '{"id": 1, "prediction": "x", "references": "x"}\n',
         'p.jsonl:1: field "references" must be a list of strings'),
        ("auroc", '{"id": 1, "score": "high", "label": 1}\n', 'p.jsonl:1: field "score" must be a finite number'),
        ("auroc", '{"id": 1, "score": 0.3, "label": 1}\n', "needs both labels 0 and 1"),
        ("ndcg", '{"id": 1, "scores": [1, 2], "gt_index": 0}\n', "no line carries what metric ndcg scores"),
        ("mrr", '{"id": 1, "ranks": [1, 1], "gt_index": 0}\n', 'field "ranks" must be a permutation of 1..2'),
        ("accuracy", '{"id": 1, "prediction": "x", "references": ["x"]}\n{oops\n', "p.jsonl:2: invalid JSON"),
        ("bleu", '{"id": 1}\n', "unknown metric 'bleu'; known metrics: vqa_accuracy, cider, accuracy"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path, run_app, metric, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    code, out, err = run_app(score.main, "instructblip-score", f"metric={metric}", f"predictions={path}")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_missing_file_and_missing_keys(tmp_path, run_app):
    code, _, err = run_app(score.main, "instructblip-score", "metric=cider", f"predictions={tmp_path / 'nope.jsonl'}")
    assert code == 2 and "nope.jsonl: no such predictions file" in err
    code, _, err = run_app(score.main, "instructblip-score", "metric=cider")
    assert code == 2 and "predictions= is required" in err
    code, _, err = run_app(score.main, "instructblip-score", "metric=cider", "predictions=x.jsonl", "k=5")
    assert code == 2 and "unknown setting 'k'; allowed: metric, predictions, rule, normalize" in err
