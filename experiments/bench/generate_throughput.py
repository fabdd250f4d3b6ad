"""Generation throughput: ours vs transformers' InstructBLIP generate(), same weights, same inputs.

Greedy decoding of ``--new-tokens`` tokens (EOS disabled so every row produces them all) at each batch size, and
beam search with ``--beams`` beams; the token ids of both sides are compared before timing. Prints one JSON object:
new tokens per second for each side and the ratio.

    python experiments/bench/generate_throughput.py --size cpu --batch-sizes 1,8
    python experiments/bench/generate_throughput.py --size released --device cuda --batch-sizes 1,16,64 --static
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_pair, emit, environment, median_seconds, synthetic_batch  # noqa: E402


def generation_inputs(pair, batch_size: int, prompt_len: int, device: str):
    ours, theirs = synthetic_batch(pair.config, batch_size, 32, prompt_len, 0, device)
    ours.pop("labels"), theirs.pop("labels")
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="cpu", choices=["tiny", "cpu", "released"])
    parser.add_argument("--llm", default="llama", choices=["llama", "t5"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64, help="LLM prompt incl. the visual tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--static", action="store_true", help="also time transformers with a compiled static cache")
    args = parser.parse_args()

    pair = build_pair(args.size, args.llm, args.device)
    pair.ours.eval()
    pair.theirs.eval()
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        ours_batch, theirs_batch = generation_inputs(pair, batch_size, args.prompt_len, args.device)
        for mode, beams in (("greedy", 1), ("beam", args.beams)):
            # min_new_tokens = max_new_tokens: EOS is suppressed, every row produces exactly new_tokens tokens.
            settings = dict(
                num_beams=beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                repetition_penalty=1.0, length_penalty=1.0, do_sample=False,
            )

            def ours():
                return pair.ours.generate_ids(ours_batch, **settings)

            def theirs(model=pair.theirs, **extra):
                with torch.no_grad():
                    out = model.generate(**theirs_batch, **settings, **extra)
                if pair.config.use_decoder_only_language_model:
                    out = out[:, theirs_batch["input_ids"].shape[1]:]
                else:
                    out = out[:, 1:]
                return out

            same_ids = torch.equal(ours().cpu(), theirs().cpu())
            sides = {"ours": ours, "transformers": theirs}
            if args.static and mode == "greedy":
                sides["transformers_static_compiled"] = lambda: theirs(cache_implementation="static", compile_config=None)
            row = dict(batch=batch_size, mode=mode, identical_token_ids=same_ids)
            for name, fn in sides.items():
                seconds = median_seconds(fn, args.device, args.warmup, args.repeats)
                row[f"{name}_tokens_per_s"] = batch_size * args.new_tokens / seconds
            row["ours_vs_transformers"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
            rows.append(row)
            print(row, file=sys.stderr)
    emit(dict(benchmark="generate_throughput", size=args.size, llm=args.llm, new_tokens=args.new_tokens,
              environment=environment(args.device), rows=rows))


if __name__ == "__main__":
    main()
