"""``instructblip-prep dataset=NAME src=DIR out=DIR [split=...] [shard_size=1000] [num_frames=4]``: convert a
dataset's native files into WebDataset shards (see ``data_prep``).

``dataset=list`` prints every dataset the registry knows (category, held-in/out, metric, method, splits).
Converter options, each only where the dataset takes it: ``images=DIR`` (the folder holding the official image
folders, e.g. a shared COCO root with train2014/, val2014/, train2017/; default ``src``), ``videos=DIR`` (same for
video folders), ``num_frames=N`` (video: frames sampled per clip, default 4), ``variant=zeroshot|random`` (VSR),
``ocr=false`` (TextVQA/TextCaps without the Rosetta OCR file), ``n=`` and ``seed=`` (ShapesWorld).
The last line of stdout is the summary file's path. Errors (unknown dataset, missing files, bad split) are one line
on stderr and exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from instructblip.cli._common import fail, require, run_hydra_app

PROG = "instructblip-prep"
USAGE = f"{PROG} dataset=NAME src=DIR out=DIR [split=...] [shard_size=1000]; dataset=list prints the names"
OPTION_KEYS = ("images", "videos", "num_frames", "variant", "ocr", "n", "seed")


@dataclass
class PrepConfig:
    dataset: str = MISSING
    src: Optional[str] = None
    out: Optional[str] = None
    split: Optional[str] = None
    shard_size: int = 1000
    progress: bool = True
    # converter options (None: the converter's default)
    images: Optional[str] = None
    videos: Optional[str] = None
    num_frames: Optional[int] = None
    variant: Optional[str] = None
    ocr: Optional[bool] = None
    n: Optional[int] = None
    seed: Optional[int] = None


def _category_rank(category: str) -> int:
    from instructblip.data.registry import CATEGORIES

    return CATEGORIES.index(category) if category in CATEGORIES else len(CATEGORIES)


def dataset_table() -> str:
    """The registry as a fixed-width table: the 26 paper datasets, then ShapesWorld's when it is installed."""
    from instructblip.data.registry import DATASETS

    try:
        import instructblip.shapesworld.tasks  # noqa: F401  (registers the ShapesWorld datasets)
    except ImportError:
        pass
    header = ("dataset", "category", "held", "task", "metric", "method", "train split", "eval split")
    rows = [
        (
            info.name,
            info.category,
            "held-out" if info.held_out else "held-in",
            info.task,
            info.metric,
            info.method,
            info.train_split or "-",
            info.eval_split or "-",
        )
        for info in sorted(DATASETS.values(),
                           key=lambda i: (i.world != "real", i.held_out, _category_rank(i.category), i.name))
    ]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]
    real = [i for i in DATASETS.values() if i.world == "real"]
    lines.append(f"{len(real)} datasets: {sum(not i.held_out for i in real)} held-in, "
                 f"{sum(i.held_out for i in real)} held-out, {len({i.category for i in real})} categories"
                 + (f"; plus {len(DATASETS) - len(real)} ShapesWorld datasets" if len(DATASETS) > len(real) else ""))
    return "\n".join(lines)


def prep(cfg) -> None:
    require(PROG, cfg, ("dataset",), USAGE)
    if cfg.dataset == "list":
        print(dataset_table())
        return
    if cfg.out is None:
        fail(PROG, "out=DIR is required (where the shards go)")
    import data_prep
    from data_prep.shards import summary_path

    options = {key: cfg[key] for key in OPTION_KEYS if cfg[key] is not None}
    summary = data_prep.convert(
        str(cfg.dataset),
        cfg.src,
        cfg.out,
        split=None if cfg.split is None else str(cfg.split),
        shard_size=int(cfg.shard_size),
        progress=bool(cfg.progress),
        **options,
    )
    print(summary.line())
    print(summary_path(cfg.out, summary.dataset, summary.split))


def main() -> None:
    run_hydra_app(PROG, PrepConfig, prep)


if __name__ == "__main__":
    main()
