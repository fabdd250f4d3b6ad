"""The decode-floor probe (experiments/bench/decode_floor.py) counts the bytes a decode step reads: those of every
matrix of the LLaMA configuration's layers and LM head, the same in both layouts it times."""

from __future__ import annotations

import json
import sys

import torch

from instructblip.testing import import_script


def test_decode_floor_reads_every_llm_matrix_once_in_both_layouts(monkeypatch, capsys):
    decode_floor = import_script("experiments/bench", "decode_floor")
    monkeypatch.setattr(sys, "argv", ["decode_floor.py", "--size", "tiny", "--device", "cpu", "--repeats", "2"])
    decode_floor.main()
    result = json.loads(capsys.readouterr().out)

    from transformers import LlamaForCausalLM

    common = import_script("experiments/bench", "common")
    text = common.small_config("tiny", "llama").text_config
    llm = LlamaForCausalLM(text)
    matrices = [p for name, p in llm.named_parameters() if p.dim() == 2 and "embed_tokens" not in name]
    assert result["weight_gb"] * 1e9 == 2 * sum(p.numel() for p in matrices)  # bf16
    assert {(row["layout"], row["batch"]) for row in result["rows"]} == {
        (layout, batch) for layout in ("separate", "fused") for batch in (1, 16)}
    sizes = (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size)
    for fused in (False, True):
        layers, head = decode_floor.projections(*sizes, fused, "cpu")
        assert 2 * (sum(w.numel() for layer in layers for w in layer) + head.numel()) == result["weight_gb"] * 1e9
        x = torch.randn(3, text.hidden_size, dtype=torch.bfloat16)
        assert decode_floor.decode_products(x, layers, head, fused).shape == (3, text.vocab_size)
