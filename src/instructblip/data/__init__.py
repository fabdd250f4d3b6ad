"""Data: the shard record, the task registry, instruction templates, shard reading, the training mixture, collation.

The names below are imported lazily (``from instructblip.data import build_mixture``), so that importing the light
modules (``instructblip.data.record``, ``instructblip.data.registry``) does not pull in torch and webdataset.

Training::

    mixture = build_mixture("shards/", ["coco_caption", "vqav2"], strategy="sqrt", seed=0)
    loader = make_loader(mixture, Collator(processor, "train"), batch_size=32, num_workers=4)

Evaluation (one pass, each sample to exactly one (rank, worker))::

    pipeline = read_shards("shards/gqa-testdev-{000000..000012}.tar")
    loader = make_loader(pipeline, Collator(processor, "generate"), batch_size=64, num_workers=2)
    pipeline.skip_counter.counts()
"""

_EXPORTS = {
    "Record": "instructblip.data.record",
    "render": "instructblip.data.templates",
    "render_evaluation": "instructblip.data.templates",
    "TEMPLATES": "instructblip.data.templates",
    "EVALUATION_PROMPTS": "instructblip.data.templates",
    "Example": "instructblip.data.shards",
    "SkipCounter": "instructblip.data.shards",
    "SKIP_REASONS": "instructblip.data.shards",
    "read_shards": "instructblip.data.shards",
    "list_shards": "instructblip.data.shards",
    "MixtureDataset": "instructblip.data.mixture",
    "MixtureSource": "instructblip.data.mixture",
    "build_mixture": "instructblip.data.mixture",
    "sampling_weights": "instructblip.data.mixture",
    "source_from_summary": "instructblip.data.mixture",
    "PAPER_ADJUSTMENTS": "instructblip.data.mixture",
    "Collator": "instructblip.data.collate",
    "make_loader": "instructblip.data.collate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'instructblip.data' has no attribute {name!r}")
