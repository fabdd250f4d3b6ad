"""Every ShapesWorld experiment composes with the project's config tree and says what it trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructblip.demo import compose_train
from instructblip.shapesworld import tasks

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("shapesworld*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", "logger=none"], tmp_path)
    assert cfg.model.name == "shapesworld"
    assert cfg.data.augment is False, "random crops and flips would change positions and left/right answers"
    datasets = set(cfg.data.datasets)
    if cfg.stage.name in ("blip2_stage1", "blip2_stage2"):
        assert datasets == {"shapesworld_caption"}
    else:
        assert datasets == set(tasks.HELD_IN), "the instruction mixture is exactly the held-in datasets"
        assert not datasets & set(tasks.HELD_OUT)
    expected = {"shapesworld_instruct_no_instruction_aware": False, "shapesworld_stage2": False}
    if experiment in expected:
        assert cfg.model.overrides.instruction_aware is expected[experiment]
    if experiment == "shapesworld_instruct_proportional":
        assert cfg.data.sampling == "proportional"


def test_pretraining_recipes_build_their_configs():
    from omegaconf import OmegaConf

    from instructblip.shapesworld.language import LanguageConfig
    from instructblip.shapesworld.vision import VisionPretrainConfig

    VisionPretrainConfig(out="x", **OmegaConf.to_container(OmegaConf.load(CONF / "model" / "shapesworld_vision.yaml")))
    LanguageConfig(out="x", **OmegaConf.to_container(OmegaConf.load(CONF / "model" / "shapesworld_llm.yaml")))


def test_unknown_demo_setting_is_one_line_error():
    from instructblip.demo import DemoSettings

    with pytest.raises(SystemExit, match="unknown setting 'stepz=3'; allowed: out=..."):
        DemoSettings.from_args(["stepz=3"])
