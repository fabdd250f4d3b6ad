"""``make demo``'s scores over several seeds: mean ± sd (and each seed's value) from the runs' ``report.json``.

    .venv/bin/python experiments/demo_seeds.py outputs/demo outputs/demo_seed1 outputs/demo_seed2 \
        [--out experiments/results/demo_seeds-DATE.json]

One run's held-in scores move by 5-15 points with nothing but the LLM's batch order changed (val n = 50 per task),
so a difference between two configurations means something only beside the spread over seeds. A demo's ``seed``
changes everything random in it: the world's train/val/test examples (hence also the evaluated samples and the
chance levels), the vision encoder's initialisation and image stream, the LLM's documents, tokenizer, initialisation
and batch order, the new InstructBLIP parameters, the training mixture's order and dropout.

For every model the reports hold (``results``/``summary`` keys: blip2, instructblip, no_instruction_aware,
proportional) it tabulates each held-in and held-out task's score, the report's ``held_in_accuracy_average`` (the
accuracy/VQA tasks) and ``held_out_average``, the held-out tasks above chance (``held_out_above_chance`` > 0),
those clearly above it (``held_out_margin_sd`` at least the report's ``CLEAR_MARGIN_SD``) and each held-out task's
margin over chance; then the paper's three comparisons as paired per-seed differences:
InstructBLIP - BLIP-2, instruction-aware - not (``instructblip`` - ``no_instruction_aware``), balanced -
proportional sampling (``instructblip`` - ``proportional``). sd is the sample standard deviation over seeds.
Prints a Markdown table and writes the numbers as JSON to ``--out``.

``--baseline DIR ...`` (one folder per run, the same seeds in the same order) adds, for each model and quantity,
the paired per-seed difference run - baseline: a change of configuration measured against the seed spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("blip2", "instructblip", "no_instruction_aware", "proportional")
COMPARISONS = {  # name -> (model, baseline): the paper's comparisons as the demo's report names its models
    "instructblip_vs_blip2": ("instructblip", "blip2"),
    "instruction_aware_vs_not": ("instructblip", "no_instruction_aware"),
    "balanced_vs_proportional": ("instructblip", "proportional"),
}
SUMMARIES = ("held_in_accuracy_average", "held_out_average", "held_out_tasks_above_chance",
             "held_out_tasks_clearly_above_chance")


def stats(values: list[float | None]) -> dict:
    """Each seed's value (None where a run lacks it) with the mean and sample sd of those present."""
    present = [v for v in values if v is not None]
    return {"values": values, "n": len(present),
            "mean": statistics.fmean(present) if present else None,
            "sd": statistics.stdev(present) if len(present) > 1 else None}


def load(run: Path) -> dict:
    path = run / "report.json"
    if not path.exists():
        raise SystemExit(f"demo_seeds.py: {path}: no report.json (run `python -m instructblip.demo out={run}` first)")
    report = json.loads(path.read_text())
    missing = [k for k in ("results", "chance", "summary", "settings") if k not in report]
    if missing:
        raise SystemExit(f"demo_seeds.py: {path}: missing key(s) {', '.join(missing)}")
    return report


def model_numbers(report: dict, model: str) -> dict[str, float | None]:
    """One run's numbers for one model, flat: ``held_in/<task>``, ``held_out/<task>``, the summaries,
    ``above_chance/<task>``."""
    results, summary = report["results"].get(model), report["summary"].get(model)
    if results is None or summary is None:
        return {}
    from instructblip.shapesworld import tasks
    from instructblip.shapesworld.report import CLEAR_MARGIN_SD

    flat = {f"held_in/{n}": results[n]["score"] for n in tasks.HELD_IN if n in results}
    flat.update({f"held_out/{n}": results[n]["score"] for n in tasks.HELD_OUT if n in results})
    above = summary["held_out_above_chance"]
    flat["held_in_accuracy_average"] = summary["held_in_accuracy_average"]
    flat["held_out_average"] = summary["held_out_average"]
    flat["held_out_tasks_above_chance"] = sum(v is not None and v > 0 for v in above.values())
    margins = summary.get("held_out_margin_sd")   # None in reports written before session 24
    flat["held_out_tasks_clearly_above_chance"] = None if margins is None else sum(
        v is not None and v >= CLEAR_MARGIN_SD for v in margins.values())
    flat.update({f"above_chance/{n}": v for n, v in above.items()})
    return flat


def aggregate(reports: list[dict]) -> dict:
    per_model = {}
    for model in MODELS:
        runs = [model_numbers(r, model) for r in reports]
        if not any(runs):
            continue
        keys = list(dict.fromkeys(k for run in runs for k in run))
        per_model[model] = {k: stats([run.get(k) for run in runs]) for k in keys}
    comparisons = {}
    for name, (model, baseline) in COMPARISONS.items():
        if model not in per_model or baseline not in per_model:
            continue
        comparisons[name] = {}
        for key in SUMMARIES:
            a, b = per_model[model][key]["values"], per_model[baseline][key]["values"]
            comparisons[name][key] = stats([x - y if x is not None and y is not None else None for x, y in zip(a, b)])
    chance_keys = list(dict.fromkeys(k for r in reports for k in r["chance"]))
    chance = {k: stats([r["chance"].get(k) for r in reports]) for k in chance_keys}
    return {"models": per_model, "comparisons": comparisons, "chance": chance}


def versus(reports: list[dict], baselines: list[dict]) -> dict:
    """Per model and quantity, the paired per-seed differences ``reports`` - ``baselines``."""
    out = {}
    for model in MODELS:
        runs = [model_numbers(r, model) for r in reports]
        bases = [model_numbers(b, model) for b in baselines]
        if not any(runs) or not any(bases):
            continue
        keys = [k for k in dict.fromkeys(k for run in runs for k in run) if not k.startswith("above_chance/")]
        out[model] = {k: stats([r[k] - b[k] if r.get(k) is not None and b.get(k) is not None else None
                                for r, b in zip(runs, bases)]) for k in keys}
    return out


def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.1f}" + ("" if s["sd"] is None else f" ± {s['sd']:.1f}")


def _values(s: dict) -> str:
    return " / ".join("-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v) for v in s["values"])


def markdown(result: dict) -> str:
    seeds = " / ".join(str(run["seed"]) for run in result["runs"])
    lines = []
    for model, numbers in result["models"].items():
        lines += [f"### {model}", "", f"| quantity | mean ± sd | per seed ({seeds}) |", "|---|---|---|"]
        lines += [f"| {key} | {_cell(s)} | {_values(s)} |" for key, s in numbers.items()]
        lines.append("")
    if result["comparisons"]:
        lines += ["### comparisons (paired per-seed differences)", "",
                  f"| comparison | quantity | mean ± sd | per seed ({seeds}) |", "|---|---|---|---|"]
        for name, numbers in result["comparisons"].items():
            lines += [f"| {name} | {key} | {_cell(s)} | {_values(s)} |" for key, s in numbers.items()]
        lines.append("")
    for model, numbers in result.get("versus_baseline", {}).items():
        lines += [f"### {model} - baseline (paired per-seed differences)", "",
                  f"| quantity | mean ± sd | per seed ({seeds}) |", "|---|---|---|"]
        lines += [f"| {key} | {_cell(s)} | {_values(s)} |" for key, s in numbers.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo output folders (each with report.json)")
    parser.add_argument("--baseline", nargs="+", type=Path, default=[],
                        help="baseline demo folders, one per run, the same seeds in the same order")
    parser.add_argument("--out", type=Path,
                        default=REPO / "experiments" / "results" / f"demo_seeds-{date.today()}.json")
    args = parser.parse_args(argv)
    reports = [load(run) for run in args.runs]
    seeds = [r["settings"].get("seed") for r in reports]
    if len(set(seeds)) < len(seeds):
        print(f"demo_seeds.py: warning: repeated seeds {seeds}", file=sys.stderr)
    # the runs should differ in their seed (and folder) only
    varying = {k for r in reports for k, v in r["settings"].items()
               if k not in ("out", "seed", "progress") and v != reports[0]["settings"].get(k)}
    if varying:
        print(f"demo_seeds.py: warning: the runs differ in more than the seed: {', '.join(sorted(varying))}",
              file=sys.stderr)
    result = {"date": str(date.today()),
              "command": " ".join(["experiments/demo_seeds.py", *argv]),
              "runs": [{"dir": str(run), "seed": seed} for run, seed in zip(args.runs, seeds)],
              **aggregate(reports)}
    if args.baseline:
        baselines = [load(run) for run in args.baseline]
        base_seeds = [b["settings"].get("seed") for b in baselines]
        if base_seeds != seeds:
            raise SystemExit(f"demo_seeds.py: --baseline seeds {base_seeds} differ from the runs' seeds {seeds}")
        result["baseline_runs"] = [str(run) for run in args.baseline]
        result["versus_baseline"] = versus(reports, baselines)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
