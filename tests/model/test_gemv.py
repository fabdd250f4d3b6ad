"""``decoding.kernels=triton``: the Triton matrix-vector kernel (``instructblip.model.gemv``) and its routing.

Triton comes with torch's Linux wheels (``make install`` brings it); where it is importable the kernel is tested on
the CPU through Triton's interpreter, in a process of its own (``TRITON_INTERPRET`` must be set before Triton
compiles anything), and on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from instructblip.errors import ConfigError
from instructblip.model import decoding

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_kernels_option_is_checked_with_its_allowed_values():
    with pytest.raises(ConfigError, match=r"decoding.kernels='cutlass'; allowed: torch, triton"):
        decoding.check_decoding_options({"kernels": "cutlass"}, "cpu")
    assert decoding.check_decoding_options({}, "cpu")["kernels"] == "torch"
    # on a CPU: refused, naming what is missing (Triton itself, or a CUDA device)
    with pytest.raises(ConfigError, match=r"decoding.kernels=triton needs (Triton|a CUDA device)"):
        decoding.check_decoding_options({"kernels": "triton"}, "cpu")
    # the decoding loops refuse it alike, before routing anything (beam search has no check of its own)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    embeds, mask = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.long)
    settings = dict(max_new_tokens=2, eos_token_id=1, pad_token_id=0, kernels="triton")
    for decode, extra in ((decoding.greedy, {}), (decoding.beam_search, {"num_beams": 2})):
        with pytest.raises(ConfigError, match=r"decoding_options.kernels=triton needs (Triton|a CUDA device)"):
            decode(model, embeds, mask, None, **settings, **extra)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


INTERPRETED_CHECKS = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM
    from instructblip.model import decoding, gemv

    torch.manual_seed(0)
    # the kernel against F.linear: one row, a few rows, the most it takes; widths not multiples of its blocks
    for m, n, k in ((1, 48, 96), (5, 40, 200), (16, 64, 256)):
        x = torch.randn(m, k, dtype=torch.float16)
        weight = torch.randn(n, k, dtype=torch.float16)
        torch.testing.assert_close(gemv.gemv(x, weight).float(), F.linear(x.float(), weight.float()),
                                   rtol=2e-2, atol=5e-2)

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).half().eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    ids = torch.randint(3, 96, (2, 1))
    with torch.no_grad():
        plain = model(input_ids=ids).logits.float()
    # every projection of both layers and the LM head, with their parameters and state dict as they were
    assert gemv.route_linear_layers(model, True) == 2 * 7 + 1
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    calls = []
    kernel = gemv.gemv
    gemv.gemv = lambda x, weight: calls.append(tuple(x.shape)) or kernel(x, weight)
    with torch.no_grad():
        routed = model(input_ids=ids).logits.float()
        assert len(calls) == 15
        model(input_ids=torch.randint(3, 96, (2, 9)))  # 18 rows: torch's kernel
        assert len(calls) == 15
    torch.testing.assert_close(routed, plain, rtol=2e-2, atol=2e-2)
    assert gemv.route_linear_layers(model, False) == 15
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))

    # greedy decoding with the option: the fixed step's one-token forwards through the kernel (15 products each);
    # the token ids stay those of torch's kernels (fp16 rounding apart, which this seed does not meet); the layers
    # are routed for the call only (the module may be shared with a caller that wants torch's kernels)
    embeds = torch.randn(2, 6, 64, dtype=torch.float16)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    settings = dict(max_new_tokens=5, min_new_tokens=5, eos_token_id=1, pad_token_id=0, cache="static",
                    step="fixed")
    expected = decoding.greedy(model, embeds, mask, None, **settings)
    calls.clear()
    got = decoding.greedy(model, embeds, mask, None, kernels="triton", **settings)
    assert got.tolist() == expected.tolist(), (got, expected)
    # 4 steps of 15 products, and the prefill's LM head (its last position only; the prompt's 2 x 32 rows, padded to
    # the bucket, go to torch)
    assert len(calls) == 4 * 15 + 1 and set(calls) == {(2, 1, 64), (2, 1, 128)}
    assert not any(type(m) is gemv.GemvLinear for m in model.modules())
    calls.clear()
    assert decoding.greedy(model, embeds, mask, None, **settings).tolist() == expected.tolist()
    assert calls == []
    gemv.gemv = kernel

    # compiled, the routed forward traces through the custom op in one graph (inductor then calls it as an opaque
    # kernel), and a step compiled before the routing is not served to the routed model: the routed step compiles
    # a function of its own (torch.compile need not guard on modules' classes)
    seen = []

    def recording(graph, example_inputs):
        seen.append(sum("gemv" in str(node.target) for node in graph.graph.nodes))
        return graph.forward

    with torch.no_grad():
        torch.compile(model.forward, backend=recording, dynamic=False)(input_ids=ids)
        gemv.route_linear_layers(model, True)
        step = torch.compile(decoding._step_forward(model, "triton"), backend=recording, fullgraph=True,
                             dynamic=False)
        assert torch.equal(step(input_ids=ids).logits.float(), routed)
    assert seen == [0, 15]
    gemv.route_linear_layers(model, False)

    print("interpreted checks passed")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (torch's Linux wheels bring it)")
def test_gemv_and_its_routing_under_tritons_interpreter():
    """Through Triton's interpreter on the CPU (fp16): the kernel equals ``F.linear``; routing a LLaMA changes
    every bias-free linear layer and nothing in its state, sends one-token forwards to the kernel and longer ones
    to torch, gives torch's logits; greedy decoding with ``kernels="triton"`` gives torch's ids and routes only
    during the call; a compiled step traces through the op and does not reuse code compiled before the routing."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETED_CHECKS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "interpreted checks passed" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel needs a CUDA device (or the interpreter)")
def test_graphed_greedy_through_gemv_gives_the_loops_ids_in_bf16():
    """The tiny LLaMA's LLM in bf16 on a GPU: greedy decoding with ``kernels="triton"``, the loop's and the graphed
    step's (autotuned kernels launched inside the captured graph), give the same ids, for two batch sizes; the
    autotuner has chosen its configurations; the routed LM head's logits match cuBLAS's."""
    from instructblip.model import gemv
    from instructblip.model.instructblip import InstructBlip
    from instructblip.model.presets import get_preset

    torch.manual_seed(0)
    model = InstructBlip(get_preset("tiny-llama")).place("cuda").eval()
    llm = model.llm
    llm.hf_model.to(torch.bfloat16)
    settings = dict(num_beams=1, max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.3, pad_token_id=0,
                    eos_token_id=2)
    for batch in (1, 6):
        ids = torch.randint(3, llm.vocab_size, (batch, 7), device="cuda")
        mask = torch.ones_like(ids)
        mask[-1, :3] = 0
        visual = torch.randn(batch, 4, llm.hidden_size, device="cuda", dtype=torch.bfloat16)
        results = {}
        for name, options in (("loop", {"kernels": "triton"}),
                              ("graphed", {"cache": "static", "step": "graphed", "kernels": "triton"})):
            llm.decoding_options = options
            results[name] = llm.generate(visual, ids, mask, **settings).tolist()
        assert results["graphed"] == results["loop"]
    assert gemv.best_configs()
    assert not any(type(m) is gemv.GemvLinear for m in llm.hf_model.modules())  # routed for the calls only
    hidden = torch.randn(4, 1, llm.hidden_size, device="cuda", dtype=torch.bfloat16)
    head = llm.hf_model.get_output_embeddings()
    gemv.route_linear_layers(llm.hf_model, True)
    torch.testing.assert_close(head(hidden).float(), torch.nn.functional.linear(hidden, head.weight).float(),
                               rtol=2e-2, atol=2e-2)
    gemv.route_linear_layers(llm.hf_model, False)
    llm.decoding_options = {}
