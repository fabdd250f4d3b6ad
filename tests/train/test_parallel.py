"""FSDP2 wrapping (instructblip.train.parallelize): the unit selection on CPU, a real sharded step on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from train_helpers import Killed, compose, stop_before_step, tiny_overrides


def test_blocks_become_units_and_each_unit_is_all_frozen_or_all_trainable(tiny_checkpoint):
    from instructblip.model.instructblip import InstructBlip
    from instructblip.train.module import select_trainable
    from instructblip.train.parallelize import transformer_blocks

    model = InstructBlip.from_pretrained(str(tiny_checkpoint))
    select_trainable(model, ["query_tokens", "qformer", "projection", "vision.ln_vision"])
    blocks = transformer_blocks(model)
    owners = {id(block): name for name, block in model.named_modules() if any(block is b for b in blocks)}
    names = sorted(owners.values())
    assert any(n.startswith("vision.trunk.blocks.") for n in names)
    assert any(n.startswith("qformer.layers.") for n in names)
    assert any(n.startswith("llm.") for n in names)
    assert len(names) == len(blocks)
    for block in blocks:  # no unit mixes frozen and trainable parameters (no gradient memory for frozen ones)
        assert len({p.requires_grad for p in block.parameters()}) == 1
    # no unit inside another one
    for block in blocks:
        inner = set(map(id, block.modules())) - {id(block)}
        assert not inner & set(map(id, blocks))


def _sharded_tiny_llama(tied: bool = False):
    """The tiny-llama preset, trained as stage 2 trains it, under ``parallelize`` on a one-process CPU mesh (the
    caller holds the gloo group)."""
    from torch.distributed.device_mesh import init_device_mesh

    from instructblip.model.instructblip import InstructBlip
    from instructblip.model.presets import get_preset
    from instructblip.train.module import freeze_unused, select_trainable
    from instructblip.train.parallelize import parallelize

    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-llama"))
    if tied:
        llm = model.llm.hf_model
        llm.get_output_embeddings().weight = llm.get_input_embeddings().weight
    select_trainable(model, ["query_tokens", "qformer", "projection", "vision.ln_vision"])
    freeze_unused(model)
    holder = type("Holder", (), {})
    trainer = holder()
    trainer.strategy = holder()
    trainer.strategy.device_mesh = {"data_parallel": init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))}
    return parallelize(model, trainer)


@pytest.mark.parametrize("tied", [False, True])
def test_the_output_head_is_a_unit_of_its_own_and_a_sharded_step_runs(tied, tmp_path):
    """The LLM head outside the root (on an H200 with torch 2.11 its weight was freed, in the root, before backward
    read it), with the input embeddings when they share its weight; then one bf16 step, here under gloo."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from instructblip.testing import preset_training_batch

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = _sharded_tiny_llama(tied)
        llm = model.llm.hf_model
        head, embeddings = llm.get_output_embeddings(), llm.get_input_embeddings()
        assert isinstance(head, FSDPModule)
        assert isinstance(embeddings, FSDPModule) == tied  # grouped with the head when the weight is shared
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**preset_training_batch("cpu", 0), return_logits=False).loss
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        assert model.query_tokens.grad is not None
    finally:
        dist.destroy_process_group()


def test_the_root_keeps_its_gathered_parameters_from_forward_to_backward(tmp_path, monkeypatch):
    """FSDP2 keeps the root's gathered parameters from forward to backward. A method registered as an FSDP forward
    method and called inside ``forward`` (``encode_images`` was) made the root free them after forward, and torch
    2.11's FSDP2, whose pre-backward hook finds the loss only through ``tree_flatten`` (which does not open the model's
    output dataclass), never gathered them again: backward read freed memory (an illegal memory access on the H200).
    That hook is emulated here where this torch has the function it replaced."""
    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_state as fsdp_state
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_flatten

    from instructblip.testing import preset_training_batch

    if hasattr(fsdp_state, "collect_grad_tensors"):
        monkeypatch.setattr(fsdp_state, "collect_grad_tensors", lambda output: tuple(
            t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = _sharded_tiny_llama()
        for step in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**preset_training_batch("cpu", step), return_logits=False).loss
            # gathered: plain tensors in place of the sharded DTensors, their storage allocated
            root = [model.projection.weight, model.query_tokens, model.llm.hf_model.model.norm.weight]
            assert not any(isinstance(p, DTensor) for p in root), f"step {step}: the root freed its parameters"
            assert all(p.untyped_storage().nbytes() for p in root)
            loss.backward()
            assert all(isinstance(p, DTensor) for p in model.parameters())  # freed after backward
            assert model.projection.weight.grad is not None and torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def restored_environment():
    """``os.environ`` as it was before the test: an in-process distributed Lightning run sets WORLD_SIZE, LOCAL_RANK,
    MASTER_PORT, ..., with which a later test's launcher would take itself for an already spawned rank and wait."""
    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before):
        del os.environ[name]
    os.environ.update(before)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fsdp_trainer_on_a_cpu_trains_checkpoints_and_resumes_exactly(precision, tiny_checkpoint, generated_data,
                                                                       tmp_path, restored_environment):
    """trainer=fsdp (Lightning's ModelParallelStrategy, parallelize's FSDP2 units) on a CPU under gloo: every
    parameter sharded, the checkpoint holds the trainable weights, and a run interrupted after its step-2 checkpoint
    and resumed from it ends with the uninterrupted run's weights. Under 32-true the parameters are gathered in
    fp32 (in bf16 they would meet fp32 activations without autocast)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from instructblip.train.run import build

    with socket.socket() as probe:  # the in-process group's rendezvous on a free port
        probe.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ["MASTER_ADDR"] = "127.0.0.1"

    def run(run_dir, stop_before=None, resume=None):
        cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=4), "trainer=fsdp",
                       "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.precision={precision}",
                       "callbacks=default", "callbacks.progress_bar=null", "callbacks.throughput=null",
                       "checkpoint.every_n_steps=2", "checkpoint.export_huggingface=false"], run_dir)
        module, datamodule, trainer = build(cfg)
        if stop_before is not None:
            trainer.callbacks.append(stop_before_step(stop_before))
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=False)
        except Killed:
            pass
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return module, trainer

    module, trainer = run(tmp_path / "whole")
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(isinstance(p, DTensor) for p in module.model.parameters())
    checkpoint = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n in module.trainable_names}
    expected = {k: v.full_tensor() for k, v in module.trainable_state_dict().items()}

    _, trainer = run(tmp_path / "cut", stop_before=3)
    assert trainer.global_step == 3
    module, trainer = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoints" / "step=2.ckpt"))
    assert trainer.global_step == 4
    resumed = {k: v.full_tensor() for k, v in module.trainable_state_dict().items()}
    assert all(torch.equal(resumed[k], expected[k]) for k in expected), "the resumed run ended elsewhere"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 (ModelParallelStrategy) needs a CUDA device")
def test_fsdp_step_on_a_gpu(tiny_checkpoint, generated_data, tmp_path):
    from torch.distributed.tensor import DTensor

    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=2), "trainer=fsdp",
                   "trainer.devices=1", "callbacks=default", "checkpoint.every_n_steps=1",
                   "checkpoint.export_huggingface=false"], tmp_path)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert all(isinstance(p, DTensor) for p in module.model.parameters())
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{n}" for n in module.trainable_names}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 frozen towers are a GPU setting")
def test_gpu_bf16_mixed_keeps_frozen_towers_in_bf16(tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=1), "trainer=gpu",
                   "trainer.devices=1"], tmp_path)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    params = dict(module.model.named_parameters())
    # the last Q-Former layer's text branch is frozen because nothing uses it, and stays in the Q-Former's fp32
    unused = set(module.model.unused_parameter_names())
    assert unused and all(params[n].dtype == torch.float32 for n in unused)
    towers = [n for n in module.frozen_names if n not in unused]
    assert towers and [n for n in towers if params[n].dtype != torch.bfloat16] == []
    assert [n for n in module.trainable_names if params[n].dtype != torch.float32] == []


def test_whole_model_compile_reaches_the_training_run(tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.parallelize import transformer_blocks
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=1),
                   "stage.module.compile=aot_eager", "stage.module.compile_scope=whole"], tmp_path)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert module.model._compiled_call_impl is not None  # the model's forward, one graph
    assert all(block._compiled_call_impl is None for block in transformer_blocks(module.model))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_an_unknown_compile_scope_names_the_key_and_the_choices(tiny_checkpoint, generated_data, tmp_path):
    from instructblip.errors import ConfigError
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=1),
                   "stage.module.compile_scope=everything"], tmp_path)
    with pytest.raises(ConfigError, match=r"stage.module.compile_scope='everything' \(str\); expected blocks, whole"):
        build(cfg)


@pytest.mark.parametrize("scope", ["blocks", "whole"])
def test_the_compile_mode_reaches_torch_compile(tiny_checkpoint, generated_data, tmp_path, monkeypatch, scope):
    """stage.module.compile_mode goes to every torch.compile call the module makes (each block's, or the model's),
    which still compiles (torch.compile is called through, with the cheap aot_eager backend)."""
    from instructblip.train.parallelize import transformer_blocks
    from instructblip.train.run import build

    calls = []
    real_compile = torch.compile

    def recording_compile(*args, **kwargs):
        calls.append(kwargs)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=1),
                   "stage.module.compile=aot_eager", f"stage.module.compile_scope={scope}",
                   "stage.module.compile_mode=max-autotune-no-cudagraphs"], tmp_path)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert calls and all(c == {"backend": "aot_eager", "mode": "max-autotune-no-cudagraphs"} for c in calls), calls
    assert len(calls) == (1 if scope == "whole" else len(transformer_blocks(module.model)))


@pytest.mark.parametrize("overrides, message", [
    # each block its own CUDA graph: failed on an H200, and would nest inside the step's own graph
    (["stage.module.compile=true", "stage.module.compile_mode=reduce-overhead"],
     r"stage.module.compile_mode='reduce-overhead' \(str\); expected null, default, max-autotune-no-cudagraphs"),
    # a mode with nothing compiled would be ignored
    (["stage.module.compile_mode=max-autotune-no-cudagraphs"],
     r"compile_mode=max-autotune-no-cudagraphs applies to compiled code; set stage.module.compile=true"),
])
def test_a_compile_mode_that_cannot_apply_is_refused(tiny_checkpoint, generated_data, tmp_path, overrides, message):
    from instructblip.errors import ConfigError
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=1), *overrides],
                  tmp_path)
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_sharded_checkpoint_consolidates_to_one_file(tmp_path):
    """A DCP checkpoint directory (what sharded FSDP saves, with Lightning's meta.pt beside it) -> one .ckpt."""
    import torch.distributed.checkpoint as dcp

    from instructblip.train.checkpointing import consolidate

    state = {"state_dict": {"model.qformer.w": torch.randn(4, 3), "model.query_tokens": torch.randn(1, 2, 3)}}
    sharded = tmp_path / "step=5.ckpt"
    dcp.save(state, checkpoint_id=str(sharded), no_dist=True)
    torch.save({"global_step": 5, "loops": {"fit_loop": {}}}, sharded / "meta.pt")
    merged = torch.load(consolidate(sharded), map_location="cpu", weights_only=False)
    assert merged["global_step"] == 5
    for key, value in state["state_dict"].items():
        assert torch.equal(merged["state_dict"][key], value)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_train_like_the_eager_model_and_share_their_graphs(tiny_checkpoint):
    """Regional compilation: same loss and gradients, and one compiled graph serves all blocks of a tower."""
    import copy

    from PIL import Image

    from instructblip.model.instructblip import InstructBlip
    from instructblip.train.module import select_trainable
    from instructblip.train.parallelize import compile_blocks, transformer_blocks

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = InstructBlip.from_pretrained(str(tiny_checkpoint))
    select_trainable(model, ["query_tokens", "qformer", "projection", "vision.ln_vision"])
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "navy")]
    batch = model.processor.training_batch(images, ["what colour is it?", "describe"], ["red", "a navy square"])
    compiled = compile_blocks(copy.deepcopy(model), backend="aot_eager")
    eager_loss, eager_grads = _loss_and_grads(model, batch)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    blocks = transformer_blocks(compiled)
    assert all(block._compiled_call_impl is not None for block in blocks)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs < len(blocks), (graphs, len(blocks))


def test_compiled_blocks_stay_compiled_through_train_eval_and_batch_sizes(tiny_checkpoint):
    """Each kind of block compiles once per grad mode, train/eval and batch size: more graphs than torch's default
    limit of 8 per function, past which it would run the remaining calls eagerly (and the Q-Former's last layers
    did, on an H200). ``fail_on_recompile_limit_hit`` turns that silent fallback into an error."""
    from PIL import Image

    from instructblip.model.instructblip import InstructBlip
    from instructblip.train.module import select_trainable
    from instructblip.train.parallelize import compile_blocks

    torch._dynamo.reset()
    model = InstructBlip.from_pretrained(str(tiny_checkpoint))
    select_trainable(model, ["query_tokens", "qformer", "projection", "vision.ln_vision"])
    assert len({layer.cross_attention is None for layer in model.qformer.layers}) == 2  # two kinds of layer
    # torch's default limit to start from; one graph per batch size; the fallback made an error
    with torch._dynamo.config.patch(recompile_limit=8, automatic_dynamic_shapes=False,
                                    fail_on_recompile_limit_hit=True):
        compile_blocks(model, backend="aot_eager")
        for size in (1, 2, 3):
            images = [Image.new("RGB", (40, 40), "red")] * size
            batch = model.processor.training_batch(images, ["what colour is it?"] * size, ["red"] * size)
            model.train()
            model(**batch, return_logits=False).loss.backward()
            model.eval()
            with torch.no_grad():
                assert torch.isfinite(model(**batch, return_logits=False).loss)
    torch._dynamo.reset()


def test_compile_option_reaches_the_training_run(tiny_checkpoint, generated_data, tmp_path):
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=1),
                   "stage.module.compile=aot_eager"], tmp_path)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    from instructblip.train.parallelize import transformer_blocks

    assert all(block._compiled_call_impl is not None for block in transformer_blocks(module.model))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
