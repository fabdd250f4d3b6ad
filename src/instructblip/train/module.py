"""The LightningModule of the generative stages: BLIP-2 stage 2, instruction tuning and finetuning.

It wraps the plain :class:`~instructblip.model.instructblip.InstructBlip` (no Lightning inside the model) and owns
what the stage decides: which parameters train (``trainable``: parameter-name prefixes, LAVIS' choice by default:
query tokens, Q-Former, projection, ``ln_vision``), the frozen towers kept in eval mode and, on a GPU, stored in
bf16, the optimiser and schedule (factories from the config), the non-finite-loss guard, the training logs and the
held-in validation with the evaluation metrics.

Resume state (see :mod:`instructblip.train.checkpointing`): the checkpoint's ``state_dict`` holds the trainable
parameters only, never the frozen towers (they are rebuilt from their source); Lightning adds the optimiser,
scheduler, loop counters and the DataModule's data position; :meth:`on_save_checkpoint` adds the RNG states.

Determinism: dropout draws its randomness from a seed derived from the first sample index of the micro-batch, so a
micro-batch trains the same way on one process with accumulation, on any rank of a DDP group, and after a resume.

``step_mode``: ``automatic`` is Lightning's loop (forward, backward, the non-finite guard and clipping in its hooks,
the optimizer step). ``cuda_graph`` runs the whole step, optimizer included, as one CUDA graph captured at the
first training step and replayed (:class:`~instructblip.train.cuda_graph.CudaGraphTrainStep`; over compiled blocks
the benchmark measured 2.4x / 1.7x the samples/s of transformers compiled at batch 8 / 16, Vicuna-7B, H200).
training_step replays it and the ``optimizer_step`` hook only runs training_step, so Lightning still counts the
step, steps the schedule (the learning rates become tensors on the device, updated in place) and saves the
optimizer. ``manual`` is the same step without the graph, on any device: it tells a capture problem from a step
problem. Both need batches of a few shapes (``data.fixed_lengths``), no gradient accumulation and one device or DDP
(``validate.check_step_mode``); the non-finite guard, clipping (``trainer.gradient_clip_val``) and, under DDP, the
gradient average run inside the step.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from instructblip.errors import CheckpointError, ConfigError, InstructBlipError
from instructblip.train.data import position_seed
from instructblip.train.parallelize import autocast_forward
from instructblip.train.validate import COMPILE_MODES, COMPILE_SCOPES, LOSS_WEIGHTINGS, QFORMER_AUTOCAST, STEP_MODES

BOOKKEEPING_KEYS = ("dataset", "sample_index")


class NonFiniteLossError(InstructBlipError):
    """Too many optimiser steps in a row had a NaN/inf loss or gradient."""


def select_trainable(model: nn.Module, prefixes: list[str]) -> tuple[list[str], list[str]]:
    """Freeze everything, then unfreeze the parameters whose name starts with one of ``prefixes``.

    Returns (trainable names, frozen names); a prefix that matches nothing is a config error naming the choices.
    """
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched:
        roots = sorted({n.split(".")[0] for n in names} | {".".join(n.split(".")[:2]) for n in names})
        raise ConfigError(f"stage.trainable: {unmatched} match no parameter; parameter prefixes are {roots}")
    trainable, frozen = [], []
    for name, param in model.named_parameters():
        keep = any(name == p or name.startswith(p + ".") for p in prefixes)
        param.requires_grad_(keep)
        (trainable if keep else frozen).append(name)
    if not trainable:
        raise ConfigError("stage.trainable selects no parameter; nothing would train")
    return trainable, frozen


def freeze_unused(model: nn.Module) -> set[str]:
    """Freezes the parameters no output depends on (``unused_parameter_names``, where the model has it) and returns
    their names: they would get no gradient, which DDP refuses; frozen, they stay as loaded."""
    unused = set(getattr(model, "unused_parameter_names", list)())
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    return unused


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen (the towers): kept in eval mode while training."""
    out = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
            return
        for child in module.children():
            visit(child)

    for child in model.children():
        visit(child)
    return out


def frozen_towers_to_eval(model: nn.Module | None, frozen: list[nn.Module], llm_dropout: bool = True) -> None:
    """The ``frozen`` towers (:func:`frozen_modules`) to eval mode: no dropout and no statistics updates in the
    frozen vision trunk, as LAVIS. ``llm_dropout``: the frozen LLM stays as it is (LAVIS leaves it in train mode)."""
    llm = getattr(model, "llm", None)
    in_llm = {id(m) for m in llm.modules()} if llm is not None and llm_dropout else set()
    for module in frozen:
        if id(module) not in in_llm:
            module.eval()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, decoder_only: bool) -> torch.Tensor:
    """Token-mean cross-entropy per row (for the per-dataset logs), from the model's logits and the batch labels.

    Decoder-only logits cover ``[queries; text]``: the last ``L`` positions are the text, shifted by one.
    """
    if decoder_only:
        logits = logits[:, -labels.shape[1] - 1 : -1] if logits.shape[1] > labels.shape[1] else logits[:, :-1]
        labels = labels if logits.shape[1] == labels.shape[1] else labels[:, 1:]
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp_min(1)
    return token_loss.sum(dim=1) / counts


def rng_states_for_checkpoint(states: dict) -> dict:
    """Lightning's RNG states with numpy's key array as a tensor: the checkpoint then loads with torch.load's
    ``weights_only=True``, which Lightning's ModelParallelStrategy (trainer=fsdp) uses on resume whatever fit is
    told (Lightning 2.6)."""
    states = dict(states)
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        states["numpy"] = (name, torch.from_numpy(keys.astype("int64")), *rest)
    return states


def rng_states_from_checkpoint(states: dict) -> dict:
    """The inverse of :func:`rng_states_for_checkpoint` (checkpoints written before it hold the array itself)."""
    import numpy as np

    states = dict(states)
    if "numpy" in states and isinstance(states["numpy"][1], torch.Tensor):
        name, keys, *rest = states["numpy"]
        states["numpy"] = (name, keys.numpy().astype(np.uint32), *rest)
    return states


class HostRead:
    """A device scalar's value, its copy to the host started now and waited for only when ``value()`` asks: a copy
    to pinned memory queued behind the work that produced it, then an event on that copy alone (``int()`` on a CUDA
    tensor would wait for everything queued on the stream by then)."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.is_cuda:
            self.host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.detach().clone()  # the counters go on changing in place

    def value(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host)


class InstructBlipModule(pl.LightningModule):
    """One generative stage. ``model``: a factory returning the plain model with ``.processor`` (built in
    :meth:`configure_model`, so FSDP can shard it as it is built); ``optimizer``/``scheduler``: partial factories
    (``instructblip.train.optim``)."""

    def __init__(
        self,
        model: Callable[[], nn.Module],
        optimizer: Callable,
        scheduler: Callable | None,
        stage: str = "instruction_tuning",
        trainable: list[str] | tuple[str, ...] = ("query_tokens", "qformer", "projection", "ln_vision"),
        frozen_dtype: str | None = "bfloat16",
        seed: int = 0,
        max_consecutive_nonfinite: int = 5,
        validation: dict | None = None,
        parallelize: Callable | None = None,
        compile: bool | str = False,
        compile_scope: str = "blocks",
        compile_mode: str | None = None,
        frozen_llm_dropout: bool = True,
        loss_weighting: str = "token",
        step_mode: str = "automatic",
        qformer_autocast: str | None = None,
    ):
        super().__init__()
        self.model_factory = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.stage, self.trainable_prefixes = stage, list(trainable)
        self.frozen_dtype = getattr(torch, frozen_dtype) if frozen_dtype else None
        self.seed = int(seed)
        self.max_consecutive_nonfinite = int(max_consecutive_nonfinite)
        self.validation_settings = dict(validation or {})
        self.parallelize_fn = parallelize
        # LAVIS freezes the LLM's weights but leaves it in train mode: FlanT5's dropout (0.1) stays on in training
        # (Vicuna/LLaMA has none); the vision trunk it keeps in eval mode
        self.frozen_llm_dropout = bool(frozen_llm_dropout)
        # "token" (LAVIS): the mean over every answer token of the micro-batch, so a 30-token description weighs 15
        # one-word answers; "sample": the mean of each sample's own token mean, every sample weighing the same
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"stage.module.loss_weighting={loss_weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}")
        self.loss_weighting = loss_weighting
        if step_mode not in STEP_MODES:
            raise ConfigError(f"stage.module.step_mode={step_mode!r}; allowed: {', '.join(STEP_MODES)}")
        self.step_mode = step_mode
        if qformer_autocast is not None and qformer_autocast not in QFORMER_AUTOCAST:
            raise ConfigError(f"stage.module.qformer_autocast={qformer_autocast!r}; allowed: null, "
                              f"{', '.join(QFORMER_AUTOCAST)}")
        self.qformer_autocast = getattr(torch, qformer_autocast) if qformer_autocast else None
        # the CudaGraphTrainSteps of step_mode cuda_graph (one per batch shape) or manual (one), built when needed
        self._whole_steps: dict = {}
        self._skipped_before_whole_step = 0  # non-finite skips counted before the first was built (a resume)
        self._pending_skips: HostRead | None = None  # the last whole step's skip count, not yet read
        # True: inductor; a string names another torch.compile backend ("aot_eager" checks the wrapping on a CPU)
        self.compile_backend = ("inductor" if compile is True else compile) or None
        # blocks: each transformer block its own graph (seconds to compile, FSDP-friendly); whole: the model's forward
        # as one graph (minutes at 7B; no host time between blocks; not under FSDP)
        if compile_scope not in COMPILE_SCOPES:
            raise ConfigError(f"stage.module.compile_scope={compile_scope!r}; allowed: {', '.join(COMPILE_SCOPES)}")
        self.compile_scope = compile_scope
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ConfigError(f"stage.module.compile_mode={compile_mode!r}; allowed: null, {', '.join(COMPILE_MODES)}")
        self.compile_mode = compile_mode
        self.model: nn.Module | None = None
        self.processor = None
        self.trainable_names: list[str] = []
        self.frozen_names: list[str] = []
        self._frozen: list[nn.Module] = []
        # non-finite guard and counters (saved in the checkpoint so a resumed run keeps counting)
        self.nonfinite_in_window = False
        self._grad_norm: torch.Tensor | None = None  # this step's, from on_before_optimizer_step
        self.nonfinite_in_a_row = 0
        self.nonfinite_skipped = 0
        self.samples_seen: Counter = Counter()
        self._val_lines: dict[str, list[dict]] = defaultdict(list)
        # the checkpoint holds only the trainable weights: missing frozen keys are expected, and checked by hand
        self.strict_loading = False

    # ------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.model_factory()
        self.processor = getattr(model, "processor", None)
        self.trainable_names, self.frozen_names = select_trainable(model, self.trainable_prefixes)
        # the towers (eval mode, and bf16 on a GPU), found before the unused parameters below join the frozen set:
        # those stay in the dtype of the module they belong to
        self._frozen = frozen_modules(model)
        unused = freeze_unused(model)
        if unused:
            self.frozen_names += [n for n in self.trainable_names if n in unused]
            self.trainable_names = [n for n in self.trainable_names if n not in unused]
        self.model = model
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        sharded = self.parallelize_fn is not None or type(self.trainer.strategy).__name__ == "ModelParallelStrategy"
        if self.frozen_dtype is not None and on_gpu and not sharded:
            # bf16-mixed keeps fp32 master weights for what trains; the frozen towers need no fp32 copy at all
            # (under FSDP they stay fp32 but sharded: see instructblip.train.parallelize)
            for module in self._frozen:
                module.to(self.frozen_dtype)
        if self.parallelize_fn is None and self.trainer is not None:
            from lightning.pytorch.strategies import ModelParallelStrategy

            if isinstance(self.trainer.strategy, ModelParallelStrategy):
                from instructblip.train.parallelize import parallelize

                self.parallelize_fn = parallelize
        if self.qformer_autocast is not None:
            autocast_forward(self.model.qformer, self.qformer_autocast)
        if self.compile_backend and self.compile_scope == "whole":
            if sharded:
                raise ConfigError("stage.module.compile_scope=whole is not supported with trainer=fsdp; "
                                  "allowed there: stage.module.compile_scope=blocks")
            self.model.compile(backend=self.compile_backend, mode=self.compile_mode)
        elif self.compile_backend:
            from instructblip.train.parallelize import compile_blocks

            compile_blocks(self.model, backend=self.compile_backend, mode=self.compile_mode)
        if self.parallelize_fn is not None:
            self.parallelize_fn(self.model, self.trainer)
        self.train()  # from_pretrained hands the model over in eval mode; what trains needs its dropout

    def on_fit_start(self) -> None:
        # Lightning warns about modules left in eval mode at the start of fit: ours are the frozen towers, on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")

    def train(self, mode: bool = True):
        super().train(mode)
        frozen_towers_to_eval(self.model, self._frozen, self.frozen_llm_dropout)
        return self

    def configure_optimizers(self):
        extra = {"capturable": True} if self.step_mode == "cuda_graph" else {}
        optimizer = self.optimizer_factory(self.model.named_parameters(), **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- training
    def _model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, per-sample loss or None) of one micro-batch, the loss weighted by ``loss_weighting``. The model
        skips the full logits (the LM head runs on the labelled positions only) and returns the per-row losses."""
        output = self.model(**self._model_inputs(batch), return_logits=False)
        per_sample = output.per_sample_loss
        if self.loss_weighting == "sample":
            labelled = (batch["labels"] != -100).any(dim=1).to(per_sample.device)
            return per_sample[labelled].mean(), per_sample.detach()
        return output.loss, per_sample.detach()

    def training_step(self, batch: dict, batch_idx: int):
        datamodule = self.trainer.datamodule
        if datamodule is not None:  # the data position the checkpoint saves: this micro-batch is consumed
            datamodule.batches_consumed += 1
        seed = position_seed(self.seed, int(batch["sample_index"][0]), "dropout")
        torch.manual_seed(seed)
        if self.step_mode == "automatic":
            loss, per_sample = self.compute_loss(batch)
            if not torch.isfinite(loss.detach()):
                self.nonfinite_in_window = True
        else:
            loss, per_sample = self._run_whole_step(batch, seed)
        self._log_step(batch, loss, per_sample)
        if self.step_mode == "automatic":
            return loss
        # The whole step has trained already. Lightning (under DDP) wants a loss all the same and backpropagates it:
        # a detached copy, a leaf of its own, whose backward reaches no parameter.
        return loss.detach().clone().requires_grad_()

    def _run_whole_step(self, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """step_mode cuda_graph|manual: one whole step (forward, backward, non-finite skip, clipping, optimizer) on
        the batch; (loss, per-sample loss), copied out of the graph's buffers."""
        inputs = self._model_inputs(batch)
        # a graph replays one batch shape (data.fixed_lengths' buckets give a few); the eager step takes any
        shape = tuple((name, tuple(value.shape)) for name, value in sorted(inputs.items()))
        key = shape if self.step_mode == "cuda_graph" else None
        step = self._whole_steps.get(key)
        if step is None:
            step = self._whole_steps[key] = self._build_whole_step(inputs)
            torch.manual_seed(seed)  # the warm-up and the capture drew numbers; this step starts where any other does
        loss = step(inputs).clone()
        per_sample = None if step.per_sample_loss is None else step.per_sample_loss.clone()
        # The skip counters are read one step late: the last step's count is waited for only now that this step is
        # queued behind it, so the GPU never waits for the host between steps (reading this step's count would stop
        # the host until the step ends, once per step). Logging steps, checkpoints and the run's end read it at once.
        self._count_pending_skips()
        self._pending_skips = HostRead(torch.stack([whole.skipped_steps for whole in self._whole_steps.values()]).sum())
        return loss, per_sample

    def _count_pending_skips(self) -> None:
        """Counts the non-finite skips of the last whole step whose count was not yet read."""
        pending, self._pending_skips = self._pending_skips, None
        if pending is not None:
            skipped = pending.value() + self._skipped_before_whole_step
            self._count_nonfinite(bad=skipped > self.nonfinite_skipped)

    def _build_whole_step(self, inputs: dict):
        from instructblip.train.cuda_graph import CudaGraphTrainStep
        from instructblip.train.parallelize import compute_dtype

        optimizer = self.trainer.optimizers[0]
        device = inputs["input_ids"].device
        if not self._whole_steps:
            # the graphs read the learning rates from memory: tensors on the device, which torch's schedulers fill
            # in place (every graph holds these very tensors)
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
            self._skipped_before_whole_step = self.nonfinite_skipped  # restored from a checkpoint, or 0
        graphs = [whole.graph for whole in self._whole_steps.values() if whole.capture]
        from torch.nn.parallel import DistributedDataParallel

        data_parallel = isinstance(self.trainer.strategy.model, DistributedDataParallel)
        if data_parallel:
            # the step averages the gradients itself, inside the graph; DDP's reducer (autograd hooks, bucketed
            # all-reduces timed by its own forward) stays out, as under its no_sync()
            self.trainer.strategy.model.require_backward_grad_sync = False
        return CudaGraphTrainStep(
            self.model, optimizer, inputs, {"return_logits": False},
            autocast_dtype=compute_dtype(self.trainer),
            capture=self.step_mode == "cuda_graph", max_grad_norm=self.trainer.gradient_clip_val,
            pool=graphs[0].pool() if graphs else None,
            average_gradients=data_parallel and self.trainer.world_size > 1,
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if self.step_mode == "automatic":
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            return
        # training_step runs the whole step, the optimizer's included; Lightning counts it and steps the schedule
        optimizer_closure()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self.step_mode == "automatic":  # the whole step zeroes its own gradients
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def on_train_start(self) -> None:
        if self.step_mode == "automatic":  # a checkpoint of a whole-step run holds tensor learning rates
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    if isinstance(group["lr"], torch.Tensor):
                        group["lr"] = float(group["lr"])

    def on_train_end(self) -> None:
        self._count_pending_skips()  # the last step's skip (or the last of too many in a row) counts too

    def _log_step(self, batch: dict, loss: torch.Tensor, per_sample: torch.Tensor | None) -> None:
        names = batch["dataset"]
        self.samples_seen.update(names)
        self.log("train/loss", loss.detach().float(), on_step=True, prog_bar=True, batch_size=len(names))
        lr = self.optimizers().param_groups[0]["lr"]
        # a tensor rate (whole-step modes) is filled in place by the schedule: log a copy of this step's value (a
        # copy on the device: no host read)
        self.log("train/lr", lr.clone() if isinstance(lr, torch.Tensor) else lr, on_step=True, batch_size=len(names))
        if per_sample is not None:
            for name in sorted(set(names)):
                chosen = [n == name for n in names]
                rows = torch.tensor(chosen, device=per_sample.device)
                # the row count from the host list: int() of a device sum would wait for the step to end
                self.log(f"train/loss/{name}", per_sample[rows].mean(), on_step=True, batch_size=sum(chosen))
        if self.trainer._logger_connector.should_update_logs:
            self._log_counts()

    def _log_counts(self) -> None:
        """Samples seen and skipped (per reason), summed over ranks; only on logging steps (it syncs). Every rank
        logs the same keys (all mixture datasets, all skip reasons) so that the collective calls line up."""
        world = self.trainer.world_size
        datamodule = self.trainer.datamodule
        names = sorted(getattr(datamodule, "probabilities", None) or self.samples_seen)
        for name in names:
            self.log(f"data/seen/{name}", float(self.samples_seen.get(name, 0)), on_step=True, reduce_fx="sum",
                     sync_dist=world > 1)
        if datamodule is not None and hasattr(datamodule, "skip_counts"):
            by_reason: Counter = Counter()
            for counts in datamodule.skip_counts().values():
                by_reason.update(counts)
            for reason in sorted(by_reason):
                self.log(f"data/skipped/{reason}", float(by_reason[reason]), on_step=True, reduce_fx="sum",
                         sync_dist=world > 1)
        self._count_pending_skips()  # a logging step reads the host anyway
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the step when a loss (or gradient) of this accumulation window was NaN/inf, on every rank alike.

        One multi-tensor norm over all gradients finds a NaN/inf in any of them (a per-tensor ``isfinite`` pass was a
        fifth of a ShapesWorld training step on CPU: the Q-Former's 30522-word embedding gradient alone is 11.7M
        values); a gradient so large that its squares overflow counts as non-finite too."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # kept for configure_gradient_clipping, which runs next: clipping needs this very norm
        self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        bad = self.nonfinite_in_window or (self._grad_norm is not None and not bool(torch.isfinite(self._grad_norm)))
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self.nonfinite_in_window = False
        if bad:
            # AdamW leaves a parameter whose grad is None untouched (no moment or step-count update): a true skip.
            for param in self.parameters():
                param.grad = None
        self._count_nonfinite(bad)

    def _count_nonfinite(self, bad: bool) -> None:
        """Counts a skipped step; too many in a row stop the run."""
        if not bad:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row > self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimiser steps in a row had a NaN/inf loss or gradient (step "
                f"{self.global_step}, limit faults.max_consecutive_nonfinite={self.max_consecutive_nonfinite}); "
                "the run is diverging: lower optimizer.lr, raise scheduler.warmup_steps or check the data"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the global norm that ``on_before_optimizer_step`` has just taken (Lightning's own clipping would
        take it a second time: one more pass over every gradient, the Q-Former's embedding table included).

        Only where every rank holds whole gradients (one device, DDP); sharded strategies (FSDP, DeepSpeed) and
        clipping by value keep Lightning's clipping."""
        norm, self._grad_norm = self._grad_norm, None
        whole_gradients = type(self.trainer.strategy).__name__ in ("SingleDeviceStrategy", "DDPStrategy")
        by_norm = (gradient_clip_algorithm or "norm") == "norm"
        if gradient_clip_val is None or not by_norm or norm is None or not whole_gradients:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    # ------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_lines = defaultdict(list)

    def validation_step(self, batch: list, batch_idx: int) -> list[str] | None:
        """Generates answers for the metrics; returns them (in batch order, None examples dropped) for callbacks
        such as the W&B prediction table."""
        from instructblip.data.templates import render_evaluation

        batch = [example for example in batch if example is not None]
        if not batch:
            return None
        settings = {"max_new_tokens": 10, "num_beams": 1}
        settings.update(self.validation_settings.get("generate", {}))
        prompts = [render_evaluation(example["record"]).instruction for example in batch]
        predictions = self.model.generate([example["image"] for example in batch], prompts, **settings)
        for example, prediction in zip(batch, predictions):
            record = example["record"]
            self._val_lines[example["dataset"]].append(
                {"id": record.id, "prediction": prediction, "references": list(record.answers)}
            )
        return predictions

    def on_validation_epoch_end(self) -> None:
        from instructblip.data.registry import get
        from instructblip.eval.metrics import build_metric

        names = sorted(self.trainer.datamodule.val_indexes) if self.trainer.datamodule is not None else []
        scores = []
        for name in names:
            metric = build_metric(get(name).metric).to(self.device)
            metric.update(self._val_lines.get(name, []))
            score = float(metric.compute())  # torchmetrics gathers every rank's samples
            if not math.isnan(score):
                scores.append(score)
            self.log(f"val/{name}/{get(name).metric}", score, rank_zero_only=True, sync_dist=False)
        if scores:
            self.log("val/held_in_average", sum(scores) / len(scores), rank_zero_only=True, sync_dist=False)

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.fabric.utilities.seed import _collect_rng_states

        self._count_pending_skips()  # the counters saved are the steps' so far
        frozen = set(self.frozen_names)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.removeprefix("model.") in frozen]:
            del state[key]
        checkpoint["instructblip"] = {
            "stage": self.stage,
            "trainable": self.trainable_prefixes,
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "samples_seen": dict(self.samples_seen),
            "rng": rng_states_for_checkpoint(_collect_rng_states(include_cuda=torch.cuda.is_available())),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.fabric.utilities.seed import _set_rng_states

        extra = checkpoint.get("instructblip", {})
        if "state_dict" in checkpoint:
            saved = set(checkpoint["state_dict"])
            expected = {f"model.{name}" for name in self.trainable_names}
            missing = sorted(expected - saved)
            if missing and self.trainable_names:
                raise CheckpointError(
                    f"resume checkpoint lacks trainable weights {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                    f"(it was written for stage.trainable={extra.get('trainable')})"
                )
        elif extra.get("trainable", self.trainable_prefixes) != self.trainable_prefixes:
            # trainer=fsdp's strategy loads the weights itself (not strictly: the frozen ones are not saved) and
            # hands the rest over: what was trained must be what trains now
            raise CheckpointError(f"resume checkpoint was written for stage.trainable={extra.get('trainable')}; "
                                  f"this run trains {self.trainable_prefixes}")
        self.nonfinite_skipped = int(extra.get("nonfinite_skipped", 0))
        self.nonfinite_in_a_row = int(extra.get("nonfinite_in_a_row", 0))
        self.samples_seen = Counter(extra.get("samples_seen", {}))
        if "rng" in extra:
            _set_rng_states(rng_states_from_checkpoint(extra["rng"]))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by model parameter name (the sharing file and the export start from it)."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach() for name in self.trainable_names}


__all__ = ["InstructBlipModule", "NonFiniteLossError", "select_trainable", "frozen_modules", "per_sample_loss"]
