"""``instructblip-convert``: Hugging Face <-> LAVIS round trips, and trained weights -> the Hugging Face layout."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import InstructBlipForConditionalGeneration

from instructblip.checkpoint import lavis


def convert(monkeypatch, capsys, *overrides: str) -> tuple[int, str, str]:
    from instructblip.cli import convert as command

    monkeypatch.setattr(sys, "argv", ["instructblip-convert", *overrides])
    capsys.readouterr()  # only what the command itself prints
    try:
        command.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hf_logits(directory, seed: int = 0) -> torch.Tensor:
    model = InstructBlipForConditionalGeneration.from_pretrained(directory).eval()
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    image_id = config.image_token_index
    batch = dict(
        pixel_values=torch.randn(2, 3, size, size, generator=generator),
        qformer_input_ids=torch.tensor([[101, 2054, 2003, 102], [101, 2129, 102, 0]]),
        qformer_attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        input_ids=torch.tensor([[image_id] * config.num_query_tokens + [2, 30, 40]] * 2),
    )
    if not config.use_decoder_only_language_model:
        batch["input_ids"][:, -1] = 1
        batch["decoder_input_ids"] = torch.tensor([[0, 30, 40], [0, 50, 60]])
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_hf_to_lavis_to_hf_round_trip(tiny_dirs, tmp_path, monkeypatch, capsys, llm):
    source = tiny_dirs[llm]
    code, out, err = convert(monkeypatch, capsys, f"src={source}", f"dst={tmp_path / 'lavis'}")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("wrote LAVIS InstructBLIP")
    trimmed = torch.load(tmp_path / "lavis" / "instruct_blip_trimmed.pth", weights_only=True)["model"]
    projection = "llm_proj.weight" if llm == "llama" else "t5_proj.weight"
    assert projection in trimmed and not any(k.startswith(("visual_encoder.", "llm_model.", "t5_model.")) for k in trimmed)

    code, out, err = convert(
        monkeypatch,
        capsys,
        f"src={tmp_path / 'lavis' / 'instruct_blip_trimmed.pth'}",
        f"vision={tmp_path / 'lavis' / 'eva_vit.pth'}",
        f"llm={tmp_path / 'lavis' / 'llm'}",
        f"config={source / 'config.json'}",
        f"dst={tmp_path / 'back'}",
    )
    assert code == 0, err
    before, after = lavis.load_hf(source).state_dict, lavis.load_hf(tmp_path / "back").state_dict
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(hf_logits(source), hf_logits(tmp_path / "back"))


def test_trained_weights_export_to_hf(tiny_dirs, tmp_path, monkeypatch, capsys):
    from instructblip.model.instructblip import InstructBlip

    base = tiny_dirs["llama"]
    model = InstructBlip.from_pretrained(base)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert "query_tokens" in trainable and not any(name.startswith("llm.") for name in trainable)
    with torch.no_grad():  # "training": every trainable tensor moves
        for tensor in trainable.values():
            tensor.add_(0.01 * torch.randn_like(tensor))
    save_file({name: t.detach().contiguous() for name, t in trainable.items()}, tmp_path / "trainable.safetensors")
    lightning = {"state_dict": {f"model.{name}": t.detach().clone() for name, t in trainable.items()}, "epoch": 0}
    torch.save(lightning, tmp_path / "last.ckpt")
    import torch.distributed.checkpoint as dcp

    dcp.save(lightning, checkpoint_id=str(tmp_path / "sharded"))  # what FSDP runs write: a directory of shards

    code, _, err = convert(monkeypatch, capsys, f"src={tmp_path / 'last.ckpt'}", f"dst={tmp_path / 'x'}")
    assert code == 2 and "base=" in err and len(err.strip().splitlines()) == 1

    for name in ("trainable.safetensors", "last.ckpt", "sharded"):
        out_dir = tmp_path / f"hf-{name}"
        code, out, err = convert(monkeypatch, capsys, f"src={tmp_path / name}", f"base={base}", f"dst={out_dir}")
        assert code == 0, err
        exported = lavis.load_hf(out_dir).state_dict
        assert torch.equal(exported["query_tokens"], trainable["query_tokens"].detach())
        original = lavis.load_hf(base).state_dict
        assert not torch.equal(exported["query_tokens"], original["query_tokens"])
        assert torch.equal(
            exported["language_model.lm_head.weight"][: original["language_model.lm_head.weight"].shape[0]],
            original["language_model.lm_head.weight"],
        )


def test_convert_refuses_to_overwrite_and_unknown_directions(tiny_dirs, tmp_path, monkeypatch, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = convert(monkeypatch, capsys, f"src={tiny_dirs['llama']}", f"dst={occupied}")
    assert code == 2 and "overwrite=true" in err
    code, _, err = convert(monkeypatch, capsys, f"src={tiny_dirs['llama']}", f"dst={tmp_path / 'y'}", "to=onnx")
    assert code == 2 and "to=lavis" in err and len(err.strip().splitlines()) == 1
