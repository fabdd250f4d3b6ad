"""Which frozen parts train with dropout: the vision trunk never; the LLM as in LAVIS (kept in train mode, so
FlanT5's dropout is on), unless ``stage.module.frozen_llm_dropout=false``. And the parameters no output depends on
(the last Q-Former layer's text branch) stay frozen."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from train_helpers import compose, tiny_overrides


@pytest.fixture(scope="module")
def tiny_t5_checkpoint(tmp_path_factory):
    from instructblip.testing import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_t5") / "checkpoint"
    make_tiny_checkpoint(path, "t5")
    return path


class Modes(pl.Callback):
    def __init__(self):
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = pl_module.model
        self.seen.append(dict(
            llm_dropout_active=any(m.training for m in model.llm.modules() if "Dropout" in type(m).__name__),
            trunk=model.vision.trunk.training,
            qformer=model.qformer.training,
        ))


@pytest.mark.parametrize("llm_dropout", [True, False])
def test_the_frozen_llm_keeps_its_dropout_as_lavis_and_the_trunk_never(
    tiny_t5_checkpoint, generated_data, tmp_path, llm_dropout
):
    from instructblip.train.run import build

    cfg = compose(["experiment=smoke", *tiny_overrides(tiny_t5_checkpoint, generated_data, steps=2), "model=tiny_t5",
                   "validation.every_n_steps=1", "validation.samples_per_dataset=2",
                   f"stage.module.frozen_llm_dropout={str(llm_dropout).lower()}"], tmp_path)
    module, datamodule, trainer = build(cfg)
    modes = Modes()
    trainer.callbacks.append(modes)
    trainer.fit(module, datamodule=datamodule)
    unused = module.model.unused_parameter_names()
    params = dict(module.model.named_parameters())
    assert unused and all(name.startswith("qformer.layers.1.text_ffn.") for name in unused)
    assert set(unused) <= set(module.frozen_names) and not set(unused) & set(module.trainable_names)
    assert not any(params[name].requires_grad for name in unused)
    assert any(params[name].requires_grad for name in module.trainable_names if name.startswith("qformer.layers.1."))

    assert module.model.llm.text_config.dropout_rate > 0  # FlanT5-like: there is a dropout to keep or switch off
    # the second step comes after a validation pass, which switched everything to eval and back
    assert modes.seen == [dict(llm_dropout_active=llm_dropout, trunk=False, qformer=True)] * 2
