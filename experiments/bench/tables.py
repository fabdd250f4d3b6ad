"""Markdown tables from the benchmarks' JSON results (what experiments/README.md shows).

    python experiments/bench/tables.py experiments/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _env(result: dict) -> str:
    env = result.get("environment", {})
    where = env.get("card") or f"{env.get('cpu', '?')} ({env.get('threads', '?')} thread)"
    return (f"{where}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; "
            f"{env.get('date', result.get('date', '?'))}; load {env.get('load_average_1min', 0):.1f}; "
            f"`{env.get('command', result.get('command', ''))}`")


def train_table(result: dict) -> list[str]:
    names = list(result["rows"][0]["sides"])
    unit = "samples/s"
    lines = [f"**Training step, size `{result['size']}`, {result['llm']}** ({_env(result)})", "",
             "| batch | " + " | ".join(f"{n} ({unit})" for n in names) + " | ours / transformers (CPU time) | (wall) | loss rel. diff |",
             "|" + "---|" * (len(names) + 4)]
    for row in result["rows"]:
        cells = [f"{row['sides'][n]['samples_per_s']:.1f}" for n in names]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + f" | **{row['ours_vs_transformers']:.2f}x** | "
                     f"{row['ours_vs_transformers_wall']:.2f}x | {row['loss_relative_difference']:.1e} |")
    return lines


def generate_table(result: dict) -> list[str]:
    names = list(result["rows"][0]["sides"])
    lines = [f"**Generation, {result['new_tokens']} new tokens, size `{result['size']}`, {result['llm']}** "
             f"({_env(result)})", "",
             "| batch | mode | " + " | ".join(f"{n} (tokens/s)" for n in names)
             + " | ours / transformers (CPU time) | (wall) | identical ids |",
             "|" + "---|" * (len(names) + 5)]
    for row in result["rows"]:
        cells = [f"{row['sides'][n]['tokens_per_s']:.1f}" if n in row["sides"] else "" for n in names]
        lines.append(f"| {row['batch']} | {row['mode']} | " + " | ".join(cells)
                     + f" | **{row['ours_vs_transformers']:.2f}x** | {row['ours_vs_transformers_wall']:.2f}x | "
                     f"{row['identical_token_ids']} |")
    return lines


def padding_table(result: dict) -> list[str]:
    lines = [f"**Padding per useful token**, {result['samples']} samples of the paper mixture (length model), "
             f"length-grouping window {result['window_batches']} batches; {result['date']}; `{result['command']}`", "",
             "| batch | random batches | length-grouped | packed (rows of the longest sample) | reduction (grouped) |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['batch']} | {row['random']['padding_per_useful_token']:.3f} | "
                     f"{row['length_grouped']['padding_per_useful_token']:.3f} | "
                     f"{row['packed']['padding_per_useful_token']:.3f} | {row['padding_reduction_grouped']:.0f}x |")
    return lines


def main() -> None:
    renderers = {"train_throughput": train_table, "generate_throughput": generate_table, "padding": padding_table}
    for path in sys.argv[1:]:
        result = json.loads(Path(path).read_text())
        render = renderers.get(result.get("benchmark"))
        if render is not None and result.get("rows"):
            print("\n".join(render(result)) + "\n")


if __name__ == "__main__":
    main()
