"""Padding per useful token in the instruction-tuning mixture: random batches vs length-grouped batches vs packing.

The LLM input of a sample is ``[32 visual] BOS instruction answer EOS``. Batchings compared:

* ``random``: batches in stream order, each right-padded to its longest sample;
* ``length_grouped``: ``instructblip.data.length_grouping.length_grouped_batches``, right-padded;
* ``model_packing``: what the model's LLM computes with ``model.overrides.pack_sequences=true``: each random batch
  packed into rows as long as its longest sample (``instructblip.model.packing.row_layout``, the model's own
  layout code); ``model_packing_grouped``: the same on the length-grouped batches;
* ``packed``: the bound, the whole stream first-fit into rows of the longest sample overall;
* ``encoder_decoder``: the same samples for a T5/FlanT5 LLM, ``[32 visual] instruction </s>`` on the encoder's side
  and ``answer </s>`` on the decoder's: ``random`` batches padded on both sides, and ``model_packing``, the rows
  ``pack_sequences`` packs each random batch into (``instructblip.model.packing.seq2seq_row_layout``), counting
  encoder and decoder positions together;
* ``fixed_buckets`` / ``fixed_buckets_grouped``: what ``stage.module.step_mode=cuda_graph`` trains on (decoder-only
  LLM), each random (length-grouped) batch padded to the first of ``--buckets`` whose width, visual + instruction +
  target - BOS, holds its longest row (``data.fixed_lengths``), rows past the last bucket's lengths truncated
  (``truncated_tokens``); ``fixed_one``: every batch padded to the last bucket alone.

Samples are drawn from the 13 held-in
datasets with the paper's sampling weights (sqrt of the training-set size, A-OKVQA x0.5, OK-VQA x2:
``instructblip.data.mixture.sampling_weights``); each dataset's instruction and answer lengths (LLaMA tokens) come
from the length model below, the public sizes and typical lengths of each dataset (shards are not needed). Prints
one JSON object with tokens of padding per useful token for each batching (``instructblip.data.length_grouping``).

    python experiments/bench/padding.py --batch-sizes 8,16,32 --samples 65536
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from datetime import datetime, timezone

from instructblip.data.length_grouping import length_grouped_batches, pack_first_fit, padding_stats
from instructblip.data.mixture import PAPER_ADJUSTMENTS, sampling_weights
from instructblip.model.packing import row_layout, seq2seq_row_layout

VISUAL_TOKENS = 32
MAX_TEXT_TOKENS = 256 + 128  # the processor's answer and instruction caps (LAVIS max_output_txt_len, max_txt_len)

# name: (training samples, instruction tokens (median, spread), answer tokens incl. EOS (median, spread)).
# Sizes are the public training splits as the converters count them (captions per image for COCO; Web CapFilt
# as the 14M-image BLIP pre-training subset; LLaVA subsets as first human/gpt pair, as LAVIS uses them).
# Lengths: LLaMA tokens, about 1.3 per English word; log-normal with the given median and log-spread.
LENGTH_MODEL = {
    "coco_caption": (566_747, (14, 0.15), (14, 0.25)),
    "web_capfilt": (14_000_000, (14, 0.15), (12, 0.35)),
    "textcaps": (109_765, (14, 0.15), (17, 0.35)),
    "vqav2": (443_757, (16, 0.25), (2, 0.4)),
    "okvqa": (9_009, (18, 0.25), (2, 0.4)),
    "aokvqa": (17_056, (18, 0.25), (2, 0.4)),
    "ocr_vqa": (801_673, (18, 0.2), (5, 0.5)),
    "vqav2_qg": (443_757, (20, 0.2), (10, 0.3)),
    "okvqa_qg": (9_009, (20, 0.2), (12, 0.3)),
    "aokvqa_qg": (17_056, (20, 0.2), (12, 0.3)),
    "llava_conversation": (56_681, (22, 0.35), (75, 0.55)),
    "llava_detail": (23_240, (18, 0.2), (140, 0.3)),
    "llava_complex_reasoning": (76_643, (28, 0.3), (150, 0.35)),
}


def draw_text_lengths(samples: int, seed: int) -> tuple[list[tuple[int, int]], dict[str, float]]:
    """(instruction tokens, answer tokens incl. EOS) of ``samples`` draws from the mixture, and its weights."""
    sizes = {name: size for name, (size, _, _) in LENGTH_MODEL.items()}
    weights = sampling_weights(sizes, strategy="sqrt", adjustments=PAPER_ADJUSTMENTS)
    names = sorted(weights)
    rng = random.Random(seed)
    drawn = []
    for name in rng.choices(names, weights=[weights[n] for n in names], k=samples):
        _, (inst_median, inst_spread), (ans_median, ans_spread) = LENGTH_MODEL[name]
        instruction = max(3, round(inst_median * math.exp(rng.gauss(0.0, inst_spread))))
        answer = max(2, round(ans_median * math.exp(rng.gauss(0.0, ans_spread))))
        answer = min(answer, MAX_TEXT_TOKENS - instruction)
        drawn.append((instruction, answer))
    return drawn, weights



def bucket_padding_stats(drawn: list[tuple[int, int]], batches: list[list[int]], buckets: list[tuple[int, int]]) -> dict:
    """Padding of ``batches`` padded to the first (instruction, target) bucket that holds every row, as
    ``InstructBlipProcessor.with_fixed_lengths`` pads decoder-only rows: a row is BOS + instruction + answer (EOS
    included), truncated to the last bucket's lengths (the answer shares ``target`` with the BOS), and fits a
    bucket whose text width, instruction + target - BOS, holds it."""
    last_instruction, last_target = buckets[-1]
    widths = [instruction + target - 1 for instruction, target in buckets]
    useful = padded = truncated = 0
    used = [0] * len(buckets)
    for batch in batches:
        rows = []
        for instruction, answer in (drawn[i] for i in batch):
            kept = min(1 + instruction, last_instruction) + min(answer, last_target - 1)
            truncated += 1 + instruction + answer - kept
            rows.append(kept)
        index = next((k for k, width in enumerate(widths) if max(rows) <= width), len(buckets) - 1)
        used[index] += 1
        useful += sum(VISUAL_TOKENS + row for row in rows)
        padded += len(rows) * (VISUAL_TOKENS + widths[index])
    return dict(
        useful_tokens=useful,
        padding_tokens=padded - useful,
        padding_per_useful_token=(padded - useful) / useful if useful else 0.0,
        truncated_tokens=truncated,
        batches_per_bucket=used,
    )


def model_packing_stats(lengths: list[int], batches: list[list[int]]) -> dict:
    """Padding of the rows the model packs each batch into (``pack_sequences``): rows x row length - useful."""
    useful = padded = rows = 0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        layout, capacity = row_layout(batch_lengths)
        useful += sum(batch_lengths)
        padded += len(layout) * capacity
        rows += len(layout)
    return dict(
        useful_tokens=useful,
        padding_tokens=padded - useful,
        padding_per_useful_token=(padded - useful) / useful if useful else 0.0,
        rows_per_batch=rows / len(batches),
    )


def encoder_decoder_stats(drawn: list[tuple[int, int]], batches: list[list[int]]) -> dict:
    """Padding of an encoder-decoder LLM's batches (encoder and decoder positions together): each batch padded on
    both sides to its longest sample, and packed as ``pack_sequences`` packs it."""
    useful = padded = packed = 0
    for batch in batches:
        encoder = [VISUAL_TOKENS + drawn[i][0] + 1 for i in batch]
        decoder = [drawn[i][1] + 1 for i in batch]
        rows, encoder_length, decoder_length = seq2seq_row_layout(encoder, decoder)
        useful += sum(encoder) + sum(decoder)
        padded += len(batch) * (max(encoder) + max(decoder))
        packed += len(rows) * (encoder_length + decoder_length)
    return dict(
        useful_tokens=useful,
        random=dict(padding_tokens=padded - useful, padding_per_useful_token=(padded - useful) / useful),
        model_packing=dict(padding_tokens=packed - useful, padding_per_useful_token=(packed - useful) / useful),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--window-batches", type=int, default=64, help="length grouping window, in batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buckets", default="16:17,24:17,32:17,32:33,64:33,64:65,96:97,128:129,128:256",
                        help="data.fixed_lengths buckets as instruction:target token counts, shortest first")
    args = parser.parse_args()
    buckets = [tuple(int(n) for n in bucket.split(":")) for bucket in args.buckets.split(",")]

    drawn, weights = draw_text_lengths(args.samples, args.seed)
    lengths = [VISUAL_TOKENS + 1 + instruction + answer for instruction, answer in drawn]
    capacity = max(lengths)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        usable = len(lengths) - len(lengths) % batch_size
        random_batches = [list(range(i, i + batch_size)) for i in range(0, usable, batch_size)]
        window = args.window_batches * batch_size
        grouped = length_grouped_batches(lengths[: usable - usable % window], batch_size, window, args.seed)
        packed = pack_first_fit(lengths[:usable], capacity)
        row = dict(
            batch=batch_size,
            random=padding_stats(lengths, random_batches),
            length_grouped=padding_stats(lengths, grouped),
            model_packing=model_packing_stats(lengths, random_batches),
            model_packing_grouped=model_packing_stats(lengths, grouped),
            packed=dict(**padding_stats(lengths, packed, row_capacity=capacity), row_capacity=capacity),
            fixed_buckets=bucket_padding_stats(drawn, random_batches, buckets),
            fixed_buckets_grouped=bucket_padding_stats(drawn, grouped, buckets),
            fixed_one=bucket_padding_stats(drawn, random_batches, buckets[-1:]),
            encoder_decoder=encoder_decoder_stats(drawn, random_batches),
        )
        row["padding_reduction_grouped"] = (
            row["random"]["padding_per_useful_token"] / max(row["length_grouped"]["padding_per_useful_token"], 1e-12)
        )
        row["padding_reduction_packed"] = (
            row["random"]["padding_per_useful_token"] / max(row["packed"]["padding_per_useful_token"], 1e-12)
        )
        row["padding_reduction_model_packing"] = (
            row["random"]["padding_per_useful_token"]
            / max(row["model_packing"]["padding_per_useful_token"], 1e-12)
        )
        rows.append(row)
        print(f"batch {batch_size}: padding per useful token random "
              f"{row['random']['padding_per_useful_token']:.3f}, grouped "
              f"{row['length_grouped']['padding_per_useful_token']:.3f}, model packing "
              f"{row['model_packing']['padding_per_useful_token']:.3f} (grouped "
              f"{row['model_packing_grouped']['padding_per_useful_token']:.3f}), packed bound "
              f"{row['packed']['padding_per_useful_token']:.3f}; fixed buckets "
              f"{row['fixed_buckets']['padding_per_useful_token']:.3f} (grouped "
              f"{row['fixed_buckets_grouped']['padding_per_useful_token']:.3f}), one fixed shape "
              f"{row['fixed_one']['padding_per_useful_token']:.3f}; encoder-decoder random "
              f"{row['encoder_decoder']['random']['padding_per_useful_token']:.3f}, model packing "
              f"{row['encoder_decoder']['model_packing']['padding_per_useful_token']:.3f}", file=sys.stderr)
    mean = sum(lengths) / len(lengths)
    json.dump(dict(
        benchmark="padding", samples=len(lengths), window_batches=args.window_batches,
        mean_useful_tokens_per_sample=mean, max_tokens=capacity,
        share_of_long_samples=sum(w for n, w in weights.items() if n.startswith("llava")),
        buckets=[dict(instruction=inst, target=target) for inst, target in buckets],
        sampling_weights=weights, date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=" ".join(["experiments/bench/padding.py", *sys.argv[1:]]), rows=rows,
    ), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
