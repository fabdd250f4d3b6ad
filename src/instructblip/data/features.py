"""Precomputed image features: the frozen vision trunk's output, computed once, read back by the training loader.

When the images are not augmented (``data.augment=false``) the frozen trunk (EVA ViT-g, 39 blocks) maps each image
to the same ``(tokens, width)`` features in every epoch, and it is the most expensive frozen part of a training
step. ``write_features`` runs it once over every sample of the training shards and stores its output; with
``data.image_features=DIR`` the training loader yields these ``image_features`` instead of ``pixel_values`` and the
model starts from them (``InstructBlip.forward(image_features=...)``). ``ln_vision`` is *not* part of what is
stored: it trains with the Q-Former (LAVIS), so it runs in the model on the stored trunk output, and the loss and
gradients are those of the pixel path.

Layout: ``DIR/<dataset>/<shard name without .tar>.safetensors``, one file per shard, one tensor per sample named
by the sample's key (the tar member name up to the first dot), shaped ``(frames, tokens, width)`` (frames = 1 for
an image). The file's metadata says the geometry, the dtype and the checkpoint. A sample whose image cannot be
decoded is skipped and counted (the loader then skips it too, as the pixel path does). A shard whose file exists
is not recomputed, so an interrupted run continues where it stopped.

Command::

    python -m instructblip.data.features checkpoint=DIR out=DIR datasets='{vqav2: shards/vqav2-train2014-*.tar}' \\
        [batch_size=32] [dtype=bfloat16] [device=auto] [num_workers=4]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from instructblip.errors import ConfigError, DataError

SUFFIX = ".safetensors"
DTYPES = ("bfloat16", "float16", "float32")


def features_file(root: str | Path, dataset: str, shard: str | Path) -> Path:
    """Where the features of ``shard`` (a tar file of ``dataset``) live under ``root``."""
    name = Path(shard).name
    return Path(root) / dataset / (name.removesuffix(".tar") + SUFFIX)


def expected_geometry(model) -> tuple[int | None, int]:
    """(tokens per image or None when the tower does not say, width) of ``model``'s vision trunk output."""
    vision = model.config.vision
    return (vision.num_tokens if vision.backbone == "eva" else None), int(model.vision.width)


class _ShardImages(Dataset):
    """Position ``j`` of the shards to do -> (shard id, sample key or None when skipped, eval-transformed pixels
    (frames, 3, H, W) or None). Decoding and the transform run in the DataLoader workers."""

    def __init__(self, index, decoder, processor):
        self.index, self.decoder, self.processor = index, decoder, processor

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        decoded = self.decoder(self.index.read(i))  # a corrupt image is counted by the decoder and left out
        if decoded is None:
            return self.index.shard_id(i), None, None
        return self.index.shard_id(i), self.index.key(i), self.processor.pixel_values(decoded.images, train=False)


@torch.no_grad()
def write_features(
    model,
    datasets: dict[str, Any],
    out: str | Path,
    batch_size: int = 32,
    dtype: str = "bfloat16",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Run ``model``'s frozen trunk over every sample of ``datasets`` ({name: shard glob or list of globs}) and
    write the features under ``out``. Images go through the processor's evaluation transform (no augmentation),
    decoded by ``num_workers`` DataLoader workers.

    Returns ``{dataset: {"written": n, "skipped": n, "shards_done_before": n, **skip reasons}}``.
    """
    from tqdm import tqdm

    from instructblip.data.shards import ExampleDecoder, SkipCounter
    from instructblip.train.data import ShardIndex, expand_shards

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    if model.processor is None:
        raise ConfigError("the model has no processor attached: load it with InstructBlip.from_pretrained(dir)")
    vision = model.vision
    device = vision.ln_vision.weight.device
    trunk_dtype = next(vision.trunk.parameters()).dtype
    summary: dict[str, dict[str, int]] = {}
    for name, spec in sorted(datasets.items()):
        shards = expand_shards(spec, f"datasets.{name}")
        targets = [features_file(out, name, shard) for shard in shards]
        if len(set(targets)) != len(targets):
            raise DataError(f"datasets.{name}: two shards share a file name; features are keyed by it ({shards})")
        todo = [(shard, target) for shard, target in zip(shards, targets) if not target.exists()]
        counter = SkipCounter(f"{name} (features)")
        written = 0
        if todo:
            index = ShardIndex([shard for shard, _ in todo])
            loader = DataLoader(_ShardImages(index, ExampleDecoder(counter), model.processor), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=list)  # in order: shards finish one by one
            pending: dict[int, dict[str, torch.Tensor]] = {shard_id: {} for shard_id in range(len(todo))}
            with tqdm(total=len(index), desc=f"features {name}", unit="img", disable=not progress) as bar:
                for items in loader:
                    kept = [(shard_id, key, pixels) for shard_id, key, pixels in items if key is not None]
                    if kept:
                        frames = [pixels.shape[0] for _, _, pixels in kept]
                        batch = torch.cat([pixels for _, _, pixels in kept]).to(device, trunk_dtype)
                        features = vision._run_trunk(batch).to(getattr(torch, dtype)).cpu()
                        for (shard_id, key, _), part in zip(kept, features.split(frames)):
                            pending[shard_id][key] = part.contiguous()
                    bar.update(len(items))
                    for shard_id in [s for s in sorted(pending) if s < items[-1][0]]:  # shards behind are complete
                        written += _save(pending.pop(shard_id), todo[shard_id], model, dtype)
            for shard_id in sorted(pending):  # the last shard, and shards without samples
                written += _save(pending.pop(shard_id), todo[shard_id], model, dtype)
        counts = counter.counts()
        summary[name] = {"written": written, "skipped": sum(counts.values()),
                         "shards_done_before": len(shards) - len(todo), **{k: v for k, v in counts.items() if v}}
    return summary


def _save(tensors: dict[str, torch.Tensor], shard_and_target: tuple[str, Path], model, dtype: str) -> int:
    """Write one shard's features whole (a temporary name, then a rename): an interrupted run recomputes it."""
    from safetensors.torch import save_file

    shard, target = shard_and_target
    tokens, width = expected_geometry(model)
    if tokens is None and tensors:  # an open_clip tower: its token count is what it produced
        tokens = next(iter(tensors.values())).shape[1]
    metadata = {
        "tokens": "" if tokens is None else str(tokens),
        "width": str(width),
        "dtype": dtype,
        "backbone": model.config.vision.backbone,
        "image_size": str(model.config.vision.image_size),
        "shard": str(shard),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    save_file(tensors, str(partial), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)  # readable like any file the user writes (the writer creates it private)
    os.replace(partial, target)
    return len(tensors)


class ImageFeatures:
    """Read access to what :func:`write_features` wrote, for the shards of the training indexes.

    ``indexes``: ``{dataset: ShardIndex}``. Every shard must have its features file (a one-line error names the
    first one missing) and all files must agree on the geometry. ``get(dataset, shard_id, key)`` returns the
    ``(frames, tokens, width)`` tensor, or None when the sample was skipped at writing time (a corrupt image).
    Files are opened lazily per process (a forked DataLoader worker opens its own).
    """

    def __init__(self, root: str | Path, indexes: dict[str, Any]):
        from safetensors import safe_open

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"data.image_features={self.root}: no such directory (write it with "
                              "python -m instructblip.data.features)")
        self.files: dict[str, list[Path]] = {}
        self.keys: dict[tuple[str, int], frozenset[str]] = {}
        geometry = set()
        for name, index in indexes.items():
            self.files[name] = []
            for shard_id, shard in enumerate(index.shards):
                path = features_file(self.root, name, shard)
                if not path.exists():
                    raise DataError(f"data.image_features: {path} is missing (the features of {shard}); "
                                    "compute them with python -m instructblip.data.features")
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata() or {}
                    self.keys[(name, shard_id)] = frozenset(handle.keys())
                geometry.add((meta.get("tokens", ""), meta.get("width", ""), meta.get("image_size", "")))
                self.files[name].append(path)
        if len(geometry) > 1:
            raise DataError(f"data.image_features={self.root}: files of different geometries {sorted(geometry)} "
                            "(tokens, width, image size): recompute them with one checkpoint")
        tokens, width, image_size = geometry.pop() if geometry else ("", "", "")
        self.tokens = int(tokens) if tokens else None
        self.width = int(width) if width else None
        self.image_size = int(image_size) if image_size else None
        self._handles: dict[tuple[str, int], Any] = {}
        self._pid = os.getpid()

    def check_model(self, model) -> None:
        """One-line error when the stored features do not fit ``model``'s vision trunk, or when the trunk trains."""
        if any(p.requires_grad for p in model.vision.trunk.parameters()):
            raise ConfigError(
                f"data.image_features={self.root}: the model's vision trunk (vision.trunk) trains in this stage, so "
                "its output changes every step; set data.image_features=null or freeze it (stage.trainable)"
            )
        tokens, width = expected_geometry(model)
        if (self.width, self.tokens if tokens is not None else None) != (width, tokens):
            raise ConfigError(
                f"data.image_features={self.root} holds (tokens={self.tokens}, width={self.width}) trunk features, "
                f"but the model's vision tower (model.vision) gives (tokens={tokens}, width={width}); recompute "
                "them with this model's checkpoint"
            )

    def get(self, dataset: str, shard_id: int, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if key not in self.keys[(dataset, shard_id)]:
            return None
        if os.getpid() != self._pid:
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get((dataset, shard_id))
        if handle is None:
            handle = self._handles[(dataset, shard_id)] = safe_open(str(self.files[dataset][shard_id]), "pt")
        return handle.get_tensor(key)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


# ------------------------------------------------------------------------------------------------ command

@dataclass
class FeaturesConfig:
    checkpoint: str | None = None
    out: str | None = None
    datasets: Any = None  # {name: shard glob or list of globs}, as data.datasets
    batch_size: int = 32
    dtype: str = "bfloat16"
    device: str = "auto"
    num_workers: int = 4
    progress: bool = True


PROG = "python -m instructblip.data.features"
USAGE = (f"{PROG} checkpoint=DIR out=DIR datasets='{{name: shard glob}}' [batch_size=32] [dtype=bfloat16] "
         "[device=auto] [num_workers=4]")


def run(cfg) -> None:
    from omegaconf import OmegaConf

    from instructblip.cli._common import fail, require
    from instructblip.model.instructblip import InstructBlip

    require(PROG, cfg, ("checkpoint", "out"), USAGE)
    datasets = OmegaConf.to_container(cfg.datasets, resolve=True) if cfg.datasets else {}
    if not datasets:
        fail(PROG, f"datasets= is empty; name each dataset and its shards; usage: {USAGE}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else str(cfg.device)
    model = InstructBlip.from_pretrained(str(cfg.checkpoint), device=device)
    model.eval()
    summary = write_features(model, datasets, cfg.out, batch_size=int(cfg.batch_size), dtype=str(cfg.dtype),
                             num_workers=int(cfg.num_workers), progress=bool(cfg.progress))
    print(json.dumps(summary, sort_keys=True))


def main() -> None:
    from instructblip.cli._common import run_hydra_app

    run_hydra_app(PROG, FeaturesConfig, run)


if __name__ == "__main__":
    main()
