"""``make demo``: the whole InstructBLIP recipe in miniature, on a CPU, with nothing downloaded (ShapesWorld).

    python -m instructblip.demo [out=outputs/demo] [ablations=false] [quick=false] [seed=0] [KEY=VALUE ...]

Stages, each skipped when its output exists (delete a stage's directory to redo it and everything after it):

1. ``data``      the ShapesWorld task datasets as WebDataset shards (``instructblip-prep``'s converter);
2. ``vision``    the tiny Eva image encoder, contrastively pretrained with open_clip (conf/model/shapesworld_vision);
3. ``llm``       its BPE tokenizer and the tiny LLaMA, pretrained on the world's text (conf/model/shapesworld_llm);
4. ``base``      the starting InstructBLIP checkpoint (Q-Former from the first MiniLM layers), HF layout;
5. ``stage1``    BLIP-2 stage 1 (experiment=shapesworld_stage1) through ``instructblip.train.run.train``;
6. ``stage2``    BLIP-2 stage 2 (experiment=shapesworld_stage2): the "BLIP-2" of the comparison;
7. ``instruct``  instruction tuning on the held-in mixture (experiment=shapesworld_instruct): the final model;
8. ``eval``      held-in (val) and held-out (test, zero-shot) evaluation of BLIP-2 and InstructBLIP with the
   evaluation runner (``instructblip.eval.runner``) and the registry's metrics;
9. with ``ablations=true``: instruction tuning without instruction-aware features and with proportional sampling
   (experiments shapesworld_instruct_no_instruction_aware / _proportional), evaluated the same way;
10. ``report``   ``report.md``, ``report.json`` and PNG plots in ``out``.

Every number in the report is measured in the run that wrote it. ``quick=true`` shrinks the world and the step
counts (the test suite's end-to-end run); any size below can be set with ``KEY=VALUE``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

HELD_IN_SIZES = {  # deliberately unequal, as the paper's datasets are: balanced vs proportional sampling differ
    "shapesworld_vqa": 6000,
    "shapesworld_caption": 3000,
    "shapesworld_qg": 2000,
    "shapesworld_count": 1500,
    "shapesworld_ocr_vqa": 1200,
    "shapesworld_describe": 600,
}


@dataclass
class DemoSettings:
    out: str = "outputs/demo"
    ablations: bool = False
    quick: bool = False
    seed: int = 0
    size_scale: float = 1.0        # multiplies the held-in train sizes
    # evaluated per held-in dataset (val split) and per held-out dataset (test split): at 50, one accuracy's
    # standard error is about 7 points, more than most differences the report compares; 200 costs seconds
    val_samples: int = 200
    test_samples: int = 200
    vision_steps: int | None = None       # None: conf/model/shapesworld_vision.yaml
    llm_steps: int | None = None          # None: conf/model/shapesworld_llm.yaml
    llm_documents: int | None = None
    stage1_steps: int | None = None       # None: the experiment's trainer.max_steps
    stage2_steps: int | None = None
    instruct_steps: int | None = None
    bert_layers: int = 2           # MiniLM layers the Q-Former starts from
    # the released InstructBLIP's 32. Seed 0, one thread throughout, 800 instruction-tuning steps: held-in accuracy
    # average 85.5 with 8, 87.5 with 16, 89.7 with 32 (89.5 with the threads below); seed 1: 84.2 with 8, 86.3 with
    # 16, 87.5 with 32 (the threads below) (experiments/README.md, "Session 13")
    num_query_tokens: int = 32
    eval_batch_size: int = 16
    # torch's intra-op threads in BLIP-2's stages, instruction tuning and the evaluations: both cores of the 2-core
    # machine the demo is sized for (alone on it, 60 instruction-tuning steps with 32 queries took 23.4 s instead
    # of 34.4). On a busy machine set threads=1: each parallel region waits for whichever thread the OS descheduled
    # (measured under load: 10 CLIP steps took 15.6 s on 1 thread, 87.8 s on 2)
    threads: int = 2
    # ... in the data, the image encoder's and the LLM's pretraining. One: what the LLM learns depends on the order
    # of its sums. The recipe's documents were chosen on one thread; the same recipe on two (1.5x faster) gave an
    # LLM that counts from the true scene text in 78% of cases instead of 86, and held-in 84.0 instead of 89.5
    # (experiments/README.md, "Session 13")
    pretrain_threads: int = 1
    # ... in the LLM's pretraining alone (None: pretrain_threads). Two: 1.4x faster, another draw: the 3-layer LLM
    # then lost its existence lookup (binary AUC 51.0) and make demo's held-in fell to 83.0 (session 28)
    llm_threads: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: list[str]) -> "DemoSettings":
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or key not in known:
                raise SystemExit(f"instructblip.demo: error: unknown setting {arg!r}; allowed: "
                                 f"{', '.join(k + '=...' for k in known)}")
            values[key] = _parse(value, known[key].type)
        settings = cls(**values)
        if settings.quick:
            settings.apply_quick(values)
        return settings

    def apply_quick(self, given: dict) -> None:
        """A small world and a few steps per stage: every stage and the report, in a few minutes."""
        quick = dict(size_scale=0.03, val_samples=4, test_samples=4, vision_steps=3, llm_steps=3, llm_documents=200,
                     stage1_steps=2, stage2_steps=2, instruct_steps=3, eval_batch_size=8, bert_layers=1,
                     num_query_tokens=8, threads=1)
        for key, value in quick.items():
            if key not in given:
                setattr(self, key, value)


def _parse(value: str, kind):
    kind = str(kind)
    if "bool" in kind:
        if value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"instructblip.demo: error: {value!r} is not true/false")
        return value.lower() in ("true", "1")
    if value.lower() in ("null", "none"):
        return None
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value


# --------------------------------------------------------------------------------------------------- the stages
class Demo:
    def __init__(self, settings: DemoSettings):
        self.s = settings
        self.out = Path(settings.out).expanduser()
        if not self.out.is_absolute():
            self.out = (Path.cwd() / self.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.shards = self.out / "data" / "shards"
        self.timings: dict[str, float] = {}        # wall seconds per stage
        self.cpu_timings: dict[str, float] = {}    # CPU seconds of this process (all its threads) per stage
        self.skipped: list[str] = []

    def log(self, message: str) -> None:
        print(f"[demo] {message}", flush=True)

    def stage(self, name: str, done: bool, run) -> None:
        if done:
            self.log(f"{name}: output exists, skipped")
            self.skipped.append(name)
            return
        self.log(f"{name}: running")
        start, cpu = time.time(), time.process_time()
        run()
        self.timings[name] = round(time.time() - start, 1)
        self.cpu_timings[name] = round(time.process_time() - cpu, 1)
        self.log(f"{name}: done in {self.timings[name]:.0f} s ({self.cpu_timings[name]:.0f} s CPU)")

    # -- 1. data
    def data_sizes(self) -> dict[tuple[str, str], int]:
        from instructblip.shapesworld import tasks

        sizes = {}
        for name, n in HELD_IN_SIZES.items():
            sizes[(name, "train")] = max(8, int(n * self.s.size_scale))
            sizes[(name, "val")] = self.s.val_samples
        for name in tasks.HELD_OUT:
            sizes[(name, "test")] = self.s.test_samples
        return sizes

    def run_data(self) -> None:
        import data_prep

        for (name, split), n in self.data_sizes().items():
            summary = data_prep.convert(name, None, self.shards, split=split, shard_size=1000, n=n,
                                        seed=self.s.seed, progress=self.s.progress)
            self.log(summary.line())

    def data_done(self) -> bool:
        for (name, split), n in self.data_sizes().items():
            path = self.shards / f"{name}-{split}-summary.json"
            # sample i is a pure function of (dataset, split, i, seed): more written than needed is as good
            if not path.exists() or json.loads(path.read_text()).get("written", 0) < n:
                return False
        return True

    # -- 2./3. pretraining
    def _recipe(self, name: str) -> dict:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"), resolve=True)

    def run_vision(self) -> None:
        from instructblip.shapesworld.vision import VisionPretrainConfig, pretrain_vision

        recipe = self._recipe("shapesworld_vision")
        if self.s.vision_steps is not None:
            recipe["steps"] = self.s.vision_steps
            recipe["warmup"] = min(recipe["warmup"], max(1, self.s.vision_steps // 5))
        pretrain_vision(VisionPretrainConfig(out=str(self.out / "vision"), seed=self.s.seed, **recipe),
                        progress=self.s.progress)

    def run_llm(self) -> None:
        from instructblip.shapesworld.language import LanguageConfig, pretrain_language

        recipe = self._recipe("shapesworld_llm")
        # an explicit step or document count scales the curriculum's phases and focus documents alike
        if self.s.llm_steps is not None:
            scale = self.s.llm_steps / recipe["steps"]
            recipe["steps"] = self.s.llm_steps
            recipe["warmup"] = min(recipe["warmup"], max(1, self.s.llm_steps // 5))
            recipe["curriculum"] = [{**phase, "steps": max(1, round(phase["steps"] * scale))}
                                    for phase in recipe.get("curriculum", [])]
        if self.s.llm_documents is not None:
            scale = self.s.llm_documents / recipe["documents"]
            recipe["documents"] = self.s.llm_documents
            recipe["focus_documents"] = {name: max(8, round(count * scale))
                                         for name, count in recipe.get("focus_documents", {}).items()}
        pretrain_language(LanguageConfig(out=str(self.out / "llm"), seed=self.s.seed, **recipe),
                          progress=self.s.progress)

    # -- 4. starting checkpoint
    def run_base(self) -> None:
        from instructblip.shapesworld.assemble import assemble, bert_subset

        bert_subset(self.out / "bert", self.s.bert_layers)
        assemble(self.out / "base", self.out / "vision", self.out / "llm", self.out / "bert",
                 num_query_tokens=self.s.num_query_tokens, seed=self.s.seed)

    # -- 5.-7., 9. training through instructblip-train's code
    def train_overrides(self, experiment: str, run_dir: Path, steps: int | None, init_from: Path | None) -> list[str]:
        overrides = [
            f"experiment={experiment}", f"paths.data_dir={self.out / 'data'}",
            f"model.pretrained={self.out / 'base'}", f"seed={self.s.seed}", "logger=csv",
            "callbacks.preemption=null", "callbacks.prediction_table=null", "callbacks.throughput=null",
            f"+trainer.enable_progress_bar={str(self.s.progress).lower()}", "trainer.enable_model_summary=false",
        ]
        if experiment == "shapesworld_stage1":
            overrides.append(f"stage.module.bert={self.out / 'bert'}")
        elif not _bf16_matrix_units():
            # the experiments autocast the Q-Former to bf16 for this machine's AMX; without bf16 units it would be
            # emulated, slower than fp32
            overrides.append("stage.module.qformer_autocast=null")
        if init_from is not None:
            overrides.append(f"model.init_from={init_from}")
        if steps is not None:
            overrides += [f"trainer.max_steps={steps}", f"scheduler.warmup_steps={max(1, min(10, steps // 5))}",
                          f"trainer.log_every_n_steps={max(1, min(5, steps))}"]
        return overrides

    def run_train(self, experiment: str, run_dir: Path, steps: int | None, init_from: Path | None) -> None:
        from instructblip.train.run import train

        cfg = compose_train(self.train_overrides(experiment, run_dir, steps, init_from), run_dir)
        train(cfg)

    # -- 8. evaluation through the evaluation runner
    def load_trained(self, run: str, instruction_aware: bool):
        """A run's model: its Hugging Face export when it has one, else its trained weights on the starting
        checkpoint (what ``instructblip-eval checkpoint=<trainable> base=<base>`` does), with the run's
        ``instruction_aware`` (BLIP-2 and the ablation have no instruction input, hence no HF export)."""
        from instructblip.cli._common import open_model
        from instructblip.model.instructblip import InstructBlip
        from instructblip.train.build import load_trainable_weights

        export = self.out / run / "hf"
        if (export / "config.json").exists():
            return open_model(str(export), device="cpu")
        model = InstructBlip.from_pretrained(self.out / "base", instruction_aware=instruction_aware, device="cpu")
        load_trainable_weights(model, self.out / run / "trainable.safetensors")
        return model

    def evaluate(self, run: str, instruction_aware: bool, out_dir: Path, names: list[str]) -> dict[str, dict]:
        import torch

        from instructblip.data import registry
        from instructblip.eval.runner import Benchmark, evaluate_benchmark

        torch.manual_seed(self.s.seed)
        model = self.load_trained(run, instruction_aware)
        model.eval()
        results = {}
        for name in names:
            info = registry.get(name)
            limit = self.s.test_samples if info.held_out else self.s.val_samples
            generation = GENERATION[info.answer_length]
            with torch.no_grad():
                result = evaluate_benchmark(model, Benchmark(info, dict(generation)), self.shards, out_dir,
                                            batch_size=self.s.eval_batch_size, rank_batch_size=64,
                                            limit=limit, progress=self.s.progress)
            results[name] = {"metric": result.metric, "score": result.score, "n": result.n, "split": result.split,
                             **({"extra": result.extra} if result.extra else {})}
            self.log(f"{run} {name}: {result.metric} {result.score:.1f} (n={result.n})")
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        return results

    def eval_stage(self, key: str, run: str, instruction_aware: bool, names: list[str]) -> None:
        out_dir = self.out / "eval" / key
        self.stage(f"eval {key}", (out_dir / "results.json").exists(),
                   lambda: self.evaluate(run, instruction_aware, out_dir, names))

    # -- everything
    def run(self) -> Path:
        import torch

        from instructblip.shapesworld import tasks

        torch.set_num_threads(self.s.pretrain_threads)

        start, cpu = time.time(), time.process_time()
        self.stage("data", self.data_done(), self.run_data)
        self.stage("vision", (self.out / "vision" / "trunk.safetensors").exists(), self.run_vision)
        torch.set_num_threads(self.s.llm_threads or self.s.pretrain_threads)
        self.stage("llm", (self.out / "llm" / "config.json").exists(), self.run_llm)
        torch.set_num_threads(self.s.threads)
        self.stage("base", (self.out / "base" / "config.json").exists(), self.run_base)
        runs = {"stage1": ("shapesworld_stage1", self.s.stage1_steps, None),
                "stage2": ("shapesworld_stage2", self.s.stage2_steps, "stage1"),
                "instruct": ("shapesworld_instruct", self.s.instruct_steps, "stage2")}
        if self.s.ablations:
            runs["instruct_no_instruction_aware"] = ("shapesworld_instruct_no_instruction_aware",
                                                     self.s.instruct_steps, "stage2")
            runs["instruct_proportional"] = ("shapesworld_instruct_proportional", self.s.instruct_steps, "stage2")
        for key, (experiment, steps, parent) in runs.items():
            run_dir = self.out / key
            init = None if parent is None else self.out / parent / "trainable.safetensors"
            self.stage(key, (run_dir / "trainable.safetensors").exists(),
                       lambda e=experiment, r=run_dir, n=steps, i=init: self.run_train(e, r, n, i))
        everything = list(HELD_IN_SIZES) + tasks.HELD_OUT
        self.eval_stage("blip2", "stage2", False, everything)
        self.eval_stage("instructblip", "instruct", True, everything)
        if self.s.ablations:
            self.eval_stage("no_instruction_aware", "instruct_no_instruction_aware", False, everything)
            self.eval_stage("proportional", "instruct_proportional", True, everything)
        self.timings["total (this invocation)"] = round(time.time() - start, 1)
        self.cpu_timings["total (this invocation)"] = round(time.process_time() - cpu, 1)
        from instructblip.shapesworld.report import write_report

        report = write_report(self)
        self.log(f"report: {report}")
        print(report.read_text(), flush=True)
        return report


# Decoding in the demo: greedy (the runner's default is LAVIS' 5 beams; greedy keeps the 2-core budget).
GENERATION = {
    "short": {"num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 1},
    "long": {"num_beams": 1, "max_new_tokens": 60, "min_new_tokens": 1},
}


def _bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX)."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def compose_train(overrides: list[str], run_dir: Path):
    """The composed ``instructblip-train`` config for ``run_dir`` (what the CLI's Hydra app builds, in-process)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import instructblip.train  # noqa: F401  (registers the config resolvers)
    from instructblip.train.validate import CONF_DIR, check_overrides

    os.environ.setdefault("INSTRUCTBLIP_ROOT", str(CONF_DIR.parent))
    check_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.checkpoint_dir = str(run_dir / "checkpoints")
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]   # a Hydra run's own section (job number, sweep dirs) has no values outside a Hydra run
    return cfg


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = DemoSettings.from_args(sys.argv[1:] if argv is None else argv)
    Demo(settings).run()


if __name__ == "__main__":
    main()
