"""``stage.module.qformer_autocast``: under a 32-true trainer the Q-Former's forward (and backward) compute in bf16
while its master weights, the projection and the frozen LLM stay fp32, and the checkpoint keeps its names."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from train_helpers import compose, tiny_overrides


class Dtypes(pl.Callback):
    """The output dtypes of one Q-Former linear layer and one LLM linear layer, per training forward."""

    def __init__(self):
        self.seen: dict[str, set] = {"qformer": set(), "llm": set()}

    def on_fit_start(self, trainer, pl_module):
        model = pl_module.model
        qformer_linear = next(m for m in model.qformer.modules() if isinstance(m, torch.nn.Linear))
        llm_linear = next(m for m in model.llm.modules() if isinstance(m, torch.nn.Linear))
        for key, linear in (("qformer", qformer_linear), ("llm", llm_linear)):
            linear.register_forward_hook(lambda _m, _i, out, key=key: self.seen[key].add(out.dtype))


def fit(tiny_checkpoint, generated_data, run_dir, *overrides):
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_checkpoint, generated_data, steps=3),
                   "optimizer.lr=1e-2", *overrides], run_dir)
    module, datamodule, trainer = build(cfg)
    dtypes = Dtypes()
    trainer.callbacks.append(dtypes)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, dtypes


def test_the_qformer_computes_in_bf16_and_everything_else_stays_fp32(tiny_checkpoint, generated_data, tmp_path):
    plain, plain_trainer, plain_dtypes = fit(tiny_checkpoint, generated_data, tmp_path / "fp32")
    mixed, trainer, dtypes = fit(tiny_checkpoint, generated_data, tmp_path / "bf16",
                                 "stage.module.qformer_autocast=bfloat16")
    assert str(trainer.precision) == "32-true" and trainer.global_step == plain_trainer.global_step == 3
    assert plain_dtypes.seen == {"qformer": {torch.float32}, "llm": {torch.float32}}
    assert dtypes.seen == {"qformer": {torch.bfloat16}, "llm": {torch.float32}}
    ours, theirs = mixed.trainable_state_dict(), plain.trainable_state_dict()
    assert ours.keys() == theirs.keys()   # the checkpoint's names: the Q-Former is not wrapped
    assert all(v.dtype == torch.float32 for v in ours.values())   # fp32 master weights
    qformer_keys = [k for k in ours if k.startswith("qformer.")]
    assert qformer_keys
    # trained alike (same data and seed), not identically: bf16 products moved the weights a little differently
    # (over all of the Q-Former: a key bias, which softmax makes gradient-free, is Adam-normalised noise in both)
    ours_all = torch.cat([ours[k].flatten() for k in qformer_keys])
    theirs_all = torch.cat([theirs[k].flatten() for k in qformer_keys])
    assert (ours_all - theirs_all).norm() <= 0.01 * theirs_all.norm()
    assert any(not torch.equal(ours[k], theirs[k]) for k in qformer_keys)
