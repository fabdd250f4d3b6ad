"""Config checks that run before anything is built: one line naming the key and the allowed values.

Two layers. :func:`check_overrides` looks at the command line before Hydra composes: an unknown option of a config
group (``model=vicuna9b``) or an unknown group is reported with the options that exist (Hydra's own message is a
multi-line block). :func:`check_config` then checks the composed tree: types and ranges of the keys the training
code reads, and combinations that cannot work (a CUDA graph on a CPU, instruction-aware features in BLIP-2 stage 2,
...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from instructblip.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"

# Groups that are not single-choice options of conf/ (Hydra's own, and the launcher the slurm helper adds).
HYDRA_GROUPS = {"hydra/launcher", "hydra/sweeper", "hydra/job_logging", "hydra/hydra_logging", "hydra/help",
                "hydra/hydra_help", "hydra/output", "hydra/env", "hydra/callbacks"}


def group_options(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """{group path: [option names]} for every config group under ``conf_dir``."""
    groups: dict[str, list[str]] = {}
    for path in conf_dir.rglob("*.yaml"):
        group = path.parent.relative_to(conf_dir).as_posix()
        if group != ".":
            groups.setdefault(group, []).append(path.stem)
    return {group: sorted(options) for group, options in groups.items()}


def check_overrides(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    groups = group_options(conf_dir)
    for override in overrides:
        if "=" not in override or override.startswith(("+", "~")):
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+").split("@")[0]
        if key in groups and not key.startswith("hydra/"):
            if value in ("null", "none", "None") and key in ("experiment", "logger", "callbacks"):
                continue
            values = [v.strip() for v in value.split(",")] if "," in value and not value.startswith(("glob(", "range(")) else [value]
            for option in values:
                if option.startswith(("glob(", "range(", "choice(")):
                    continue
                if option not in groups[key]:
                    raise ConfigError(f"{key}={option}: no such option; allowed: {', '.join(groups[key])}")
        elif "/" in key and key not in HYDRA_GROUPS and key.split("/")[0] != "hydra":
            parent = key.rsplit("/", 1)[0]
            if parent in groups or key not in groups:
                raise ConfigError(f"{key}: no such config group; groups: {', '.join(sorted(groups))}")


# the allowed values of some InstructBlipModule arguments, here so that the config check needs no Lightning import
COMPILE_SCOPES = ("blocks", "whole")
# torch.compile's modes that leave CUDA graphs out (null: its default): the step's own graph (step_mode=cuda_graph)
# captures the compiled blocks, and "reduce-overhead" blocks replaying graphs of their own failed on an H200 (the ViT's
# blocks share one compiled function, whose next replay overwrote the output the following block still read).
# max-autotune-no-cudagraphs weighs inductor's own Triton matrix kernels against cuBLAS's per shape at compile time.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
LOSS_WEIGHTINGS = ("token", "sample")
# automatic: Lightning's loop (forward, backward, clipping, optimizer step); cuda_graph: the whole step captured once
# as a CUDA graph and replayed (instructblip.train.cuda_graph); manual: that same step run eagerly, on any device
STEP_MODES = ("automatic", "cuda_graph", "manual")
# the dtype the trainable Q-Former's forward (hence its backward) autocasts to, whatever the trainer's precision:
# under 32-true on a CPU with bf16 matrix units (AMX) its matrix products run 3-4x faster, while the frozen
# LLM stays fp32 (bf16-mixed would autocast the LLM too, and CPU flash attention's bf16 backward is slower than fp32)
QFORMER_AUTOCAST = ("bfloat16",)

Check = tuple[str, type | tuple[type, ...], Callable[[Any], bool] | None, str]

CHECKS: list[Check] = [
    ("seed", int, lambda v: v >= 0, "an integer >= 0"),
    ("trainer.max_steps", int, lambda v: v > 0, "an integer > 0"),
    ("trainer.accumulate_grad_batches", int, lambda v: v >= 1, "an integer >= 1"),
    ("trainer.accelerator", str, lambda v: v in ("cpu", "gpu", "cuda", "auto"), "cpu, gpu, cuda, auto"),
    ("trainer.precision", (str, int), lambda v: str(v) in ("32", "32-true", "bf16-mixed", "bf16-true",
                                                            "16-mixed", "16-true"),
     "32-true, bf16-mixed, bf16-true, 16-mixed, 16-true"),
    ("data.batch_size", int, lambda v: v >= 1, "an integer >= 1"),
    ("data.num_workers", int, lambda v: v >= 0, "an integer >= 0"),
    ("data.sampling", str, lambda v: v in ("sqrt", "proportional", "uniform", "explicit"),
     "sqrt, proportional, uniform, explicit"),
    ("optimizer.lr", float, lambda v: v > 0, "a number > 0"),
    ("optimizer.weight_decay", float, lambda v: v >= 0, "a number >= 0"),
    ("scheduler.warmup_steps", int, lambda v: v >= 0, "an integer >= 0"),
    ("scheduler.warmup_lr", float, lambda v: v >= 0, "a number >= 0"),
    ("scheduler.min_lr", float, lambda v: v >= 0, "a number >= 0"),
    ("checkpoint.every_n_steps", int, lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint.keep_last", int, lambda v: v >= 1, "an integer >= 1"),
    ("faults.max_consecutive_nonfinite", int, lambda v: v >= 0, "an integer >= 0"),
    ("validation.every_n_steps", (int, type(None)), lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("stage.name", str, lambda v: v in STAGES, "blip2_stage1, blip2_stage2, instruction_tuning, finetune"),
    ("stage.module.compile_scope", str, lambda v: v in COMPILE_SCOPES, ", ".join(COMPILE_SCOPES)),
    ("stage.module.compile_mode", (str, type(None)), lambda v: v is None or v in COMPILE_MODES,
     "null, " + ", ".join(COMPILE_MODES)),
    # stage 1 has no loss weighting (its losses are BLIP-2's three)
    ("stage.module.loss_weighting", (str, type(None)), lambda v: v is None or v in LOSS_WEIGHTINGS,
     ", ".join(LOSS_WEIGHTINGS)),
    # stage 1 has no step mode (its step is Lightning's)
    ("stage.module.step_mode", (str, type(None)), lambda v: v is None or v in STEP_MODES, ", ".join(STEP_MODES)),
    ("stage.module.qformer_autocast", (str, type(None)), lambda v: v is None or v in QFORMER_AUTOCAST,
     "null, " + ", ".join(QFORMER_AUTOCAST)),
]

STAGES = ("blip2_stage1", "blip2_stage2", "instruction_tuning", "finetune")


def _typed(value: Any, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def check_config(cfg: DictConfig) -> None:
    for key, kind, ok, allowed in CHECKS:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as error:  # noqa: BLE001 - a missing mandatory value, or an interpolation that fails
            raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None
        if value is None and not _typed(None, kind):
            raise ConfigError(f"{key} is not set; expected {allowed}")
        if not _typed(value, kind) or (ok is not None and not ok(value)):
            raise ConfigError(f"{key}={value!r} ({type(value).__name__}); expected {allowed}")
    stage = cfg.stage.name
    aware = OmegaConf.select(cfg, "model.overrides.instruction_aware")
    if stage in ("blip2_stage1", "blip2_stage2") and aware:
        raise ConfigError(
            f"model.overrides.instruction_aware=true is impossible with stage={stage} (BLIP-2 pretraining has no "
            "instruction input); allowed: false, or stage=instruction_tuning|finetune"
        )
    examples = OmegaConf.select(cfg, "data.examples")
    if stage in ("instruction_tuning", "finetune") and examples == "caption":
        raise ConfigError(f"data.examples=caption with stage={stage}; allowed: instruction")
    if stage == "blip2_stage1" and OmegaConf.select(cfg, "data.collate") != "caption":
        raise ConfigError("stage=blip2_stage1 trains on captions through the Q-Former only; data.collate must be caption")
    from instructblip.train.data import check_fixed_lengths, check_image_features

    select = lambda key, default=None: OmegaConf.select(cfg, key, default=default)  # noqa: E731
    compile_mode = select("stage.module.compile_mode")
    if compile_mode is not None and not select("stage.module.compile"):
        raise ConfigError(f"stage.module.compile_mode={compile_mode} applies to compiled code; set "
                          "stage.module.compile=true (or a backend name), or leave compile_mode null")
    check_image_features(select("data.image_features"), select("data.augment", True),
                         select("data.collate", "instruction"))
    check_fixed_lengths(select("data.fixed_lengths"), select("data.collate", "instruction"))
    check_step_mode(select)


def check_step_mode(select: Callable[..., Any]) -> None:
    """What ``stage.module.step_mode=cuda_graph|manual`` (one step, optimizer included, outside Lightning's loop)
    can run with; each refusal names the key and what works. ``select(key, default=None)``: a composed config's
    value."""
    mode = select("stage.module.step_mode") or "automatic"
    if mode == "automatic":
        return
    key = f"stage.module.step_mode={mode}"
    strategy = select("trainer.strategy")  # a name ("auto") or a strategy's config (its _target_ names the class)
    strategy_name = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)
    single = strategy_name in ("auto", "single_device") and select("trainer.devices") in (1, "1") \
        and select("trainer.num_nodes", 1) == 1
    if not single and "DDPStrategy" not in strategy_name:
        raise ConfigError(f"{key} runs on one device (trainer=gpu or trainer=cpu with trainer.devices=1 and "
                          f"trainer.num_nodes=1) or under DDP (trainer=ddp, trainer=ddp_cpu); got trainer.strategy="
                          f"{strategy_name} trainer.devices={select('trainer.devices')} trainer.num_nodes="
                          f"{select('trainer.num_nodes', 1)}; with trainer=fsdp use stage.module.step_mode=automatic")
    if select("trainer.accumulate_grad_batches") != 1:
        raise ConfigError(f"{key} steps the optimizer on every micro-batch; trainer.accumulate_grad_batches="
                          f"{select('trainer.accumulate_grad_batches')} needs stage.module.step_mode=automatic")
    if str(select("trainer.precision")) not in ("32", "32-true", "bf16-mixed"):
        raise ConfigError(f"{key}: trainer.precision={select('trainer.precision')}; allowed: 32-true, bf16-mixed")
    if select("stage.module.loss_weighting", "token") != "token":
        raise ConfigError(f"{key} takes the model's token-mean loss; stage.module.loss_weighting="
                          f"{select('stage.module.loss_weighting')} needs stage.module.step_mode=automatic")
    if select("trainer.gradient_clip_algorithm", "norm") != "norm":
        raise ConfigError(f"{key} clips by the global norm only; trainer.gradient_clip_algorithm="
                          f"{select('trainer.gradient_clip_algorithm')}; allowed: norm")
    if select("model.overrides.pack_sequences", False):
        raise ConfigError(f"{key}: model.overrides.pack_sequences=true reads the sample lengths on the host, which "
                          "a captured step cannot; allowed: false")
    if select("stage.module.compile") and select("stage.module.compile_scope") == "whole":
        raise ConfigError(f"{key} with stage.module.compile_scope=whole is untested; allowed: blocks")
    if mode == "cuda_graph":
        if str(select("trainer.accelerator")) not in ("gpu", "cuda"):
            raise ConfigError(f"{key} needs a GPU (trainer.accelerator={select('trainer.accelerator')}); use "
                              "trainer=gpu, or stage.module.step_mode=manual (the same step without the graph)")
        if select("data.fixed_lengths") is None:
            raise ConfigError(f"{key} replays captured batch shapes: set data.fixed_lengths="
                              "{instruction: N, target: N, qformer: N} (token counts every batch is padded to), or "
                              "a list of them (length buckets)")
