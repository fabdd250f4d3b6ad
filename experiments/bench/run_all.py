"""`make bench`: every benchmark at the sizes this machine can time, results saved under experiments/results/.

On a CPU it runs the "cpu" size (real proportions, small widths); with CUDA it runs the released Vicuna-7B and
FlanT5-XL configurations too. Each benchmark prints one JSON object; this script stores each in
``experiments/results/<benchmark>-<device>-<date>.json`` and prints a summary table.

    python experiments/bench/run_all.py            # or: make bench
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def run(script: str, *flags: str) -> dict:
    command = [sys.executable, str(HERE / script), *flags]
    print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    jobs = [
        ("train_throughput.py", "--size", "cpu", "--llm", "llama", "--batch-sizes", "2,4", "--device", device),
        ("train_throughput.py", "--size", "cpu", "--llm", "t5", "--batch-sizes", "2,4", "--device", device),
        ("generate_throughput.py", "--size", "cpu", "--batch-sizes", "1,4", "--device", device),
        ("dataloader_throughput.py",),
    ]
    if cuda:
        peak = ["--peak-tflops", "989"]
        jobs += [
            ("train_throughput.py", "--size", "released", "--llm", "llama", "--batch-sizes", "8,16,32",
             "--compile", *peak),
            ("train_throughput.py", "--size", "released", "--llm", "t5", "--batch-sizes", "8,16,32", *peak),
            ("generate_throughput.py", "--size", "released", "--batch-sizes", "1,16,64", "--static"),
        ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for script, *flags in jobs:
        result = run(script, *flags)
        name = f"{Path(script).stem}-{result.get('size', 'data')}-{result.get('llm', '')}-{device}-{date.today()}"
        (RESULTS / f"{name.replace('--', '-')}.json").write_text(json.dumps(result, indent=2) + "\n")
        for row in result.get("rows", []):
            ratio = row.get("ours_vs_transformers")
            print(f"{script:28s} {result.get('size', ''):9s} {result.get('llm', ''):6s} "
                  f"{json.dumps({k: row[k] for k in row if k in ('batch', 'mode')})} ours/transformers = {ratio}")


if __name__ == "__main__":
    main()
