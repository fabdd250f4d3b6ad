"""What the command-line entry points share: the Hydra app around a typed schema, one-line errors, and opening
any checkpoint a user can point at.

Errors a user can cause (the project's exception classes, OSError, ValueError) are printed as ONE line on stderr,
``<prog>: error: <what and where>``, with exit status 2; ``HYDRA_FULL_ERROR=1`` re-raises them with the traceback.
Override keys the schema does not have are rejected the same way, before Hydra's multi-line message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from instructblip.errors import CheckpointError, ConfigError, InstructBlipError

USER_ERRORS = (InstructBlipError, OSError, ValueError)


def one_line(error: BaseException) -> str:
    """The error's message with its line breaks folded, so that it stays one line."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def check_override_keys(prog: str, schema, arguments: list[str]) -> None:
    """Every ``key=value`` must name a field of ``schema`` (``hydra.*`` and flags pass through to Hydra)."""
    allowed = list(schema) if isinstance(schema, dict) else [f.name for f in fields(schema)]
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        key = argument.split("=", 1)[0].lstrip("+~")
        if key.startswith(("hydra.", "hydra/")) or key == "hydra":
            continue
        if key.split(".", 1)[0] not in allowed:
            fail(prog, f"unknown setting {key!r}; allowed: {', '.join(allowed)}")


def run_hydra_app(prog: str, schema, body: Callable) -> None:
    """Run ``body(cfg)`` as a Hydra app whose config is ``schema`` (a dataclass, or a dict when a key is a Python
    keyword such as ``from``) plus ``key=value`` overrides.

    The app writes nothing but its answer: no output directory, no log files, no Hydra logging.
    """
    import hydra
    from hydra.core.config_store import ConfigStore

    name = prog.replace("-", "_")
    store = ConfigStore.instance()
    store.store(name=f"{name}_schema", node=schema)
    store.store(
        name=name,
        node={
            "defaults": [
                f"{name}_schema",
                {"override hydra/job_logging": "none"},
                {"override hydra/hydra_logging": "none"},
                "_self_",
            ],
            "hydra": {
                "run": {"dir": "."},
                "output_subdir": None,
                "job": {"name": name},
                "help": {"app_name": prog},
            },
        },
    )
    check_override_keys(prog, schema, sys.argv[1:])

    @hydra.main(version_base=None, config_name=name)
    def app(cfg) -> None:
        try:
            body(cfg)
        except USER_ERRORS as error:
            if full_errors():
                raise
            fail(prog, one_line(error))

    app()


def require(prog: str, cfg, keys: tuple[str, ...], usage: str) -> None:
    from omegaconf import OmegaConf

    for key in keys:
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            fail(prog, f"{key}= is required; usage: {usage}")


# --------------------------------------------------------------------------------------------------- checkpoints

LAVIS_SUFFIXES = (".pth", ".pt")
TRAINED_SUFFIXES = (".ckpt", ".safetensors")


def checkpoint_kind(path: Path) -> str:
    """``hf`` (a Hugging Face InstructBLIP directory, which is also what this project exports), ``lavis`` (a
    LAVIS ``.pth``) or ``trained`` (a Lightning ``.ckpt``, a sharded FSDP checkpoint directory or
    ``trainable.safetensors`` that this project's training wrote, holding the trained weights only)."""
    if path.is_dir():
        if (path / ".metadata").is_file():  # a sharded (FSDP/DCP) checkpoint directory written by training
            return "trained"
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a directory without config.json (not a Hugging Face InstructBLIP) and without "
                ".metadata (not a sharded training checkpoint)"
            )
        return "hf"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix in LAVIS_SUFFIXES:
        return "lavis"
    if path.suffix in TRAINED_SUFFIXES:
        return "trained"
    raise CheckpointError(
        f"checkpoint {path}: unknown format {path.suffix!r}; give a Hugging Face directory, a LAVIS .pth, "
        "or a .ckpt / .safetensors written by instructblip-train"
    )


def open_model(
    checkpoint: str,
    model: str | None = None,
    vision: str | None = None,
    llm: str | None = None,
    base: str | None = None,
    device: str | None = None,
    config: str | None = None,
):
    """``InstructBlip`` (processor attached) from whatever ``checkpoint`` is; see :func:`checkpoint_kind`.

    LAVIS needs ``model`` (the released configuration; or ``config``, a Hugging Face InstructBLIP config.json giving
    other sizes), ``vision`` (EVA weights) and ``llm`` (HF LLM directory);
    trained weights need ``base``, the checkpoint the run started from (its ``model.pretrained``).
    """
    path = Path(checkpoint).expanduser()
    kind = checkpoint_kind(path)  # before importing torch: a wrong path fails in a second

    from instructblip.model.instructblip import InstructBlip

    placement = {"device": device} if device else {}
    if kind == "hf":
        return InstructBlip.from_pretrained(path, **placement)
    if kind == "lavis":
        named = model or config
        missing = [name for name, value in (("model", named), ("vision", vision), ("llm", llm)) if not value]
        if missing:
            raise ConfigError(
                f"checkpoint {path} is a LAVIS .pth: also give {', '.join(m + '=' for m in missing)} "
                "(model=<released name>, vision=<eva_vit_g.pth>, llm=<Hugging Face LLM directory>)"
            )
        return InstructBlip.from_pretrained(path, model=model, config=config, vision=vision, llm=llm, **placement)
    if not base:
        raise ConfigError(
            f"checkpoint {path} holds only the weights training changed; give base=<the checkpoint the run "
            "started from (its model.pretrained)>"
        )
    import tempfile

    from instructblip.train.build import load_trainable_weights
    from instructblip.train.checkpointing import consolidate

    loaded = InstructBlip.from_pretrained(Path(base).expanduser(), **placement)
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="instructblip-dcp-") as tmp:
            load_trainable_weights(loaded, consolidate(path, Path(tmp) / "consolidated.ckpt"))
    else:
        load_trainable_weights(loaded, path)
    return loaded
