"""Generated WebDataset shards for the smoke experiment and the training tests.

Each sample is a small image of one coloured shape on a plain background with the facts a template needs, written
in the project's shard format (``jpg`` + ``json`` :class:`~instructblip.data.record.Record`). The answers are
exact (the shape and colour drawn), so a few steps of training visibly lower the loss. Two datasets are written,
a caption-style one and a VQA-style one, so that the mixture, the per-dataset logs and the balanced sampler all
have something to mix. Shards are written with ``webdataset.ShardWriter``; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")

# Registry names the generated data is written under: real datasets of the same task family, so that the real
# templates and registry facts apply unchanged.
CAPTION_DATASET = "coco_caption"
VQA_DATASET = "vqav2"


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size // 2)
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _records(dataset: str, index: int, shape: str, colour: str):
    from instructblip.data.record import Record

    if dataset == CAPTION_DATASET:
        return Record(dataset=dataset, task="caption", id=f"{dataset}-{index:06d}", split="train",
                      image_id=str(index), answers=[f"a {colour} {shape}"])
    return Record(dataset=dataset, task="vqa", id=f"{dataset}-{index:06d}", split="train", image_id=str(index),
                  question=f"what colour is the {shape}?", answers=[colour] * 10)


def write_generated_shards(
    out_dir: str | Path,
    samples_per_dataset: int = 64,
    samples_per_shard: int = 32,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, str]:
    """Write the generated datasets under ``out_dir/<dataset>/`` and return ``{dataset: shard glob}``.

    Idempotent: a dataset whose ``done.json`` marker matches the requested sizes is left as it is.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    globs = {}
    for offset, dataset in enumerate((CAPTION_DATASET, VQA_DATASET)):
        target = out_dir / dataset
        marker = target / "done.json"
        wanted = {"samples": samples_per_dataset, "per_shard": samples_per_shard, "size": image_size, "seed": seed}
        globs[dataset] = str(target / "shard-*.tar")
        if marker.exists() and json.loads(marker.read_text()) == wanted:
            continue
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("shard-*.tar"):
            old.unlink()
        rng = random.Random(seed * 1000 + offset)
        with wds.ShardWriter(str(target / "shard-%05d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
            for index in range(samples_per_dataset):
                shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
                record = _records(dataset, index, shape, colour)
                sink.write({"__key__": record.id, "jpg": _draw(shape, COLOURS[colour], image_size, rng),
                            "json": record.to_json()})
        marker.write_text(json.dumps(wanted))
    return globs
