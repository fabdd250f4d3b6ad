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
    ratios = [k for k in result["rows"][0] if k.endswith(tuple(f"_vs_{n}" for n in names))]
    basis = "wall" if result.get("environment", {}).get("card") else "CPU time"
    extras = [("utilisation", "{:.2f}"), ("peak_gib", "{:.1f} GiB")]
    extras = [(key, fmt) for key, fmt in extras if key in result["rows"][0]["sides"][names[0]]]
    header = [f"{n} (samples/s)" for n in names] + [f"{n} {key}" for key, _ in extras for n in names]
    header += [f"{r.replace('_vs_', ' / ')} ({basis})" for r in ratios] + ["loss rel. diff"]
    lines = [f"**Training step, size `{result['size']}`, {result['llm']}** ({_env(result)})", "",
             "| batch | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for row in result["rows"]:
        cells = [f"{row['sides'][n]['samples_per_s']:.1f}" for n in names]
        cells += [fmt.format(row["sides"][n][key]) for key, fmt in extras for n in names]
        cells += [f"**{row[r]:.2f}x**" for r in ratios] + [f"{row['loss_relative_difference']:.1e}"]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    return lines


def generate_table(result: dict) -> list[str]:
    names = list(result["rows"][0]["sides"])
    basis = "wall" if result.get("environment", {}).get("card") else "CPU time"
    lines = [f"**Generation, {result['new_tokens']} new tokens, size `{result['size']}`, {result['llm']}** "
             f"({_env(result)})", "",
             "| batch | mode | " + " | ".join(f"{n} (tokens/s)" for n in names)
             + f" | ours / transformers ({basis}) | (wall) | identical ids |",
             "|" + "---|" * (len(names) + 5)]
    for row in result["rows"]:
        cells = [f"{row['sides'][n]['tokens_per_s']:.1f}" if n in row["sides"] else "" for n in names]
        ratio = lambda key: f"{row[key]:.2f}x" if key in row else "—"  # noqa: E731 (a side that failed: no ratio)
        lines.append(f"| {row['batch']} | {row['mode']} | " + " | ".join(cells)
                     + f" | **{ratio('ours_vs_transformers')}** | {ratio('ours_vs_transformers_wall')} | "
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
