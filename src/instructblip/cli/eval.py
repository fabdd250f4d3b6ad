"""``instructblip-eval checkpoint=DIR benchmarks=[gqa,vsr,...] shards=DIR``: zero-shot held-out evaluation.

A Hydra app over ``conf/eval.yaml``. Writes ``predictions/<benchmark>.jsonl`` (resumable), ``results.md`` and
``results.json`` into the run directory (``output_dir=`` an earlier run's directory resumes it) and logs to W&B with
``logger=wandb``. Several GPUs: ``torchrun --nproc_per_node=N $(which instructblip-eval) ...``. The last line of
stdout is the path of ``results.json``. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROG = "instructblip-eval"


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _setup_distributed():
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); a single process otherwise."""
    import torch

    from instructblip.eval.runner import Distributed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())


def evaluate(cfg) -> Path | None:
    """Run the evaluation ``cfg`` describes; returns the results.json path on rank 0."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from instructblip.cli._common import open_model
    from instructblip.errors import ConfigError
    from instructblip.eval.paper_results import PAPER_ZERO_SHOT, guess_paper_model
    from instructblip.eval.report import log_results, write_results
    from instructblip.eval.runner import Benchmark, evaluate_benchmark, find_shards
    from instructblip.model.decoding import check_decoding_options

    import instructblip.shapesworld.tasks  # noqa: F401  registers the ShapesWorld datasets

    benchmarks = list(cfg.benchmarks)
    if not benchmarks:
        raise ConfigError("benchmarks= is empty; give registry names, e.g. benchmarks=[gqa,vsr]")
    infos = [_registry_info(name) for name in benchmarks]
    paper_model = cfg.paper_model or guess_paper_model(str(cfg.checkpoint))
    if paper_model is not None and paper_model not in PAPER_ZERO_SHOT:
        raise ConfigError(f"paper_model={paper_model!r}; allowed: {', '.join(PAPER_ZERO_SHOT)}")
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    for info in infos:
        if info.answer_length not in generation:
            raise ConfigError(f"generation.{info.answer_length} is missing (needed by {info.name})")
        if info.eval_split is None:
            raise ConfigError(f"{info.name} has no evaluation split in the registry (a training-only dataset)")
        find_shards(cfg.shards, info.name, info.eval_split)  # fail before loading the model

    dist = _setup_distributed()
    device = cfg.device
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    decoding = check_decoding_options(OmegaConf.to_container(cfg.get("decoding") or {}, resolve=True), device)
    model = open_model(str(cfg.checkpoint), model=cfg.lavis_model, vision=cfg.vision, llm=cfg.llm, base=cfg.base,
                       device=device)
    model.eval()
    model.llm.decoding_options = decoding

    output_dir = Path(str(cfg.output_dir)).expanduser()
    metric_options = OmegaConf.to_container(cfg.metric_options, resolve=True) or {}
    loggers = [instantiate(conf) for conf in (cfg.get("logger") or {}).values()] if dist.rank == 0 else []
    results = []
    try:
        for info in infos:
            result = evaluate_benchmark(
                model, Benchmark(info, dict(generation[info.answer_length])), cfg.shards, output_dir,
                batch_size=cfg.batch_size, rank_batch_size=cfg.rank_batch_size, limit=cfg.limit,
                num_workers=cfg.num_workers, metric_options=metric_options.get(info.name), dist=dist,
                progress=cfg.progress,
            )
            if result is not None:
                results.append(result)
                print(f"{result.name}: {result.metric} {result.score:.2f} (n={result.n})", flush=True)
        if dist.rank != 0:
            return None
        config = OmegaConf.to_container(cfg, resolve=True)
        markdown, as_json = write_results(output_dir, results, paper_model, str(cfg.checkpoint), config)
        log_results(loggers, results, paper_model, config)
        print(markdown.read_text(), end="")
        return as_json
    finally:
        if loggers:
            from instructblip.train.wandb_logging import finish

            finish(loggers)  # sequential runs in one process must not share a W&B run
        if dist.active:
            torch.distributed.destroy_process_group()


def _registry_info(name: str):
    from instructblip.data import registry
    from instructblip.errors import ConfigError

    try:
        return registry.get(name)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from instructblip.cli._common import USER_ERRORS, full_errors, one_line
    from instructblip.train.validate import CONF_DIR, check_overrides

    os.environ.setdefault("INSTRUCTBLIP_ROOT", str(CONF_DIR.parent))
    try:
        check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except USER_ERRORS as error:
        _fail(one_line(error))

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
    def run(cfg: DictConfig) -> None:
        if OmegaConf.is_missing(cfg, "checkpoint"):
            _fail("checkpoint= is required; usage: instructblip-eval checkpoint=DIR benchmarks=[gqa,...] "
                  "shards=DIR")
        try:
            results = evaluate(cfg)
        except USER_ERRORS as error:
            if full_errors():
                raise
            _fail(one_line(error))
        if results is not None:
            print(results)

    run()


if __name__ == "__main__":
    main()
