"""``instructblip-convert src=... dst=...``: move an InstructBLIP between checkpoint layouts.

* LAVIS -> Hugging Face: ``src=instruct_blip_vicuna7b_trimmed.pth model=instructblip-vicuna7b vision=eva_vit_g.pth
  llm=vicuna-7b-v1.1/ dst=out/`` (or ``config=config.json`` instead of ``model=`` for other sizes). ``dst`` is then
  what ``transformers.InstructBlipForConditionalGeneration.from_pretrained`` and ``instructblip-generate`` load;
  ``<image>`` is added to the tokenizer and ``image_token_index`` to the config, as transformers >= 4.47 expects.
* Hugging Face -> LAVIS: ``src=hf_dir/ dst=lavis_dir/`` writes ``instruct_blip_trimmed.pth`` ({"model": the trained
  tensors}), ``eva_vit.pth`` (eva_vit_g.pth keys) and ``llm/`` (the Hugging Face LLM with its tokenizer).
* Weights written by ``instructblip-train`` (a Lightning ``.ckpt`` or ``trainable.safetensors``) -> Hugging Face:
  ``src=run/checkpoints/last.ckpt base=<the run's model.pretrained> dst=out/``.

``from=lavis|hf|trained`` and ``to=hf|lavis`` are inferred from ``src`` when left out. The Hugging Face layout has
one vision LayerNorm eps (``layer_norm_eps``, 1e-6) for ``post_layernorm`` too, so a LAVIS checkpoint exported to it
runs with 1e-6 where LAVIS's ``ln_vision`` used 1e-5 (the hub conversion made the same choice; logits agree to
~1e-5). ``dst`` must be empty or absent unless ``overwrite=true``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import MISSING

from instructblip.cli._common import checkpoint_kind, open_model, require, run_hydra_app
from instructblip.errors import ConfigError

PROG = "instructblip-convert"
USAGE = (
    f"{PROG} src=CHECKPOINT dst=DIR [from=lavis|hf|trained] [to=hf|lavis] [model=NAME vision=PATH llm=DIR] "
    "[base=DIR]"
)
SCHEMA = {
    "src": MISSING,
    "dst": MISSING,
    "from": None,  # lavis | hf | trained (inferred from src)
    "to": None,  # hf | lavis (default: hf, or lavis when src is a Hugging Face directory)
    "model": None,  # LAVIS: released configuration name
    "config": None,  # LAVIS: a Hugging Face InstructBLIP config.json giving the sizes instead of model=
    "vision": None,  # LAVIS: EVA ViT weights
    "llm": None,  # LAVIS: Hugging Face LLM directory
    "qformer_tokenizer": None,  # LAVIS: bert-base-uncased tokenizer directory (default: the offline copy + [DEC])
    "base": None,  # trained weights: the checkpoint the run started from
    "overwrite": False,
}
KINDS = {"lavis": ("hf",), "hf": ("lavis",), "trained": ("hf",)}


def convert(cfg) -> str:
    from tqdm.auto import tqdm

    from instructblip.checkpoint import lavis

    require(PROG, cfg, ("src", "dst"), USAGE)
    src, dst = Path(str(cfg.src)).expanduser(), Path(str(cfg.dst)).expanduser()
    source = cfg["from"] or checkpoint_kind(src)
    if source not in KINDS:
        raise ConfigError(f"from={source!r}; allowed: {', '.join(KINDS)}")
    target = cfg.to or KINDS[source][0]
    if target not in KINDS[source]:
        allowed = "|".join(KINDS[source])
        raise ConfigError(f"from={source} to={target} is not a conversion; from={source} allows to={allowed}")
    if dst.exists() and any(dst.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"dst={dst} is not empty; choose another directory or pass overwrite=true")

    steps = tqdm(total=2, desc=f"{source} -> {target}", unit="step", disable=None)
    if source == "lavis":
        if not (cfg.vision and cfg.llm):
            raise ConfigError(
                f"src={src} is a LAVIS .pth holding only the trained parts: also give vision=<eva_vit_g.pth> and "
                "llm=<Hugging Face LLM directory> (and model=<released name> or config=<config.json>)"
            )
        checkpoint = lavis.load_lavis(src, cfg.vision, cfg.llm, cfg.model, cfg.config, cfg.qformer_tokenizer)
        steps.update()
        lavis.save_hf(checkpoint, dst)
        summary = f"Hugging Face InstructBLIP ({_count(checkpoint.state_dict)}) in {dst}"
    elif source == "hf":
        checkpoint = lavis.load_hf(src)
        steps.update()
        parts = lavis.save_lavis(checkpoint, dst)
        summary = "LAVIS InstructBLIP in " + ", ".join(str(path) for path in parts.values())
    else:
        model = open_model(str(src), base=cfg.base)
        steps.update()
        model.save_pretrained(dst)
        summary = f"Hugging Face InstructBLIP ({_count(dict(model.state_dict()))}) in {dst}"
    steps.update()
    steps.close()
    return summary


def _count(state_dict) -> str:
    parameters = sum(t.numel() for t in state_dict.values())
    return f"{len(state_dict)} tensors, {parameters / 1e6:.2f}M parameters"


def _main(cfg) -> None:
    print(f"wrote {convert(cfg)}")


def main() -> None:
    run_hydra_app(PROG, SCHEMA, _main)


if __name__ == "__main__":
    main()
