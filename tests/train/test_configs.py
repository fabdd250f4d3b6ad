"""Every experiment composes and instantiates with the tiny model; one training step of every stage runs;
config errors are one line naming the key and the allowed values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import CONF, REPO, compose, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("shapesworld"))
STAGE_EXPERIMENTS = {  # one experiment per stage: the paper's recipes, shrunk to the tiny model
    "instruction_tuning": "instructblip_flant5xl",
    "blip2_stage2": "blip2_stage2_vicuna7b",
    "finetune": "finetune_okvqa",
    "blip2_stage1": "blip2_stage1",
}


def test_experiment_list_is_complete():
    expected = {"smoke", "instructblip_flant5xl", "instructblip_flant5xxl", "instructblip_vicuna7b",
                "instructblip_vicuna13b", "finetune_scienceqa", "finetune_ocr_vqa", "finetune_okvqa",
                "finetune_aokvqa", "ablation_no_instruction_aware", "ablation_no_balanced_sampling",
                "blip2_stage1", "blip2_stage2_flant5xl", "blip2_stage2_vicuna7b"}
    assert expected <= set(EXPERIMENTS)


def test_paper_recipes_carry_the_paper_values(tmp_path):
    for name, per_gpu in {"instructblip_flant5xl": 12, "instructblip_vicuna7b": 8, "instructblip_flant5xxl": 4,
                          "instructblip_vicuna13b": 4}.items():
        cfg = compose([f"experiment={name}"], tmp_path)
        total = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
        assert total == {"instructblip_flant5xl": 192, "instructblip_vicuna7b": 128}.get(name, 64)
        assert cfg.data.batch_size == per_gpu
        assert (cfg.trainer.max_steps, cfg.validation.every_n_steps) == (60000, 3000)
        assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, list(cfg.optimizer.betas)) == (1e-5, 0.05, [0.9, 0.999])
        assert (cfg.scheduler.warmup_steps, cfg.scheduler.warmup_lr, cfg.scheduler.min_lr) == (1000, 1e-8, 0.0)
        assert cfg.model.overrides.instruction_aware is True and cfg.data.sampling == "sqrt"
    assert compose(["experiment=ablation_no_instruction_aware"], tmp_path).model.overrides.instruction_aware is False
    assert compose(["experiment=ablation_no_balanced_sampling"], tmp_path).data.sampling == "proportional"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_instantiates_with_the_tiny_model(experiment, tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.run import build

    cfg = compose([f"experiment={experiment}", *tiny_overrides(tiny_checkpoint, generated_data)], tmp_path)
    module, datamodule, trainer = build(cfg)
    assert module.stage == cfg.stage.name
    assert trainer.max_steps == 1 and datamodule.batch_size == 2


@pytest.mark.parametrize("stage", sorted(STAGE_EXPERIMENTS))
def test_one_step_of_every_stage(stage, tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.run import build

    overrides = [f"experiment={STAGE_EXPERIMENTS[stage]}", *tiny_overrides(tiny_checkpoint, generated_data)]
    if stage == "blip2_stage1":
        overrides.append("data.datasets={coco_caption: %s/coco_caption/shard-*.tar}" % generated_data)
    cfg = compose(overrides, tmp_path)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    trained = dict(module.model.named_parameters())
    assert all(not trained[n].requires_grad for n in module.frozen_names)
    assert all(trained[n].requires_grad for n in module.trainable_names)
    assert any(n.startswith("qformer.") for n in module.trainable_names)
    assert not any(n.startswith(("llm.", "vision.trunk.")) for n in module.trainable_names)
    if stage == "blip2_stage2":
        assert module.model.config.instruction_aware is False
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)


def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    from instructblip.errors import ConfigError
    from instructblip.train.validate import check_config, check_overrides

    with pytest.raises(ConfigError, match=r"^model=vicuna9b: no such option; allowed: .*instructblip_vicuna7b"):
        check_overrides(["model=vicuna9b"])
    with pytest.raises(ConfigError, match=r"^trainer=tpu: no such option; allowed: cpu, ddp, ddp_cpu, fsdp, gpu$"):
        check_overrides(["trainer=tpu"])
    cases = {
        ("trainer.max_steps=ten",): r"trainer.max_steps='ten' \(str\); expected an integer > 0",
        ("data.sampling=balanced",): r"data.sampling='balanced'.*sqrt, proportional, uniform, explicit",
        ("stage=blip2_stage2", "model.overrides.instruction_aware=true"):
            r"instruction_aware=true is impossible with stage=blip2_stage2.*allowed: false",
        ("optimizer.lr=-1",): r"optimizer.lr=-1 \(int\); expected a number > 0",
        ("stage.module.qformer_autocast=float16",):
            r"stage.module.qformer_autocast='float16' \(str\); expected null, bfloat16",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            check_config(compose(list(overrides), tmp_path))
        assert "\n" not in str(caught.value)


def test_cli_prints_config_errors_as_one_line(tmp_path):
    script = Path(sys.executable).parent / "instructblip-train"
    result = subprocess.run([str(script), "stage=blip2_stage5", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "instructblip-train: error: stage=blip2_stage5: no such option; allowed: blip2_stage1, blip2_stage2, "
        "finetune, instruction_tuning"
    ]
