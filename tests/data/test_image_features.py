"""Precomputed image features (``instructblip.data.features`` + ``data.image_features``): the command writes the
frozen trunk's output per shard, skipping and counting a corrupt image; the training loader reads it back; the loss
is the pixel path's; bad combinations are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instructblip.testing import import_script

SEED = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from instructblip import InstructBlip
    from instructblip.testing import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    make_tiny_checkpoint(path, "llama")
    model = InstructBlip.from_pretrained(str(path), dtype_policy="float32")
    return path, model.eval()


@pytest.fixture()
def vqa_shards(shards) -> str:
    """Two shards of VQA samples; the second holds one sample whose JPEG is cut short (corrupt)."""
    paths = shards.dataset("vqav2", num_shards=1, per_shard=4)
    records = [shards.vqa_record("vqav2", 10 + i) for i in range(3)]
    samples = [shards.sample(r) for r in records]
    samples[1]["jpg"] = samples[1]["jpg"][:40]
    paths.append(shards.write("vqav2-train-000001.tar", samples))
    return str(Path(paths[0]).parent / "vqav2-train-*.tar")


def datamodule(shard_glob: str, model, features: str | None, steps: int = 6, dataset: str = "vqav2"):
    from instructblip.train.data import InstructBlipDataModule

    module = InstructBlipDataModule(datasets={dataset: shard_glob}, batch_size=2, seed=SEED, augment=False,
                                    image_features=features)
    module.trainer = SimpleNamespace(global_rank=0, world_size=1, accumulate_grad_batches=1, max_steps=steps,
                                     lightning_module=SimpleNamespace(processor=model.processor, model=model))
    module.setup()
    return module


def assert_same_training_loss(model, pixel_batch: dict, feature_batch: dict) -> None:
    """The training loss of the batch built from pixels equals that of the one built from stored features."""
    losses = []
    for batch in (pixel_batch, feature_batch):
        inputs = {k: v for k, v in batch.items() if k not in ("dataset", "sample_index")}
        torch.manual_seed(0)  # dropout
        losses.append(model(**inputs, return_logits=False).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)


def test_written_features_are_the_trunk_output_and_the_corrupt_image_is_counted(tiny_model, vqa_shards, tmp_path):
    from instructblip.data.features import ImageFeatures, write_features
    from instructblip.data.shards import ExampleDecoder, SkipCounter
    from instructblip.train.data import ShardIndex, expand_shards

    _, model = tiny_model
    summary = write_features(model, {"vqav2": vqa_shards}, tmp_path / "features", batch_size=3, dtype="float32",
                             progress=False)
    assert summary == {"vqav2": {"written": 6, "skipped": 1, "bad_image": 1, "shards_done_before": 0}}
    assert sorted(p.name for p in (tmp_path / "features" / "vqav2").iterdir()) == [
        "vqav2-train-000000.safetensors", "vqav2-train-000001.safetensors"]

    index = ShardIndex(expand_shards(vqa_shards, "test"))
    stored = ImageFeatures(tmp_path / "features", {"vqav2": index})
    tokens, width = model.config.vision.num_tokens, model.vision.width
    assert (stored.tokens, stored.width) == (tokens, width)
    decoder = ExampleDecoder(SkipCounter())
    for i in range(len(index)):
        features = stored.get("vqav2", index.shard_id(i), index.key(i))
        decoded = decoder(index.read(i))
        if decoded is None:  # the corrupt one
            assert features is None and index.key(i) == "vqav2_11"
            continue
        pixels = model.processor.pixel_values(decoded.images)
        with torch.no_grad():
            expected = model.vision.trunk.forward_features(pixels)
        assert features.shape == (1, tokens, width) and features.dtype == torch.float32
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)

    # a second run finds every shard done and writes nothing
    again = write_features(model, {"vqav2": vqa_shards}, tmp_path / "features", dtype="float32", progress=False)
    assert again["vqav2"]["shards_done_before"] == 2 and again["vqav2"]["written"] == 0


def test_loader_yields_features_and_the_loss_equals_the_pixel_loss(tiny_model, vqa_shards, tmp_path):
    from instructblip.data.features import write_features

    _, model = tiny_model
    write_features(model, {"vqav2": vqa_shards}, tmp_path / "features", dtype="float32", progress=False)
    with_pixels = datamodule(vqa_shards, model, None)
    with_features = datamodule(vqa_shards, model, str(tmp_path / "features"))
    pixel_batches = list(with_pixels.train_dataloader())
    feature_batches = list(with_features.train_dataloader())
    assert len(pixel_batches) == len(feature_batches) == 6
    # the same draws: the corrupt sample is skipped (and counted) on both paths
    assert with_pixels.skip_counts()["vqav2"]["bad_image"] == with_features.skip_counts()["vqav2"]["bad_image"] > 0
    model.train()
    try:
        for pixels, features in zip(pixel_batches, feature_batches):
            assert "pixel_values" not in features and features["image_features"].shape[1:] == (
                model.config.vision.num_tokens, model.vision.width)
            assert torch.equal(pixels["sample_index"], features["sample_index"])
            assert torch.equal(pixels["input_ids"], features["input_ids"])
            assert_same_training_loss(model, pixels, features)
    finally:
        model.eval()


def test_the_command_writes_and_prints_its_summary(tiny_model, vqa_shards, tmp_path, monkeypatch, capsys):
    from instructblip.data import features

    checkpoint, _ = tiny_model
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["features", f"checkpoint={checkpoint}", f"out={out}",
                                      f"datasets={{vqav2: '{vqa_shards}'}}", "progress=false", "device=cpu",
                                      "num_workers=1"])  # decoding in a worker: its skip count reaches the summary
    features.main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vqav2"]["written"] == 6 and summary["vqav2"]["bad_image"] == 1
    assert len(list((out / "vqav2").glob("*.safetensors"))) == 2


def test_features_with_augmentation_or_another_tower_are_refused(tiny_model, vqa_shards, tmp_path):
    from safetensors.torch import save_file

    from instructblip.errors import ConfigError
    from instructblip.train.data import InstructBlipDataModule

    with pytest.raises(ConfigError, match=r"data\.image_features is set but data\.augment=true"):
        InstructBlipDataModule(datasets={"vqav2": vqa_shards}, batch_size=2, image_features=str(tmp_path))
    # features of a wider tower, in the real file format
    _, model = tiny_model
    for shard in ("vqav2-train-000000", "vqav2-train-000001"):
        path = tmp_path / "wide" / "vqav2" / f"{shard}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"vqav2_0": torch.zeros(1, 5, 48)}, str(path), metadata={"tokens": "5", "width": "48",
                                                                         "image_size": "28"})
    module = datamodule(vqa_shards, model, str(tmp_path / "wide"))
    with pytest.raises(ConfigError, match=r"data\.image_features=.*width=48.*model\.vision.*width=32"):
        module.train_dataloader()
    # a trunk that trains changes its output every step: stored features would silently freeze it
    model.vision.trunk.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match=r"data\.image_features=.*vision trunk \(vision\.trunk\) trains"):
            module.train_dataloader()
    finally:
        model.vision.trunk.requires_grad_(False)


def test_config_composes_with_image_features(tmp_path):
    from hydra.utils import instantiate

    compose = import_script("tests/train", "train_helpers").compose

    cfg = compose(["data.image_features=/features", "data.augment=false"], tmp_path)
    module = instantiate(cfg.data)
    assert module.image_features_dir == "/features" and module.augment is False
    assert compose([], tmp_path).data.image_features is None
    from instructblip.errors import ConfigError
    from instructblip.train.validate import check_config

    with pytest.raises(ConfigError, match=r"data\.image_features is set but data\.augment=true"):
        check_config(compose(["data.image_features=/features"], tmp_path))  # before anything is built: one line
    check_config(compose(["data.image_features=/features", "data.augment=false"], tmp_path))


def test_video_features_give_the_video_pixel_queries(tiny_model):
    """(B, T, tokens, width) features: the frames' queries concatenated frame-major, as (B, T, 3, H, W) pixels."""
    _, model = tiny_model
    size = model.config.vision.image_size
    video = torch.randn(2, 3, 3, size, size, generator=torch.Generator().manual_seed(0))
    instruction = torch.tensor([[101, 2054, 102], [101, 2129, 102]])
    with torch.no_grad():
        features = model.vision.trunk.forward_features(video.flatten(0, 1)).unflatten(0, (2, 3))
        from_pixels = model.encode_images(video, instruction)
        from_features = model.encode_images(None, instruction, image_features=features)
    assert from_features.shape == (2, 3 * model.config.num_query_tokens, model.llm.hidden_size)
    torch.testing.assert_close(from_features, from_pixels, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_features"):
        model.encode_images(video, instruction, image_features=features)


def test_video_shard_features_are_each_frames_trunk_output_and_train_like_pixels(tiny_model, shards, tmp_path):
    """A video shard (frame0.jpg ... frame2.jpg per sample): the command stores (frames, tokens, width) per sample,
    the loader hands (B, frames, tokens, width) to the model, and the loss is the pixel path's."""
    from safetensors.torch import load_file

    from instructblip.data.features import features_file, write_features
    from instructblip.data.record import Record

    _, model = tiny_model
    frames = 3
    records = [Record(dataset="msrvtt_qa", task="video_qa", id=f"msrvtt_qa_{i}", split="train", num_frames=frames,
                      question=f"what moves in clip {i}?", answers=["a cube"]) for i in range(4)]
    samples = [shards.sample(r, **{f"frame{t}.jpg": shards.image_bytes(10 * i + t) for t in range(frames)})
               for i, r in enumerate(records)]
    shard = shards.write("msrvtt_qa-train-000000.tar", samples)
    summary = write_features(model, {"msrvtt_qa": shard}, tmp_path / "features", batch_size=3, dtype="float32",
                             progress=False)
    assert summary["msrvtt_qa"]["written"] == 4 and summary["msrvtt_qa"]["skipped"] == 0
    stored = load_file(str(features_file(tmp_path / "features", "msrvtt_qa", shard)))
    tokens, width = model.config.vision.num_tokens, model.vision.width
    assert {key: tuple(t.shape) for key, t in stored.items()} == {r.id: (frames, tokens, width) for r in records}

    with_pixels = datamodule(shard, model, None, steps=2, dataset="msrvtt_qa")
    with_features = datamodule(shard, model, str(tmp_path / "features"), steps=2, dataset="msrvtt_qa")
    pixel_batches = list(with_pixels.train_dataloader())
    feature_batches = list(with_features.train_dataloader())
    assert len(pixel_batches) == len(feature_batches) == 2
    model.train()
    try:
        for pixels, features in zip(pixel_batches, feature_batches):
            assert pixels["pixel_values"].shape[1] == frames
            assert features["image_features"].shape[1:] == (frames, tokens, width)
            with torch.no_grad():  # the stored frames are the trunk's output on the pixel batch's frames
                trunk = model.vision._run_trunk(pixels["pixel_values"].flatten(0, 1)).unflatten(0, (-1, frames))
            torch.testing.assert_close(features["image_features"], trunk, rtol=1e-6, atol=1e-6)
            assert_same_training_loss(model, pixels, features)
    finally:
        model.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 trunk and bf16-mixed training are GPU settings")
def test_gpu_bf16_features_written_then_trained_on_through_lightning(tmp_path):
    """On a GPU (frozen trunk in bf16 by the dtype policy): the command stores bf16 features, the loss from them is
    the pixel path's, and a bf16-mixed Lightning run trains from them."""
    helpers = import_script("tests/train", "train_helpers")
    compose, tiny_overrides = helpers.compose, helpers.tiny_overrides

    from instructblip import InstructBlip
    from instructblip.data.features import write_features
    from instructblip.testing import make_tiny_checkpoint
    from instructblip.train.run import build
    from instructblip.train.synthetic import write_generated_shards

    make_tiny_checkpoint(tmp_path / "checkpoint", "llama")
    globs = write_generated_shards(tmp_path / "data", samples_per_dataset=32, samples_per_shard=16, image_size=32)
    model = InstructBlip.from_pretrained(str(tmp_path / "checkpoint"), device="cuda").eval()
    assert next(model.vision.trunk.parameters()).dtype == torch.bfloat16
    summary = write_features(model, globs, tmp_path / "features", batch_size=8, progress=False)
    assert {name: counts["written"] for name, counts in summary.items()} == {"coco_caption": 32, "vqav2": 32}

    pixels_batch = next(iter(datamodule(globs["vqav2"], model, None, steps=1).train_dataloader()))
    features_batch = next(iter(datamodule(globs["vqav2"], model, str(tmp_path / "features"), steps=1)
                               .train_dataloader()))
    assert features_batch["image_features"].dtype == torch.bfloat16
    losses = []
    for batch in (pixels_batch, features_batch):
        inputs = {k: v.cuda() for k, v in batch.items() if k not in ("dataset", "sample_index")}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(**inputs, return_logits=False).loss.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)  # bf16 trunk: kernels may differ by batch

    cfg = compose([*tiny_overrides(tmp_path / "checkpoint", tmp_path / "data", steps=2), "trainer=gpu",
                   "trainer.devices=1", "data.augment=false", f"data.image_features={tmp_path / 'features'}",
                   "data.group_by_length=true"], tmp_path / "run")
    module, datamodule_, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule_)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
