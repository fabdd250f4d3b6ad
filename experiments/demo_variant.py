"""Try a Q-Former idea on a finished `make demo` run: redo stage 2 and/or instruction tuning under other settings,
reusing the run's earlier stages, then evaluate the result on every held-in (val) and held-out (test) dataset.

    python experiments/demo_variant.py OUT TAG [--from stage2|instruct] [--stage2-steps N] [--instruct-steps N]
        [--stage2 HYDRA_OVERRIDE ...] [--instruct HYDRA_OVERRIDE ...] [--captions reference|describe]

Runs go to ``OUT/stage2_TAG`` and ``OUT/instruct_TAG`` (kept: a second call with the same TAG reuses them), the
evaluation to ``OUT/eval/TAG/results.json``; one summary line is printed. ``--from instruct`` starts instruction
tuning from ``--stage2-run`` (default: the run's ``stage2``). ``--captions describe`` trains stage 2 on each
caption image's detailed description (``world.describe``: count, every shape with its cell, the word) instead of
its reference captions, from shards written once to ``OUT/data_describe``. Examples (experiments/README.md):

    python experiments/demo_variant.py outputs/demo sample --from instruct --instruct stage.module.loss_weighting=sample
    python experiments/demo_variant.py outputs/demo describe --captions describe
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

HELD_IN_ACCURACY = ("shapesworld_vqa", "shapesworld_count", "shapesworld_ocr_vqa")


def describe_shards(demo) -> Path:
    """The caption train shards again, through the converters' shard writer, each record's references replaced by
    its scene's detailed description (the same images: sample i is a pure function of its index and the seed)."""
    from data_prep.media import pil_member
    from data_prep.shards import Sample, write_shards
    from instructblip.shapesworld import tasks, world

    summary = json.loads((demo.shards / "shapesworld_caption-train-summary.json").read_text())

    def samples():
        for index in range(summary["written"]):
            record, image, _ = tasks.build("shapesworld_caption", "train", index, demo.s.seed)
            record.answers = [world.describe(world.Scene.from_dict(record.extra["scene"]))]
            yield Sample(record, pil_member(image))

    out = demo.out / "data_describe"
    write_shards(samples(), out, "shapesworld_caption", "train", shard_size=summary["shard_size"],
                 total=summary["written"], options={"describe": True, **summary["options"]}, progress=False)
    return out


def train(demo, experiment: str, run_dir: Path, steps: int | None, init_from: Path, extra: list[str]) -> None:
    if (run_dir / "trainable.safetensors").exists():
        demo.log(f"{run_dir.name}: output exists, reused")
        return
    plain = demo.train_overrides
    demo.train_overrides = lambda *args: plain(*args) + extra
    try:
        demo.run_train(experiment, run_dir, steps, init_from)
    finally:
        demo.train_overrides = plain


def main() -> None:
    import torch

    from instructblip.demo import HELD_IN_SIZES, Demo, DemoSettings
    from instructblip.shapesworld import tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a finished demo run (outputs/demo)")
    parser.add_argument("tag", help="names this variant's runs and evaluation")
    parser.add_argument("--from", dest="start", choices=("stage2", "instruct"), default="stage2")
    parser.add_argument("--stage2-run", default="stage2", help="with --from instruct: the stage-2 run to start from")
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: the demo run's")
    parser.add_argument("--instruct-steps", type=int, default=None, help="default: the demo run's")
    parser.add_argument("--stage2", nargs="*", default=[], help="Hydra overrides of shapesworld_stage2")
    parser.add_argument("--instruct", nargs="*", default=[], help="Hydra overrides of shapesworld_instruct")
    parser.add_argument("--captions", choices=("reference", "describe"), default="reference")
    args = parser.parse_args()

    out = Path(args.out)
    # the run's own settings (seed, step counts, evaluation sizes; a quick=true run stays quick)
    settings = json.loads((out / "report.json").read_text())["settings"]
    known = {f.name for f in fields(DemoSettings)} - {"extra"}
    demo = Demo(DemoSettings(**{**{k: v for k, v in settings.items() if k in known}, "out": str(out),
                                "progress": False, "ablations": False}))
    torch.set_num_threads(demo.s.threads)
    stage2_steps = demo.s.stage2_steps if args.stage2_steps is None else args.stage2_steps
    instruct_steps = demo.s.instruct_steps if args.instruct_steps is None else args.instruct_steps
    stage2 = demo.out / args.stage2_run
    if args.start == "stage2":
        stage2 = demo.out / f"stage2_{args.tag}"
        extra = list(args.stage2)
        if args.captions == "describe":
            extra.append(f"data.datasets.shapesworld_caption={describe_shards(demo)}/shapesworld_caption-train-*.tar")
        train(demo, "shapesworld_stage2", stage2, stage2_steps, demo.out / "stage1" / "trainable.safetensors",
              extra)
    run = f"instruct_{args.tag}"
    train(demo, "shapesworld_instruct", demo.out / run, instruct_steps, stage2 / "trainable.safetensors",
          list(args.instruct))
    results_dir = demo.out / "eval" / args.tag
    results_dir.mkdir(parents=True, exist_ok=True)
    results = demo.evaluate(run, True, results_dir, list(HELD_IN_SIZES) + tasks.HELD_OUT)
    held_in = [results[name]["score"] for name in HELD_IN_ACCURACY]
    held_out = [results[name]["score"] for name in tasks.HELD_OUT]
    print(json.dumps({"out": str(out), "tag": args.tag, "held_in_accuracy_average": round(sum(held_in) / 3, 1),
                      "held_out_average": round(sum(held_out) / len(held_out), 1),
                      "scores": {name.removeprefix("shapesworld_"): round(results[name]["score"], 1)
                                 for name in results}}))


if __name__ == "__main__":
    main()
