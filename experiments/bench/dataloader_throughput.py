"""Dataloader throughput: samples per second per CPU core, from tar shards to the model batch.

Writes its own synthetic shards to a temporary directory (nothing is downloaded), then runs each case in ONE
process with ``torch.set_num_threads(1)`` (so the figure is per core; multiply by the DataLoader workers you give
each GPU), through exactly the training path:

    read_shards (tar, JSON record, JPEG decode)  ->  Collator("train"): template draw, training image transform,
    Q-Former (BERT) tokenizer and LLM tokenizer  ->  the model batch

Cases: ``vqa`` (short-answer VQA: a question, 10 one-word answers) and ``llava`` (LLaVA-style multi-turn
conversations with long answers), each with a decoder-only (LLaMA/Vicuna-style) and an encoder-decoder (T5-style)
processor. Two figures per case: ``decode`` (read_shards alone) and ``full_<llm kind>`` (through the collator),
measured in samples per CPU-second of the process (the per-core figure, robust to other processes on the machine)
and, as ``*_wall``, per wall-clock second.

The processors come from ``--checkpoint-llama`` / ``--checkpoint-t5`` (any Hugging Face InstructBLIP directory,
e.g. the released ones for their real tokenizers) or, by default, from ``instructblip.testing.make_tiny_checkpoint``
at the real image size (224; its tokenizers are small BPE/Unigram models, so tokenizing costs about what a real
one does per character, but produces more tokens).

    .venv/bin/python experiments/bench/dataloader_throughput.py [--samples 400] [--batch-size 32]
        [--image-width 640 --image-height 480] [--llava-turns 6] [--answer-words 60]

Prints one JSON object (last line of stdout).
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from instructblip.data.collate import Collator
from instructblip.data.record import Record
from instructblip.data.shards import read_shards

WORDS = (
    "the a man woman dog cat red blue green table street car tree sky people standing sitting holding next to "
    "near behind large small white black wooden building window picture image shows scene there is are two three "
    "playing walking bus train kitchen food plate field grass water boat bird horse sign light road city"
).split()


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth colour regions plus sensor-like noise: compresses like a photo (tens to ~150 KB), not like pure noise."""
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def vqa_record(rng: random.Random, index: int) -> Record:
    answers = [rng.choice(WORDS) for _ in range(10)]
    return Record(dataset="vqav2", task="vqa", id=f"vqa_{index}", split="train2014",
                  question=sentence(rng, 7)[:-1] + "?", answers=answers)


def llava_record(rng: random.Random, index: int, turns: int, answer_words: int) -> Record:
    conversation = []
    for turn in range(turns):
        question = ("<image>\n" if turn == 0 else "") + sentence(rng, 10)[:-1] + "?"
        answer = " ".join(sentence(rng, 12) for _ in range(max(1, answer_words // 12)))
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return Record(dataset="llava_conversation", task="conversation", id=f"llava_{index}", split="train",
                  conversation=conversation)


def write_case(root: Path, case: str, args) -> list[str]:
    rng, np_rng = random.Random(case), np.random.default_rng(len(case))
    # a pool of distinct images, reused: JPEG encoding here is not what is measured
    images = [photo_like_jpeg(np_rng, args.image_width, args.image_height) for _ in range(16)]
    paths = []
    per_shard = 100
    for shard in range(0, args.samples, per_shard):
        path = root / f"{case}-{shard // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(shard, min(shard + per_shard, args.samples)):
                record = (vqa_record(rng, index) if case == "vqa"
                          else llava_record(rng, index, args.llava_turns, args.answer_words))
                writer.write({"__key__": record.id, "jpg": images[index % len(images)], "json": record.to_json()})
        paths.append(str(path))
    return paths


def processor_for(kind: str, checkpoint: str | None, workdir: Path):
    from instructblip.processing import InstructBlipProcessor

    if checkpoint is None:
        from instructblip.testing import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(workdir / f"tiny-{kind}", llm=kind, image_size=224)
    return InstructBlipProcessor.from_pretrained(checkpoint)


def samples_per_second(run, samples: int, repeats: int) -> tuple[float, float]:
    """(samples per CPU-second, samples per wall-second), each the best of ``repeats`` passes. CPU time of this
    process is the per-core figure, and it stays meaningful on a shared, loaded machine where wall time does not."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        run()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return samples / best_cpu, samples / best_wall


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400, help="samples per case")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-width", type=int, default=640)
    parser.add_argument("--image-height", type=int, default=480)
    parser.add_argument("--llava-turns", type=int, default=6, help="human/gpt exchanges per LLaVA sample")
    parser.add_argument("--answer-words", type=int, default=60, help="words per LLaVA answer")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per figure (the best is reported)")
    parser.add_argument("--checkpoint-llama", default=None, help="HF InstructBLIP dir with a decoder-only LLM")
    parser.add_argument("--checkpoint-t5", default=None, help="HF InstructBLIP dir with a T5 LLM")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core: no tokenizer thread pool either
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="dataloader-bench-") as tmp:
        workdir = Path(tmp)
        processors = {"decoder_only": processor_for("llama", args.checkpoint_llama, workdir),
                      "encoder_decoder": processor_for("t5", args.checkpoint_t5, workdir)}
        for case in ("vqa", "llava"):
            paths = write_case(workdir, case, args)
            mean_kb = sum(os.path.getsize(p) for p in paths) / args.samples / 1024
            decode = samples_per_second(lambda: sum(1 for _ in read_shards(paths)), args.samples, args.repeats)
            entry = {"decode": round(decode[0], 1), "decode_wall": round(decode[1], 1),
                     "mean_sample_kb": round(mean_kb, 1)}
            for kind, processor in processors.items():
                collate = Collator(processor, "train", seed=0)

                def full_pass(collate=collate):
                    examples = iter(read_shards(paths))
                    while batch := list(itertools.islice(examples, args.batch_size)):
                        collate(batch)

                full = samples_per_second(full_pass, args.samples, args.repeats)
                entry[f"full_{kind}"] = round(full[0], 1)
                entry[f"full_{kind}_wall"] = round(full[1], 1)
                last = collate(list(itertools.islice(iter(read_shards(paths)), args.batch_size)))
                entry[f"tokens_per_row_{kind}"] = round(float(last["attention_mask"].sum(1).float().mean()), 1)
            results[case] = entry

    report = {
        "benchmark": "dataloader_throughput",
        "unit": "samples per CPU-second of one process with torch.set_num_threads(1) (= per core); *_wall: per "
                "wall-clock second of the same pass, lower when the machine is shared",
        "results": results,
        "settings": {k: v for k, v in vars(args).items()},
        "machine": {"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
