"""``instructblip-generate checkpoint=DIR_OR_FILE image=PATH prompt='TEXT'``: answer one instruction about one
image (or one video: ``image=[f0.jpg,f1.jpg,f2.jpg,f3.jpg]``); the answer is the LAST line of stdout.

``checkpoint`` is a Hugging Face InstructBLIP directory (also what this project exports), a LAVIS ``.pth`` (with
``model=instructblip-vicuna7b vision=eva_vit_g.pth llm=vicuna-7b/``, or ``config=config.json`` instead of ``model=``
for other sizes), or weights written by ``instructblip-train``
(``.ckpt`` / ``trainable.safetensors``, with ``base=`` the checkpoint the run started from).

Generation settings: ``num_beams max_new_tokens min_new_tokens do_sample top_p temperature repetition_penalty
length_penalty``. Each one the user leaves out comes from the checkpoint's ``generation_config.json`` when it sets
it, else from LAVIS's ``generate`` defaults (beam 5, 256 new tokens, min 1, top_p 0.9, repetition penalty 1.5,
length penalty 1, temperature 1, no sampling). ``seed`` seeds sampling. Prompts with commas need Hydra quoting:
``prompt="'red, green or blue?'"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from instructblip.cli._common import open_model, require, run_hydra_app
from instructblip.errors import DataError

PROG = "instructblip-generate"
USAGE = f"{PROG} checkpoint=DIR_OR_FILE image=PATH prompt='TEXT' [num_beams=5 max_new_tokens=256 ...]"
SETTINGS = (
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "top_p",
    "temperature",
    "repetition_penalty",
    "length_penalty",
)


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING
    image: Any = MISSING  # one path, or a list of frame paths (video)
    prompt: str = ""
    model: Optional[str] = None  # LAVIS .pth: the released configuration, e.g. instructblip-vicuna7b
    vision: Optional[str] = None  # LAVIS .pth: EVA ViT weights (eva_vit_g.pth or an open_clip/timm EVA file)
    llm: Optional[str] = None  # LAVIS .pth: the Hugging Face LLaMA/Vicuna or FlanT5 directory
    config: Optional[str] = None  # LAVIS .pth of other sizes: a Hugging Face InstructBLIP config.json, not model=
    base: Optional[str] = None  # trained weights: the checkpoint the run started from
    device: Optional[str] = None  # cpu, cuda, cuda:1 ... (default: the model's placement policy)
    seed: int = 0
    num_beams: Optional[int] = None
    max_new_tokens: Optional[int] = None
    min_new_tokens: Optional[int] = None
    do_sample: Optional[bool] = None
    top_p: Optional[float] = None
    temperature: Optional[float] = None
    repetition_penalty: Optional[float] = None
    length_penalty: Optional[float] = None


def read_image(path: str):
    """A PIL image, fully decoded here so that a corrupt file fails now, naming the file."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"image={file}: no such file")
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL reports truncation as OSError/SyntaxError
        raise DataError(f"image={file}: not a readable image ({' '.join(str(error).split())})") from error


def checkpoint_generation_config(checkpoint: str) -> dict[str, Any]:
    """The settings a checkpoint's ``generation_config.json`` states explicitly (transformers writes only those)."""
    path = Path(checkpoint).expanduser() / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        stated = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    return {key: stated[key] for key in SETTINGS if stated.get(key) is not None}


def generation_settings(cfg) -> dict[str, Any]:
    settings = checkpoint_generation_config(cfg.checkpoint)
    settings.update({key: cfg[key] for key in SETTINGS if cfg[key] is not None})
    return settings


def generate(cfg) -> str:
    import torch

    require(PROG, cfg, ("checkpoint", "image"), USAGE)
    paths = list(cfg.image) if not isinstance(cfg.image, str) else [cfg.image]
    frames = [read_image(str(p)) for p in paths]
    visual = frames[0] if len(frames) == 1 else frames
    model = open_model(cfg.checkpoint, cfg.model, cfg.vision, cfg.llm, cfg.base, cfg.device, cfg.config)
    torch.manual_seed(cfg.seed)
    (answer,) = model.generate([visual], [cfg.prompt], **generation_settings(cfg))
    return answer


def _main(cfg) -> None:
    answer = generate(cfg)
    print(" ".join(answer.splitlines()))  # one line, so that the last line of stdout is the whole answer


def main() -> None:
    run_hydra_app(PROG, GenerateConfig, _main)


if __name__ == "__main__":
    main()
