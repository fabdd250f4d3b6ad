"""Data-loader throughput, ours against transformers: samples per CPU-second from tar shards to the model batch.

Writes its own synthetic shards to a temporary directory (nothing is downloaded) and builds both processors offline
from the same tiny Hugging Face InstructBLIP directory (``instructblip.testing.make_tiny_checkpoint`` at the real
image size, 224 px, and the real 32 query tokens; or ``--checkpoint-llama`` / ``--checkpoint-t5``): ours with
``instructblip.processing.InstructBlipProcessor.from_pretrained(dir)``, transformers' with
``transformers.InstructBlipProcessor.from_pretrained(dir)`` (its ``BlipImageProcessor``, the LLM tokenizer and the
Q-Former's BERT tokenizer from the same files). Every side runs the same stages on the same samples:

    decode:  read_shards (tar, JSON record, JPEG decode), shared code; each sample gets a seed (as the training
             mixture gives it), so both sides draw the same template and target: the same instruction and answer
    then, per batch of --batch-size samples:
    ours:              Collator("train", augment=False): render(record, Random(seed)), then
                       processor.training_batch: eval image transform (PIL bicubic resize to 224, rescale,
                       normalise; = LAVIS blip_image_eval), Q-Former tokenizer, LLM tokenizer, labels
    ours_augmented:    Collator("train"), the real training path: the same, with the training image transform
                       (RandomResizedCrop(scale 0.5-1) + horizontal flip; = LAVIS blip2_image_train)
    transformers:      render(...) as above, then what a hand-rolled transformers training script does:
                       processor(images=..., text=instructions, padding="longest", padding_side="right",
                       truncation=True) for pixels, Q-Former ids and the prompt ([<image>] x 32 + BOS +
                       instruction; "right": the processor gives the LLM tokenizer's settings to the Q-Former
                       tokenizer too, and Vicuna's left padding would shift BERT's positions), the LLM tokenizer for the
                       answers (LAVIS's way: answer + eos_token, truncated on the right), then prompt + answer
                       rows padded with torch's pad_sequence and labels (-100 on image tokens, prompt, padding);
                       T5: the processor for the encoder prompt, the tokenizer for the labels.
                       Image processor as from_pretrained gives it: BlipImageProcessor (torchvision backend)
    transformers_pil:  the same with backend="pil" (BlipImageProcessorPil: LAVIS's pixels to 1e-6)

transformers' image processors have no augmentation, so the like-for-like ratio is ``ours_vs_transformers`` (ours
with the eval transform); ``ours_augmented_vs_transformers`` compares the real training path. transformers'
tokenizers get LAVIS's limits as configuration (``model_max_length`` 128 for the instruction on both tokenizers,
truncation on the left; answers 256 on the right), so both sides produce the same ids.

Before timing, ``check_agreement`` compares one batch of every case: Q-Former ids and masks identical; LLM ids,
masks and labels identical once transformers' 32 ``<image>`` placeholders (the first 32 positions; our batch holds
text tokens only, the model prepends the queries itself) are set aside; pixels within 1e-5 of the PIL backend and
within one uint8 step (max) of the torchvision backend, which resizes tensors rather than PIL images; the augmented
side's text identical to ours. A mismatch stops the benchmark.

Timing: ``common.time_sides`` (warm-up, the sides in turns with the order flipped every round, medians), one
intra-op thread, process CPU time (robust to other jobs on the machine; ratios use it) and wall time (``*_wall``).
A side's pass is the whole shard set, decode included; ``decode`` alone is timed beside them, and
``*_excluding_decode`` ratios subtract its median from both sides (the part that differs). ``stage_ms_per_sample``
times the image transform alone and the text work alone on one decoded batch, to show where the sides differ.

    .venv/bin/python experiments/bench/dataloader_throughput.py [--samples 32] [--batch-size 32] [--repeats 7]
        [--image-width 640 --image-height 480] [--llava-turns 6] [--answer-words 60]

Prints one JSON object (``rows``: one per case and LLM kind).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, environment, setup_device, time_sides  # noqa: E402

from instructblip.data.collate import Collator  # noqa: E402
from instructblip.data.record import Record  # noqa: E402
from instructblip.data.shards import Example, read_shards  # noqa: E402
from instructblip.data.templates import render  # noqa: E402

CASES = ("vqa", "llava")
LLM_KINDS = {"decoder_only": "llama", "encoder_decoder": "t5"}
SIDES = ("decode", "ours", "ours_augmented", "transformers", "transformers_pil")
# (numerator, denominator) of the reported speed ratios
RATIOS = (("ours", "transformers"), ("ours", "transformers_pil"), ("ours_augmented", "transformers"))
# Pixel tolerances of the agreement check. The PIL backend resizes as ours does; the torchvision backend resizes a
# uint8 tensor, which lands up to one uint8 step away: 1/255 over the smallest CLIP std (0.2613) = 0.0150.
PIXEL_TOLERANCE = {"transformers_pil": 1e-5, "transformers": 1.0 / 255 / 0.26 + 1e-4}

WORDS = (
    "the a man woman dog cat red blue green table street car tree sky people standing sitting holding next to "
    "near behind large small white black wooden building window picture image shows scene there is are two three "
    "playing walking bus train kitchen food plate field grass water boat bird horse sign light road city"
).split()


# ------------------------------------------------------------------------------------------------ synthetic shards


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


def write_case(root: Path, case: str, samples: int, image_size: tuple[int, int] = (640, 480),
               llava_turns: int = 6, answer_words: int = 60) -> list[str]:
    """Shards of ``samples`` synthetic ``case`` samples ("vqa" or "llava") under ``root``; returns their paths."""
    rng, np_rng = random.Random(case), np.random.default_rng(len(case))
    # a pool of distinct images, reused: JPEG encoding here is not what is measured
    images = [photo_like_jpeg(np_rng, *image_size) for _ in range(16)]
    paths = []
    per_shard = 100
    for shard in range(0, samples, per_shard):
        path = root / f"{case}-{shard // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(shard, min(shard + per_shard, samples)):
                record = (vqa_record(rng, index) if case == "vqa"
                          else llava_record(rng, index, llava_turns, answer_words))
                writer.write({"__key__": record.id, "jpg": images[index % len(images)], "json": record.to_json()})
        paths.append(str(path))
    return paths


def seeded_examples(paths: Sequence[str]) -> Iterator[Example]:
    """Decoded samples, each with a seed as the training mixture gives it: both sides draw the same text."""
    for index, example in enumerate(read_shards(paths)):
        yield example._replace(seed=index)


# ------------------------------------------------------------------------------------------------ the two sides


def build_processors(llm: str, workdir: Path, checkpoint: str | None = None) -> dict:
    """Ours and transformers' (torchvision and PIL image backends) from the same Hugging Face directory."""
    from transformers import InstructBlipProcessor as HFInstructBlipProcessor

    from instructblip.processing import InstructBlipProcessor

    if checkpoint is None:
        from instructblip.testing import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(workdir / f"tiny-{llm}", llm=llm, image_size=224, num_query_tokens=32)
    ours = InstructBlipProcessor.from_pretrained(checkpoint)
    processors = {"ours": ours}
    for name, backend in (("transformers", None), ("transformers_pil", "pil")):
        theirs = HFInstructBlipProcessor.from_pretrained(checkpoint, **({"backend": backend} if backend else {}))
        # LAVIS's limits as tokenizer configuration: the processor passes one set of text kwargs to both tokenizers
        # (and shortens an explicit max_length by the query tokens for the LLM), so model_max_length it is.
        theirs.qformer_tokenizer.model_max_length = ours.max_qformer_length
        theirs.qformer_tokenizer.truncation_side = "left"
        theirs.tokenizer.model_max_length = ours.max_instruction_length
        theirs.tokenizer.truncation_side = "left"
        processors[name] = theirs
    return processors


def transformers_batch(processor, llm_kind: str, images: list | None, instructions: list[str], targets: list[str],
                       max_target_length: int = 256) -> dict[str, torch.Tensor]:
    """A training batch the way a hand-rolled transformers script builds it (see the module docstring). Without
    images (the stage breakdown's text part) the processor adds no ``<image>`` placeholders."""
    tokenizer = processor.tokenizer
    # padding_side="right": the processor hands the LLM tokenizer's settings to the Q-Former's tokenizer too, so a
    # left-padding LLM tokenizer (Vicuna's) would left-pad the Q-Former ids, shifting BERT's absolute positions
    prompt = processor(images=images, text=instructions, padding="longest", padding_side="right", truncation=True,
                       return_tensors="pt")
    tokenizer.truncation_side = "right"  # answers keep their beginning (LAVIS switches the side the same way)
    try:
        if llm_kind == "decoder_only":
            # LAVIS: answer + "</s>" tokenized with BOS at max 256, BOS dropped = without it at max 255
            answers = tokenizer([t + tokenizer.eos_token for t in targets], add_special_tokens=False,
                                truncation=True, max_length=max_target_length - 1)["input_ids"]
        else:
            answers = tokenizer(targets, padding="longest", truncation=True, max_length=max_target_length,
                                return_tensors="pt")
    finally:
        tokenizer.truncation_side = "left"
    batch = {key: prompt[key] for key in ("qformer_input_ids", "qformer_attention_mask")}
    if images is not None:
        batch["pixel_values"] = prompt["pixel_values"]
    if llm_kind == "decoder_only":
        rows, label_rows = [], []
        for ids, mask, answer in zip(prompt["input_ids"], prompt["attention_mask"], answers):
            prompt_ids = ids[mask.bool()]  # drop the prompt's padding, keep the <image> placeholders
            answer_ids = torch.tensor(answer, dtype=torch.long)
            rows.append(torch.cat([prompt_ids, answer_ids]))
            label_rows.append(torch.cat([torch.full_like(prompt_ids, -100), answer_ids]))
        pad = torch.nn.utils.rnn.pad_sequence
        batch["input_ids"] = pad(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
        batch["attention_mask"] = pad([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
        batch["labels"] = pad(label_rows, batch_first=True, padding_value=-100)
    else:
        batch["input_ids"], batch["attention_mask"] = prompt["input_ids"], prompt["attention_mask"]
        batch["labels"] = answers["input_ids"].masked_fill(answers["attention_mask"] == 0, -100)
        batch["decoder_attention_mask"] = answers["attention_mask"]
    return batch


def transformers_collate(processor, llm_kind: str, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """The transformers side's collate: the same template draw as ours, then ``transformers_batch``."""
    rendered = [render(example.record, random.Random(example.seed)) for example in examples]
    return transformers_batch(processor, llm_kind, [example.images[0] for example in examples],
                              [r.instruction for r in rendered], [r.target for r in rendered])


def make_sides(processors: dict, paths: Sequence[str], batch_size: int) -> dict:
    """One pass over the shards per call, for every side in SIDES."""
    ours = processors["ours"]
    collators = {"ours": Collator(ours, "train", augment=False), "ours_augmented": Collator(ours, "train")}

    def batches():
        examples = seeded_examples(paths)
        while batch := list(itertools.islice(examples, batch_size)):
            yield batch

    def ours_pass(collate):
        def run():
            for batch in batches():
                collate(batch)
        return run

    def transformers_pass(processor):
        def run():
            for batch in batches():
                transformers_collate(processor, ours.llm_kind, batch)
        return run

    def decode_pass():
        for _ in seeded_examples(paths):
            pass

    return {
        "decode": decode_pass,
        "ours": ours_pass(collators["ours"]),
        "ours_augmented": ours_pass(collators["ours_augmented"]),
        "transformers": transformers_pass(processors["transformers"]),
        "transformers_pil": transformers_pass(processors["transformers_pil"]),
    }


def stage_breakdown(processors: dict, examples: Sequence[Example], warmup: int, repeats: int) -> dict:
    """CPU milliseconds per sample of the image transform alone and of the text work alone (tokenizers, rows,
    labels; the template is drawn beforehand) on one decoded batch, timed by ``time_sides``: where the sides differ."""
    ours = processors["ours"]
    images = [example.images[0] for example in examples]
    rendered = [render(example.record, random.Random(example.seed)) for example in examples]
    instructions, targets = [r.instruction for r in rendered], [r.target for r in rendered]
    theirs = processors["transformers"]
    parts = {
        "image_ours": lambda: ours.pixel_values(images),
        "image_ours_augmented": lambda: ours.pixel_values(images, train=True),
        "image_transformers": lambda: processors["transformers"].image_processor(images, return_tensors="pt"),
        "image_transformers_pil": lambda: processors["transformers_pil"].image_processor(images, return_tensors="pt"),
        "text_ours": lambda: ours.training_batch(None, instructions, targets),
        "text_transformers": lambda: transformers_batch(theirs, ours.llm_kind, None, instructions, targets),
    }
    timings = time_sides(parts, "cpu", warmup, repeats)
    return {name: round(timing.cpu_s / len(examples) * 1000, 3) for name, timing in timings.items()}


# ------------------------------------------------------------------------------------------------ agreement


class Disagreement(AssertionError):
    """The two sides produced different batches: the benchmark refuses to time them."""


def _require(condition, message: str) -> None:
    if not condition:  # an explicit raise, not ``assert``: the check must hold under ``python -O`` as well
        raise Disagreement(message)


def check_agreement(processors: dict, examples: Sequence[Example]) -> dict:
    """Compare one batch of every side (see the module docstring); raise :class:`Disagreement` on a mismatch, else
    return the measured differences."""
    ours_processor = processors["ours"]
    kind, queries = ours_processor.llm_kind, ours_processor.num_query_tokens
    ours = Collator(ours_processor, "train", augment=False)(examples)
    augmented = Collator(ours_processor, "train")(examples)
    meta = ours.pop("meta")
    augmented.pop("meta")
    report = {}
    for key in ours:
        if key != "pixel_values":
            _require(torch.equal(augmented[key], ours[key]), f"ours_augmented: {key} differs from ours")
    _require(augmented["pixel_values"].shape == ours["pixel_values"].shape, "ours_augmented: pixel shape differs")
    for name in ("transformers", "transformers_pil"):
        theirs = transformers_collate(processors[name], kind, examples)
        image_id = processors[name].tokenizer.convert_tokens_to_ids(processors[name].image_token.content)
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            _require(torch.equal(theirs[key], ours[key]), f"{name}: {key} differs from ours")
        _require((theirs["input_ids"][:, :queries] == image_id).all(),
                 f"{name}: the first {queries} LLM positions are not the <image> placeholder (id {image_id})")
        _require((theirs["attention_mask"][:, :queries] == 1).all(), f"{name}: <image> placeholders masked out")
        text_part = {"input_ids": theirs["input_ids"][:, queries:],
                     "attention_mask": theirs["attention_mask"][:, queries:]}
        if kind == "decoder_only":
            _require((theirs["labels"][:, :queries] == -100).all(), f"{name}: labels on <image> placeholders")
            text_part["labels"] = theirs["labels"][:, queries:]
        else:
            text_part["labels"] = theirs["labels"]
            text_part["decoder_attention_mask"] = theirs["decoder_attention_mask"]
        for key, value in text_part.items():
            same_shape = value.shape == ours[key].shape
            rows = [i for i in range(len(value)) if not (same_shape and torch.equal(value[i], ours[key][i]))]
            _require(not rows, f"{name}: LLM {key} (after the {queries} <image> placeholders) differs from ours in "
                               f"rows {rows}; first: {meta['ids'][rows[0]] if rows else ''}")
        _require(theirs["pixel_values"].shape == ours["pixel_values"].shape, f"{name}: pixel shape differs")
        difference = (theirs["pixel_values"] - ours["pixel_values"]).abs()
        _require(difference.max() <= PIXEL_TOLERANCE[name],
                 f"{name}: pixel values differ by up to {difference.max():.3g} (tolerance {PIXEL_TOLERANCE[name]:.3g})")
        report[name] = {"pixel_max_abs_diff": float(difference.max()), "pixel_mean_abs_diff": float(difference.mean()),
                        "qformer_ids_identical": True, "llm_text_ids_identical": True,
                        "labels_identical": True, "image_placeholders": queries}
    report["tokens_per_row"] = round(float(ours["attention_mask"].sum(1).float().mean()), 1)
    report["qformer_tokens_per_row"] = round(float(ours["qformer_attention_mask"].sum(1).float().mean()), 1)
    # rows whose instruction reached the 128-token limit (and was cut on the left, on both sides alike)
    report["truncated_instructions"] = int((ours["qformer_attention_mask"].sum(1) >= ours_processor.max_qformer_length)
                                           .sum())
    return report


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="samples per case (one timed pass)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-width", type=int, default=640)
    parser.add_argument("--image-height", type=int, default=480)
    parser.add_argument("--llava-turns", type=int, default=6, help="human/gpt exchanges per LLaVA sample")
    parser.add_argument("--answer-words", type=int, default=60, help="words per LLaVA answer")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per side (the median is reported)")
    parser.add_argument("--checkpoint-llama", default=None, help="HF InstructBLIP dir with a decoder-only LLM")
    parser.add_argument("--checkpoint-t5", default=None, help="HF InstructBLIP dir with a T5 LLM")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core: no tokenizer thread pool either
    setup_device("cpu", 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dataloader-bench-") as tmp:
        workdir = Path(tmp)
        processors = {kind: build_processors(llm, workdir, getattr(args, f"checkpoint_{llm}"))
                      for kind, llm in LLM_KINDS.items()}
        for case in CASES:
            paths = write_case(workdir, case, args.samples, (args.image_width, args.image_height),
                               args.llava_turns, args.answer_words)
            mean_kb = sum(os.path.getsize(p) for p in paths) / args.samples / 1024
            for kind, sides_processors in processors.items():
                sample = list(itertools.islice(seeded_examples(paths), args.batch_size))
                agreement = check_agreement(sides_processors, sample)
                timings = time_sides(make_sides(sides_processors, paths, args.batch_size), "cpu",
                                     args.warmup, args.repeats)
                row = {"batch": args.batch_size, "mode": f"{case}, {kind}", "case": case, "llm_kind": kind,
                       "samples_per_pass": args.samples, "mean_sample_kb": round(mean_kb, 1),
                       "agreement": agreement, "sides": {},
                       "stage_ms_per_sample": stage_breakdown(sides_processors, sample, args.warmup, args.repeats)}
                for name, timing in timings.items():
                    row["sides"][name] = {"samples_per_s": args.samples / timing.cpu_s,
                                          "samples_per_s_wall": args.samples / timing.wall_s, **timing.as_dict()}
                decode = timings["decode"]
                for mine, theirs in RATIOS:
                    key = f"{mine}_vs_{theirs}"
                    row[key] = timings[theirs].cpu_s / timings[mine].cpu_s
                    row[f"{key}_wall"] = timings[theirs].wall_s / timings[mine].wall_s
                    row[f"{key}_excluding_decode"] = ((timings[theirs].cpu_s - decode.cpu_s)
                                                      / (timings[mine].cpu_s - decode.cpu_s))
                rows.append(row)
                print(f"{case:6s} {kind:16s} " + "  ".join(
                    f"{n} {row['sides'][n]['samples_per_s']:.1f}/s" for n in SIDES)
                    + f"  ours/transformers {row['ours_vs_transformers']:.2f}x", file=sys.stderr, flush=True)

    result = {
        "benchmark": "dataloader_throughput",
        "unit": "samples per CPU-second of one process with one intra-op thread (= per core), median of the "
                "passes; *_wall: per wall-clock second of the same passes (lower when the machine is shared). "
                "Ratios: transformers' seconds over ours (> 1: ours is faster), CPU time unless *_wall",
        "stages": {
            "decode": "read_shards: tar, JSON record, JPEG decode (PIL); a seed per sample",
            "ours": "decode + Collator('train', augment=False): template draw, eval image transform (PIL bicubic "
                    "resize, rescale, normalise), Q-Former and LLM tokenizers, labels",
            "ours_augmented": "decode + Collator('train'): the same with RandomResizedCrop(0.5-1) + flip (the "
                              "training path)",
            "transformers": "decode + the same template draw + transformers.InstructBlipProcessor (from_pretrained: "
                            "BlipImageProcessor, torchvision backend) for pixels, Q-Former ids and prompt "
                            "(32 <image> + BOS + instruction), the LLM tokenizer for answers, pad_sequence + labels",
            "transformers_pil": "as transformers, with backend='pil' (BlipImageProcessorPil)",
        },
        "stage_ms_per_sample": "CPU ms per sample on one decoded batch: image_*: the image transform alone "
                               "(ours.pixel_values / the image processor), text_*: template draw excluded, "
                               "tokenizers + rows + labels (transformers' without <image> placeholders)",
        "rows": rows,
        "settings": vars(args),
        "environment": environment("cpu"),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
