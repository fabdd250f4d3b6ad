"""The held-out runner end to end on tiny shards of several held-out datasets with a tiny random model: through
``instructblip-eval`` (Hydra, in this process), then a resumed run that must reproduce the same predictions."""

import json
import sys

import pytest

from instructblip.cli import eval as eval_cli
from instructblip.data import registry
from instructblip.eval.paper_results import PAPER_ZERO_SHOT, guess_paper_model
from instructblip.eval.predictions import score_file
from instructblip.eval.runner import Benchmark, evaluate_benchmark, load_predictions

GENERATION = "generation.short={num_beams:1,max_new_tokens:3,min_new_tokens:1}"
BATCH_SIZE = 2


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, eval_shards, tiny_checkpoint, fixture_datasets):
    """One uninterrupted instructblip-eval run over every fixture dataset, with the W&B logger (offline)."""
    run_dir = tmp_path_factory.mktemp("eval_run")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", [
        "instructblip-eval", f"checkpoint={tiny_checkpoint}", f"shards={eval_shards}",
        f"benchmarks=[{','.join(fixture_datasets[0])}]", f"hydra.run.dir={run_dir}", f"output_dir={run_dir}",
        f"batch_size={BATCH_SIZE}", GENERATION, "generation.long={num_beams:2,max_new_tokens:4,min_new_tokens:2}",
        "paper_model=vicuna7b", "logger=wandb", "progress=false",
    ])
    try:
        eval_cli.main()
    finally:
        monkeypatch.undo()
    return run_dir


def test_end_to_end_writes_predictions_results_and_wandb(full_run, fixture_datasets):
    datasets, samples_per_dataset = fixture_datasets
    results = json.loads((full_run / "results.json").read_text())
    assert list(results["benchmarks"]) == list(datasets)
    for name, entry in results["benchmarks"].items():
        info = registry.get(name)
        lines = load_predictions(full_run / "predictions" / f"{name}.jsonl")
        assert sorted(line["id"] for line in lines) == [f"{name}_{i:03d}" for i in range(samples_per_dataset)]
        assert entry["metric"] == info.metric and entry["split"] == info.eval_split
        assert entry["paper"] == PAPER_ZERO_SHOT["vicuna7b"][name]
        # the predictions file scores the same through instructblip-score's path
        rescored = score_file(info.metric, full_run / "predictions" / f"{name}.jsonl",
                              **({"rule": "textvqa"} if name == "textvqa" else {}))
        assert entry["score"] == pytest.approx(rescored.score) and entry["n"] == rescored.n
    # the method each registry entry names, visible in the lines
    visdial = load_predictions(full_run / "predictions" / "visdial.jsonl")
    assert all(len(line["scores"]) == 5 and "gt_index" in line for line in visdial)
    assert set(results["benchmarks"]["visdial"]["extra"]) == {"recall_at_1", "recall_at_5", "recall_at_10",
                                                              "mean_rank", "ndcg"}
    memes = load_predictions(full_run / "predictions" / "hateful_memes.jsonl")
    assert all(isinstance(line["score"], float) and line["prediction"] in ("yes", "true", "no", "false")
               and (line["score"] > 0) == (line["prediction"] in ("yes", "true")) for line in memes)
    science = load_predictions(full_run / "predictions" / "scienceqa.jsonl")
    assert all(line["prediction"] in ("frog", "whale", "trout") and line["references"] == ["whale"]
               for line in science)
    assert "Context: Mammals feed milk." in science[1]["prompt"] and "Context" not in science[0]["prompt"]
    video = load_predictions(full_run / "predictions" / "msvd_qa.jsonl")
    assert {line["prediction"] for line in video} <= {"eat", "run", "swim"}  # the split's answer vocabulary
    table = (full_run / "results.md").read_text()
    assert "InstructBLIP (Vicuna-7B)" in table and "| gqa | testdev_balanced | accuracy | 6 |" in table
    assert list((full_run / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("name, layout", [("gqa", "cut"), ("visdial", "cut"), ("gqa", "parts")])
def test_resumed_run_gives_the_same_predictions(full_run, eval_shards, tiny_checkpoint, fixture_datasets, tmp_path,
                                               name, layout):
    from instructblip.model.instructblip import InstructBlip

    reference = (full_run / "predictions" / f"{name}.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "predictions").mkdir()
    if layout == "cut":
        # killed after two batches, in the middle of writing the first line of the next one
        partial = "".join(reference[: 2 * BATCH_SIZE]) + reference[2 * BATCH_SIZE][:25]
        (tmp_path / "predictions" / f"{name}.jsonl").write_text(partial)
    else:
        # a killed 2-process run left two parts (rank 1's cut mid-line); this single process finishes the job
        (tmp_path / "predictions" / f"{name}.rank0.jsonl").write_text("".join(reference[:2]))
        (tmp_path / "predictions" / f"{name}.rank1.jsonl").write_text(reference[3] + reference[4][:10])
    model = InstructBlip.from_pretrained(tiny_checkpoint).eval()
    result = evaluate_benchmark(model, Benchmark(registry.get(name), {"num_beams": 1, "max_new_tokens": 3,
                                                                      "min_new_tokens": 1}),
                                eval_shards, tmp_path, batch_size=BATCH_SIZE, progress=False)
    assert list((tmp_path / "predictions").glob("*.rank*.jsonl")) == []  # parts merged
    resumed = sorted(load_predictions(tmp_path / "predictions" / f"{name}.jsonl"), key=lambda line: line["id"])
    expected = [json.loads(line) for line in reference]
    assert [line["id"] for line in resumed] == [line["id"] for line in expected]
    assert [line["prediction"] for line in resumed] == [line["prediction"] for line in expected]
    for got, want in zip(resumed, expected):
        assert got.get("scores") == pytest.approx(want.get("scores"), abs=1e-4)
    full = json.loads((full_run / "results.json").read_text())["benchmarks"][name]
    assert result.score == pytest.approx(full["score"]) and result.n == fixture_datasets[1]


def test_bad_settings_fail_with_one_line(run_app, eval_shards, tiny_checkpoint, fixture_datasets, tmp_path):
    common = [f"hydra.run.dir={tmp_path}", f"output_dir={tmp_path}", f"shards={eval_shards}", "progress=false"]
    code, _, err = run_app(eval_cli.main, "instructblip-eval", *common, f"checkpoint={tiny_checkpoint}", "benchmarks=[coco_gqa]")
    assert code == 2 and "unknown dataset 'coco_gqa'; known datasets:" in err
    code, _, err = run_app(eval_cli.main, "instructblip-eval", *common)
    assert code == 2 and "checkpoint= is required" in err
    code, _, err = run_app(eval_cli.main, "instructblip-eval", *common, f"checkpoint={tiny_checkpoint}", "benchmarks=[ivqa]")
    assert code == 2 and "no shards for ivqa split 'test'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_app(eval_cli.main, "instructblip-eval", *common, f"checkpoint={tiny_checkpoint}", "paper_model=gpt4")
    assert code == 2 and "paper_model='gpt4'; allowed: flant5xl" in err
    code, _, err = run_app(eval_cli.main, "instructblip-eval", *common, f"checkpoint={tiny_checkpoint}",
                           f"benchmarks=[{next(iter(fixture_datasets[0]))}]", "decoding.step=graphed",
                           "decoding.cache=static", "device=cpu")
    assert code == 2 and "decoding.step=graphed needs a CUDA device (device=cpu); decoding.step=fixed" in err
    code, _, err = run_app(eval_cli.main, "instructblip-eval", *common, f"checkpoint={tiny_checkpoint}",
                           f"benchmarks=[{next(iter(fixture_datasets[0]))}]", "decoding.cache=paged")
    assert code == 2 and "decoding.cache='paged'; allowed: dynamic, static" in err


def test_decoding_options_reach_the_model_and_keep_its_predictions(full_run, eval_shards, tiny_checkpoint,
                                                                   fixture_datasets, tmp_path, monkeypatch):
    """decoding={cache: static, step: fixed} (the eager form of the graphed greedy step): the same greedy answers
    as the default loop, through instructblip-eval."""
    from instructblip.model import decoding

    name = next(n for n in fixture_datasets[0]
                if registry.get(n).method == "generate" and registry.get(n).answer_length == "short")
    used = []
    original = decoding._FixedStepGreedy.run

    def run(self, *args, **kwargs):
        used.append(self.key)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(decoding._FixedStepGreedy, "run", run)
    monkeypatch.setattr(sys, "argv", [
        "instructblip-eval", f"checkpoint={tiny_checkpoint}", f"shards={eval_shards}", f"benchmarks=[{name}]",
        f"hydra.run.dir={tmp_path}", f"output_dir={tmp_path}", f"batch_size={BATCH_SIZE}", GENERATION,
        "paper_model=vicuna7b", "progress=false", "decoding={cache: static, step: fixed}",
    ])
    eval_cli.main()
    assert used, "the fixed decode step did not run"
    ours = sorted(load_predictions(tmp_path / "predictions" / f"{name}.jsonl"), key=lambda line: line["id"])
    reference = sorted(load_predictions(full_run / "predictions" / f"{name}.jsonl"), key=lambda line: line["id"])
    assert [line["prediction"] for line in ours] == [line["prediction"] for line in reference]


def test_paper_model_is_guessed_from_checkpoint_names():
    assert guess_paper_model("Salesforce/instructblip-flan-t5-xxl") == "flant5xxl"
    assert guess_paper_model("/ckpt/instructblip-flan-t5-xl") == "flant5xl"
    assert guess_paper_model("instruct_vicuna7b.pth") == "vicuna7b"
    assert guess_paper_model("/tmp/tiny/llama") is None


def test_shapesworld_held_out_datasets_run_through_the_same_runner(tmp_path, tiny_checkpoint):
    from data_prep.shapesworld import convert
    from instructblip.model.instructblip import InstructBlip

    import instructblip.shapesworld.tasks  # noqa: F401  registers the ShapesWorld datasets

    names = [name for name, info in registry.DATASETS.items() if info.world == "shapesworld" and info.held_out]
    assert len(names) >= 6
    for name in names:
        convert(None, tmp_path / "shards", "test", 3, dataset=name, n=6, progress=False)
    model = InstructBlip.from_pretrained(tiny_checkpoint).eval()
    for name in names:
        info = registry.get(name)
        result = evaluate_benchmark(model, Benchmark(info, {"num_beams": 1, "max_new_tokens": 3}),
                                    tmp_path / "shards", tmp_path / "out", batch_size=3, progress=False)
        lines = load_predictions(tmp_path / "out" / "predictions" / f"{name}.jsonl")
        assert result.n == len(lines) == 6 and 0.0 <= result.score <= 100.0, name
        if info.task == "classification" and info.method == "rank":
            # verbalisers from the record's candidates ([negative, positive]); the score's sign picks the side
            assert all((line["score"] > 0) == (line["prediction"] in ("yes", "true")) for line in lines)
            assert all(line["prediction"] in ("yes", "no", "true", "false") for line in lines)
