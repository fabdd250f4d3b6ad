"""`make bench`: every benchmark at the sizes this machine can time, results saved under experiments/results/.

On a CPU: the "tiny" size (the test suite's model, where per-call overhead dominates) and the "cpu" size (real
proportions, small widths, where the matrix products dominate), both LLM kinds, one intra-op thread, CPU-time
medians; the padding and data-loader benchmarks. With CUDA, ``experiments/bench/gpu_session.sh`` runs the released
Vicuna-7B and FlanT5-XL configurations (within a 10-minute session). Each benchmark prints one JSON object; this
script stores each in ``experiments/results/<benchmark>-<size>-<llm>-<device>-<date>.json`` and prints a summary.

    python experiments/bench/run_all.py            # or: make bench
    python experiments/bench/run_all.py --quick    # tiny size only (a minute)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def run(script: str, *flags: str) -> dict:
    command = [sys.executable, str(HERE / script), *flags]
    print("$", " ".join(["python", f"experiments/bench/{script}", *flags]), file=sys.stderr, flush=True)
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    try:
        return json.loads(out)
    except json.JSONDecodeError:  # a benchmark that prints progress first: its JSON is the last line
        return json.loads(out.splitlines()[-1])


def summary(result: dict) -> list[str]:
    lines = []
    for row in result.get("rows", []):
        what = {k: row[k] for k in ("batch", "mode") if k in row}
        if "ours_vs_transformers" in row:
            lines.append(f"{result['benchmark']:20s} {result.get('size', ''):5s} {result.get('llm', ''):6s} "
                         f"{json.dumps(what):32s} ours/transformers {row['ours_vs_transformers']:.2f}x "
                         f"(wall {row['ours_vs_transformers_wall']:.2f}x)")
        elif result["benchmark"] == "padding":
            lines.append(f"padding per useful token, batch {row['batch']}: random "
                         f"{row['random']['padding_per_useful_token']:.3f}, length-grouped "
                         f"{row['length_grouped']['padding_per_useful_token']:.3f}, packed "
                         f"{row['packed']['padding_per_useful_token']:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny size only, no data-loader benchmark")
    args = parser.parse_args()
    jobs = []
    for size, batches, gen_batches in (("tiny", "4,8", "1,4"), ("cpu", "4,8", "1,4")):
        if args.quick and size != "tiny":
            continue
        for llm in ("llama", "t5"):
            jobs.append(("train_throughput.py", "--size", size, "--llm", llm, "--batch-sizes", batches,
                         "--device", "cpu", "--repeats", "9" if size == "tiny" else "7"))
            jobs.append(("generate_throughput.py", "--size", size, "--llm", llm, "--batch-sizes", gen_batches,
                         "--device", "cpu", "--repeats", "9" if size == "tiny" else "5"))
    jobs.append(("padding.py",))
    if not args.quick:
        # sequence packing on batches with the mixture's lengths, and the precomputed-features step
        jobs.append(("train_throughput.py", "--size", "cpu", "--llm", "llama", "--batch-sizes", "8,16",
                     "--mixed-lengths", "4", "--sides", "ours,ours_packed,transformers", "--device", "cpu",
                     "--repeats", "5", "--warmup", "1"))
        jobs.append(("image_features.py", "--size", "cpu", "--llm", "llama", "--batch-sizes", "4,8"))
        jobs.append(("dataloader_throughput.py",))
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = []
    for script, *flags in jobs:
        result = run(script, *flags)
        stem = Path(script).stem + ("_mixed" if "--mixed-lengths" in flags else "")
        parts = [stem, result.get("size"), result.get("llm"), "cpu", str(date.today())]
        name = "-".join(p for p in parts if p)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        lines += summary(result)
        print("\n".join(summary(result)), file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
