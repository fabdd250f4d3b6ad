"""The shortened demo (small world, a few steps per stage) end to end: every stage, the report, the plots, and
the final checkpoint answering through instructblip-generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructblip.testing import import_script

REPO = Path(__file__).resolve().parents[2]


def _run_demo(out: Path):
    from instructblip.demo import Demo, DemoSettings

    return Demo(DemoSettings.from_args(["quick=true", f"out={out}", "progress=false"])).run()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    _run_demo(out)   # in-process: the stages share one import of torch/transformers/lightning
    return out


@pytest.mark.slow
def test_every_stage_writes_its_output_and_the_report(demo_dir):
    for path in ("vision/trunk.safetensors", "llm/config.json", "llm/tokenizer.json", "base/config.json",
                 "stage1/trainable.safetensors", "stage2/trainable.safetensors", "instruct/hf/config.json",
                 "report.md", "report.json", "losses.png", "held_in.png", "held_out.png"):
        assert (demo_dir / path).exists(), path
    report = json.loads((demo_dir / "report.json").read_text())
    from instructblip.shapesworld import tasks

    for model in ("blip2", "instructblip"):
        assert set(report["results"][model]) == set(tasks.TASKS)
        for name, result in report["results"][model].items():
            assert 0.0 <= result["score"] <= 100.0 and result["n"] == 4, (model, name)
    for name in tasks.HELD_OUT:
        assert report["chance"][name] is not None and 0 < report["chance"][name] <= 100
        assert report["chance_sd"][name] > 0
    for model in ("blip2", "instructblip"):   # every held-out task's margin, in points and in chance's sds
        summary = report["summary"][model]
        assert set(summary["held_out_margin_sd"]) == set(summary["held_out_above_chance"]) == set(tasks.HELD_OUT)
        for name, points in summary["held_out_above_chance"].items():
            assert summary["held_out_margin_sd"][name] == pytest.approx(points / report["chance_sd"][name])
    text = (demo_dir / "report.md").read_text()
    assert "Held-out datasets" in text and "BLIP-2 (stage 2, zero-shot)" in text and "CPU time (s)" in text
    assert "clearly above (by 3 sd)" in text
    # question generation is scored against the question it should have generated, not the answer it was given
    qg = (demo_dir / "eval" / "instructblip" / "predictions" / "shapesworld_qg.jsonl").read_text().splitlines()
    assert qg and all(json.loads(line)["references"][0].endswith("?") for line in qg)


@pytest.mark.slow
def test_stage1_draws_the_fresh_cross_attention_at_the_configured_std(demo_dir, tmp_path):
    """stage.module.cross_attention_init_std / cross_attention_value_init_std reach the stage-1 Q-Former's fresh
    cross-attention through Hydra; left null, it is drawn at BERT's 0.02 like every other new weight."""
    from instructblip.demo import Demo, DemoSettings, compose_train
    from instructblip.train.run import build

    demo = Demo(DemoSettings(out=str(demo_dir), quick=True, progress=False))

    def cross_attention_stds(*overrides):
        cfg = compose_train(demo.train_overrides("shapesworld_stage1", tmp_path, 1, None) + list(overrides), tmp_path)
        model = build(cfg)[0].model_factory()   # what the module builds in configure_model
        layer = next(layer for layer in model.qformer.layers if layer.cross_attention is not None)
        return {name: getattr(layer.cross_attention, name).weight.std().item()
                for name in ("query", "key", "value", "out_proj")}

    plain = cross_attention_stds()
    assert all(std == pytest.approx(0.02, rel=0.1) for std in plain.values()), plain
    drawn = cross_attention_stds("stage.module.cross_attention_init_std=0.16",
                                 "stage.module.cross_attention_value_init_std=0.05")
    assert drawn["query"] == pytest.approx(0.16, rel=0.1) and drawn["key"] == pytest.approx(0.16, rel=0.1), drawn
    assert drawn["value"] == pytest.approx(0.05, rel=0.1) and drawn["out_proj"] == pytest.approx(0.05, rel=0.1), drawn


@pytest.mark.slow
def test_a_second_run_skips_every_stage(demo_dir, capsys):
    capsys.readouterr()
    _run_demo(demo_dir)
    printed = capsys.readouterr().out
    for stage in ("data", "vision", "llm", "base", "stage1", "stage2", "instruct", "eval blip2", "eval instructblip"):
        assert f"[demo] {stage}: output exists, skipped" in printed


@pytest.mark.slow
def test_the_starting_checkpoint_does_not_depend_on_what_ran_before_it(demo_dir, tmp_path):
    """A demo resumed after its pretraining stages (a fresh process) starts from the same weights as one run in a
    single go: the new parameters are drawn from the seed, not from the process's random state."""
    import torch
    from safetensors.torch import load_file

    from instructblip.shapesworld.assemble import assemble

    parts = [demo_dir / "vision", demo_dir / "llm", demo_dir / "bert"]
    written = []
    for index, draws in enumerate((0, 1000)):
        torch.rand(draws)
        out = assemble(tmp_path / f"base{index}", *parts, num_query_tokens=2, seed=0)
        written.append(load_file(str(next(out.glob("*.safetensors")))))
    assert written[0].keys() == written[1].keys()
    assert all(torch.equal(written[0][key], written[1][key]) for key in written[0])
    other_seed = load_file(str(next(assemble(tmp_path / "base_seed1", *parts, num_query_tokens=2, seed=1)
                                    .glob("*.safetensors"))))
    assert not all(torch.equal(written[0][key], other_seed[key]) for key in written[0])


@pytest.mark.slow
def test_the_final_checkpoint_answers_through_instructblip_generate(demo_dir, tmp_path):
    from instructblip.shapesworld import tasks

    _, image, _ = tasks.build("shapesworld_vqa", "val", 0, seed=0)
    image.save(tmp_path / "scene.png")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "instructblip-generate"), f"checkpoint={demo_dir / 'instruct' / 'hf'}",
         f"image={tmp_path / 'scene.png'}", "prompt=what color is the circle?", "max_new_tokens=4", "num_beams=1"],
        cwd=REPO, check=True, timeout=300, capture_output=True, text=True)
    assert result.stdout.strip(), result.stderr


@pytest.mark.slow
def test_demo_variant_reruns_the_last_stages_under_other_settings(demo_dir):
    """experiments/demo_variant.py on the quick demo: stage 2 on the scenes' descriptions and instruction tuning with
    a Hydra override, then the run's own evaluation sizes."""
    import tarfile

    from instructblip.shapesworld import tasks, world

    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "demo_variant.py"), str(demo_dir), "try", "--captions", "describe",
         "--instruct", "stage.module.loss_weighting=sample"],
        cwd=REPO, check=True, timeout=600, capture_output=True, text=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tag"] == "try"
    assert set(summary["scores"]) == {name.removeprefix("shapesworld_") for name in tasks.TASKS}
    results = json.loads((demo_dir / "eval" / "try" / "results.json").read_text())
    assert {r["n"] for r in results.values()} == {4}   # the quick run's evaluation sizes, read from its report

    shards = sorted((demo_dir / "data_describe").glob("shapesworld_caption-train-*.tar"))
    assert shards
    records = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    scene = world.Scene.from_dict(record["extra"]["scene"])
                    assert record["answers"] == [world.describe(scene)]
                    records += 1
    assert records > 0
    stage2_config = next((demo_dir / "stage2_try").rglob("hparams.yaml")).read_text()
    instruct_config = next((demo_dir / "instruct_try").rglob("hparams.yaml")).read_text()
    assert "data_describe" in stage2_config and "data_describe" not in instruct_config
    assert "loss_weighting: sample" in instruct_config and "loss_weighting: token" in stage2_config


def test_qformer_probe_trains_the_runs_qformer_on_trunk_and_oracle_features(demo_dir, tmp_path):
    """experiments/shapesworld_qformer_probe.py on the quick demo: a curve per setting, the question-only prior, and
    oracle rows that hold the scene's attributes in their cells."""
    probe = import_script("experiments", "shapesworld_qformer_probe")
    from instructblip.shapesworld import tasks, world

    record, _, _ = tasks.build("shapesworld_vqa", "train", 3, seed=0)
    scene = world.Scene.from_dict(record.extra["scene"])
    rows = probe.oracle_features(scene, 96)
    assert rows[0].abs().sum() == 0    # the class token
    for shape in scene.shapes:
        row = rows[1 + shape.cell[0] * world.GRID + shape.cell[1]]
        assert row[list(world.COLORS).index(shape.color)] > 0 and row[6 + world.SHAPES.index(shape.kind)] > 0
        assert int((row > 0).sum()) == 4   # colour, kind, size, cell
    assert probe.question_prior({"questions": ["a", "a", "a", "b"], "answers": ["x", "x", "y", "z"]},
                                {"questions": ["a", "b", "c"], "answers": ["x", "y", "x"]}) == 100 / 3
    import torch

    torch.manual_seed(0)
    skewed = torch.randn(40, 10, 6) @ torch.randn(6, 6) + 3.0   # correlated columns, off-centre
    train_white, val_white = probe.whitened(skewed, skewed[:5])
    flat = train_white.reshape(-1, 6)
    assert torch.allclose(flat.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(torch.cov(flat.T), torch.eye(6), atol=1e-3)
    assert torch.allclose(val_white, train_white[:5])   # the val split goes through the train split's map

    for features in ("trunk", "oracle"):
        out = tmp_path / f"{features}.json"
        result = subprocess.run(
            [sys.executable, str(REPO / "experiments" / "shapesworld_qformer_probe.py"), str(demo_dir),
             f"features={features}", "steps=6", "train=48", "val=24", "eval_every=3", "batch_size=8", f"out={out}"],
            cwd=REPO, check=True, timeout=600, capture_output=True, text=True)
        written = json.loads(out.read_text())
        assert json.loads(result.stdout.strip().splitlines()[-1])["final"] == written["curve"][-1]
        assert [row["step"] for row in written["curve"]] == [0, 3, 6]
        assert set(written["curve"][-1]["by_question"]) <= set(tasks.QUESTION_KINDS)
        assert 0 <= written["question_only_prior"] <= 100
    bad = subprocess.run([sys.executable, str(REPO / "experiments" / "shapesworld_qformer_probe.py"), str(demo_dir),
                          "features=pixels"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "allowed: trunk, oracle" in bad.stderr


def test_llm_ceiling_ranks_the_true_false_tasks_as_the_runner_does(demo_dir):
    """experiments/shapesworld_llm.py's rank scores on the quick demo's LLM: an LLM made to prefer the second
    candidate ("true", "yes") everywhere scores the share of label-1 statements and a binary AUC of 50 (all ties),
    so the candidates are read as [label 0, label 1]; the plain LLM's scores are proportions of the samples."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    shapesworld_llm = import_script("experiments", "shapesworld_llm")
    from instructblip.shapesworld import tasks

    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir / "llm"))
    model = LlamaForCausalLM.from_pretrained(str(demo_dir / "llm")).eval()
    samples = 12
    positive = {tokenizer(tasks.SPATIAL_VERBALIZER[1], add_special_tokens=False)["input_ids"][0],
                tokenizer(tasks.BINARY_VERBALIZER[1], add_special_tokens=False)["input_ids"][0]}

    class PrefersLabelOne(torch.nn.Module):   # the same logits after every prefix: label 1's verbaliser above all
        config = model.config
        lengths: list[int] = []   # each call's row length: scene positions + prompt + candidate

        def get_input_embeddings(self):
            return model.get_input_embeddings()

        def forward(self, **inputs):
            self.lengths.append(inputs["inputs_embeds"].shape[1])
            out = model(**inputs)
            out.logits = torch.zeros_like(out.logits)
            out.logits[..., sorted(positive)] = 5.0
            return out

    true_share = 100 * sum(tasks.build("shapesworld_spatial", "test", i, 0)[0].label for i in range(samples)) / samples
    assert shapesworld_llm.ranked(PrefersLabelOne(), tokenizer, "shapesworld_spatial", samples) == true_share
    assert shapesworld_llm.ranked(PrefersLabelOne(), tokenizer, "shapesworld_binary", samples) == 50.0
    # pooled: the same rows with the scene one position per object (sentence) instead of one per token
    PrefersLabelOne.lengths = []
    pooled_share = shapesworld_llm.ranked(PrefersLabelOne(), tokenizer, "shapesworld_spatial", samples, pooled=True)
    assert pooled_share == true_share
    pooled_lengths, PrefersLabelOne.lengths = PrefersLabelOne.lengths, []
    shapesworld_llm.ranked(PrefersLabelOne(), tokenizer, "shapesworld_spatial", samples)
    contexts = [tasks.build("shapesworld_spatial", "test", i, 0)[2] for i in range(samples)]
    saved = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) - len([p for p in c.split(".") if p.strip()])
             for c in contexts]
    assert [a - b for a, b in zip(PrefersLabelOne.lengths, pooled_lengths)] == saved
    assert all(n > 0 for n in saved)
    # focused: the named shape's text alone (one shape per scene, no written word): shorter where a word is written
    whole_lengths, PrefersLabelOne.lengths = PrefersLabelOne.lengths, []
    focused_share = shapesworld_llm.ranked(PrefersLabelOne(), tokenizer, "shapesworld_spatial", samples, focused=True)
    assert focused_share == true_share
    shorter = [whole - focused for whole, focused in zip(whole_lengths, PrefersLabelOne.lengths)]
    assert all(n >= 0 for n in shorter)
    assert [n > 0 for n in shorter] == ["word" in c.split() for c in contexts]
    scores = {name: shapesworld_llm.ranked(model, tokenizer, name, samples) for name in shapesworld_llm.RANKED}
    assert all(0.0 <= score <= 100.0 for score in scores.values())
    right = scores["shapesworld_spatial"] * samples / 100
    assert abs(right - round(right)) < 1e-9   # a count of the samples


def test_query_word_probe_compares_the_quick_demos_queries_with_the_named_shapes_words(demo_dir):
    """experiments/query_word_probe.py on the quick demo's final checkpoint: one row per statement for the colour
    and kind, one per side the named shape lies along, cosines and shares in range."""
    probe = import_script("experiments", "query_word_probe")
    from instructblip.shapesworld import tasks, world

    samples = 12
    result = probe.probe(str(demo_dir / "instruct" / "hf"), samples)
    expected_sides = 0
    for index in range(samples):
        record, _, _ = tasks.build("shapesworld_spatial", "test", index, 0)
        _, color, kind = record.text.split()[:3]
        scene = world.Scene.from_dict(record.extra["scene"])
        shape = next(s for s in scene.shapes if (s.color, s.kind) == (color, kind))
        expected_sides += len(world.sides(shape))
    assert result["n"]["colour"] == result["n"]["kind"] == samples
    assert result["n"]["side"] == result["n"]["side above the opposite side"] == expected_sides > 0
    for key in ("colour", "other colours (mean)", "kind", "other kinds (mean)", "side", "opposite side"):
        assert -1 <= result[key] <= 1
    for key in ("colour above every other colour", "side above the opposite side",
                "column from the mean query, linear probe, held-out accuracy"):
        assert 0 <= result[key] <= 1
