"""A whole training step (forward, backward, optimizer step) captured once as a CUDA graph, then replayed.

Why: an eager step at the released size launches about 6200 kernels, and on an H200 the GPU idles for half of a
batch-8 step waiting for the host to launch them; compiling every block halves the launches and the GPU still waits
(``experiments/README.md``, GPU results). A replayed graph launches the whole step's kernels with one call. It
works with the eager model and with blocks compiled by :func:`instructblip.train.parallelize.compile_blocks`.

What it asks of the step:

* fixed shapes: a batch is copied into the buffers captured with the first one; another shape needs another
  capture (pad batches to fixed lengths);
* no tensor read on the host inside the step: the loss takes its fixed-shape form while a capture
  runs (``instructblip.model.language.fixed_shapes``; packing reads lengths on the host and cannot be captured);
* a capturable optimizer (``capturable=True``: its step count lives on the GPU). The learning rate is read at
  capture; a schedule must be given as a tensor in the param groups and updated in place (a changed float rate is
  refused at the next step rather than ignored);
* warm-up steps before the capture (cuBLAS workspaces, the optimizer's state, compiled blocks' first calls): they
  run on the first batch and skip their updates, so they train nothing;
* a fused optimizer: a step with a non-finite loss or gradient is skipped through its ``found_inf`` flag.

Dropout draws new numbers at each replay (the CUDA generator advances its offset per replay; a ``torch.manual_seed``
before a replay is honoured). ``max_grad_norm`` clips the gradients by their global norm inside the step (the norm
the non-finite test takes anyway). Used by ``instructblip-train`` with ``stage.module.step_mode=cuda_graph``
(:class:`instructblip.train.module.InstructBlipModule`), by ``experiments/bench/train_throughput.py`` (side
``ours_graphed``) and by hand-written loops.
"""

from __future__ import annotations

import torch
from torch import nn

from instructblip.errors import ConfigError
from instructblip.model.graphs import as_if_capturing
from instructblip.model.language import fixed_shape_loss


def check_learning_rates(param_groups: list[dict], captured: list) -> None:
    """The replayed optimizer step uses the learning rates of the capture: a float one that has changed since (a
    scheduler's step) or a tensor one replaced by another object would be ignored, so it is refused instead."""
    for index, (group, then) in enumerate(zip(param_groups, captured)):
        now = group["lr"]
        changed = now is not then if isinstance(then, torch.Tensor) else now != then
        if changed:
            raise ValueError(
                f"param group {index}: the learning rate changed after the capture ({then!r} -> {now!r}) and the "
                "replayed step would ignore it; give the optimizer a tensor learning rate and update it in place "
                "(group['lr'].fill_(value))"
            )


class CudaGraphTrainStep:
    """``step(batch) -> loss``: one optimizer step of ``model`` on ``batch`` by replaying the captured graph.

    ``forward_kwargs`` go to every forward call (``return_logits=False`` for the training path); ``autocast_dtype``
    (None: no autocast) is the mixed precision of the step. The returned loss and ``per_sample_loss`` are the
    graph's own output buffers, overwritten by the next replay: clone them to keep them.

    A step whose loss or gradient norm is not finite changes nothing: the optimizer (fused) reads a ``found_inf``
    flag the step sets, as under a gradient scaler, and leaves the weights, moments and step count as they were;
    ``skipped_steps`` (a tensor on the step's device, read it when you log) counts them. The warm-up steps set the
    flag too, so they run every kernel of the step without training. ``capture=False`` runs the same step eagerly,
    on any device (for debugging, and to check a graph against). ``max_grad_norm``: clip the gradients to this global
    norm before the optimizer step (None: no clipping). ``pool``: another step's ``graph.pool()``, for steps of
    other batch shapes over the same model and optimizer: their graphs then share one memory pool, which is safe
    because a replay rewrites every pool tensor it reads (activations, gradients) before reading it, and the
    tensors that outlive a replay (the optimizer's state, the inputs, the counters) are allocated outside.
    ``average_gradients``: data parallel over the default process group, as DDP does it (the wrapper's own reducer
    kept out): the gradients are all-reduced and averaged after backward, and the loss summed, so every rank takes
    the same non-finite decision and clips by the same norm (NCCL collectives are captured into the graph).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        forward_kwargs: dict | None = None,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        warmup_steps: int = 3,
        capture: bool = True,
        max_grad_norm: float | None = None,
        pool=None,
        average_gradients: bool = False,
    ):
        not_capturable = [i for i, group in enumerate(optimizer.param_groups) if not group.get("capturable", False)]
        if capture and not_capturable:
            raise ConfigError(
                f"CudaGraphTrainStep needs a capturable optimizer: param groups {not_capturable} have "
                "capturable=False (e.g. torch.optim.AdamW(params, fused=True, capturable=True))"
            )
        if not all(group.get("fused", False) for group in optimizer.param_groups):
            raise ConfigError(
                "CudaGraphTrainStep needs a fused optimizer (fused=True): only the fused step reads the found_inf "
                "flag that skips a non-finite step"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={max_grad_norm}; expected a number > 0, or None for no clipping")
        if capture and warmup_steps < 1:
            raise ConfigError(f"warmup_steps={warmup_steps}; expected at least 1 (a step before the capture)")
        self.model, self.optimizer = model, optimizer
        self.forward_kwargs = dict(forward_kwargs or {})
        self.autocast_dtype = autocast_dtype
        self.capture = capture
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.average_gradients = average_gradients
        device = batch["input_ids"].device
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)
        self._warming_up = torch.ones((), device=device)
        if not isinstance(getattr(optimizer, "found_inf", None), torch.Tensor):  # another shape's step set one
            optimizer.found_inf = torch.zeros((), device=device)  # read by the fused step (what a GradScaler sets)
        if not capture:
            self._warming_up.zero_()
            return
        self.captured_learning_rates = [group["lr"] for group in optimizer.param_groups]
        self.inputs = {name: value.detach().clone() for name, value in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as a capture requires
            for _ in range(warmup_steps):
                with as_if_capturing():
                    self._step(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._warming_up.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.loss, self.per_sample_loss = self._step(self.inputs)

    def _step(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # set_to_none: in the capture, backward then allocates the gradients in the graph's pool
        self.optimizer.zero_grad(set_to_none=True)
        # autocast's weight-cast cache off, as torch's notes on graphs and autocast ask
        device_type = inputs["input_ids"].device.type
        autocast = torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, cache_enabled=False,
                                  enabled=self.autocast_dtype is not None)
        with autocast, fixed_shape_loss():  # the warm-up steps run what the capture records
            output = self.model(**inputs, **self.forward_kwargs)
        output.loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss = output.loss.detach()
        if self.average_gradients:
            loss = self._average(grads, loss)
        norm = torch.nn.utils.get_total_norm(grads)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        self.skipped_steps.add_((~finite).long() * (1 - self._warming_up.long()))
        if self.max_grad_norm is not None:  # on the device, no host read: the scale factor is clamped there
            torch.nn.utils.clip_grads_with_norm_(grads, self.max_grad_norm, norm)
        self.optimizer.found_inf.copy_(torch.maximum((~finite).float(), self._warming_up))
        self.optimizer.step()
        per_sample = getattr(output, "per_sample_loss", None)
        return output.loss.detach(), None if per_sample is None else per_sample.detach()

    @staticmethod
    def _average(grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Every rank's gradients averaged in place (sum, then 1 / world size: gloo has no average); the loss summed
        over the ranks, for the non-finite test only."""
        import torch.distributed as dist

        for grad in grads:
            dist.all_reduce(grad)
        torch._foreach_mul_(grads, 1.0 / dist.get_world_size())
        total = loss.clone()
        dist.all_reduce(total)
        return total

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.capture:  # the optimizer reads its learning rates at each step
            self.loss, self.per_sample_loss = self._step(batch)
            return self.loss
        check_learning_rates(self.optimizer.param_groups, self.captured_learning_rates)
        for name, buffer in self.inputs.items():
            value = batch[name]
            if value.shape != buffer.shape:
                raise ValueError(
                    f"batch[{name!r}] has shape {tuple(value.shape)}; the graph was captured with "
                    f"{tuple(buffer.shape)} (pad batches to fixed lengths, or capture one graph per shape)"
                )
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.loss
