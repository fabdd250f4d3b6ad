"""The speed levers give the plain path's results: the labelled-positions loss (``forward(return_logits=False)``)
and the lean greedy decoding loop (``instructblip.model.decoding``), against our full-logits path and against
transformers' ``generate`` (tiny random checkpoints, float32). Timing lives in experiments/bench/, not here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from instructblip.model import decoding
from instructblip.testing import to_transformers_batch
from instructblip.train.module import per_sample_loss

from conftest import LLM_KINDS, PROMPTS  # noqa: E402  (tests/model/conftest.py)

ANSWERS = ["a red square on the left", "three"]


def _training_batch(model, images):
    batch = model.processor.training_batch(images, PROMPTS, ANSWERS)
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts[0] != counts[1], "rows with different answer lengths exercise the per-row means"
    return batch


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_labelled_positions_loss_equals_full_logits_loss(kind, our_models, images):
    model = our_models[kind]
    batch = _training_batch(model, images)
    with torch.no_grad():
        full = model(**batch)
        lean = model(**batch, return_logits=False)
    assert lean.logits is None
    # Same math on the same rows; the LM head's matmul runs over fewer rows, so the sums may round differently.
    assert lean.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    expected = per_sample_loss(full.logits, batch["labels"], kind == "llama")
    torch.testing.assert_close(lean.per_sample_loss, expected, rtol=1e-6, atol=1e-6)


def test_labelled_positions_loss_gives_the_same_gradients(our_models, images):
    model = our_models["llama"]
    batch = _training_batch(model, images)
    unused = set(model.unused_parameter_names())  # no gradient: the last Q-Former text branch never runs
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and n not in unused]
    assert trainable, "the tiny model should have a trainable Q-Former"
    grads = []
    for flags in ({}, {"return_logits": False}):
        model.zero_grad(set_to_none=True)
        model(**batch, **flags).loss.backward()
        grads.append([p.grad.clone() for p in trainable])
    model.zero_grad(set_to_none=True)
    for plain, lean in zip(*grads):
        torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-7)


def test_row_without_labels_has_zero_per_sample_loss(our_models, images):
    model = our_models["llama"]
    batch = _training_batch(model, images)
    batch["labels"][1] = -100
    with torch.no_grad():
        out = model(**batch, return_logits=False)
    assert out.per_sample_loss[1].item() == 0.0
    assert out.per_sample_loss[0].item() > 0.0


def _transformers_greedy(ours, hf, batch, **settings):
    with torch.no_grad():
        out = hf.generate(**to_transformers_batch(ours, batch), do_sample=False, length_penalty=1.0,
                          **settings)
    return out[:, batch["input_ids"].shape[1] + ours.config.num_query_tokens :]


@pytest.fixture
def lean_only(our_models, monkeypatch):
    """The LLaMA model with transformers' generate disabled: a greedy call must go through the lean loop."""
    model = our_models["llama"]

    def refuse(*args, **kwargs):
        raise AssertionError("greedy decoding fell back to transformers' generate")

    monkeypatch.setattr(model.llm.hf_model, "generate", refuse)
    model.llm.hf_model._instructblip_fixed_step_greedy = {}  # no decoder kept from another test
    yield model
    model.llm.decoding_options = {}


GREEDY_OPTIONS = [{"cache": "dynamic"}, {"cache": "static"}, {"cache": "static", "step": "fixed"}]


@pytest.mark.parametrize("options", GREEDY_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_greedy_loop_gives_transformers_token_ids(options, lean_only, hf_models, images):
    """Left-padded prompts of different lengths, repetition penalty over prompt and answer, a minimum length; more
    calls of the same batch size (another prompt order; longer prompts in the same length bucket: the fixed step
    reuses its buffers and cache)."""
    ours, hf = lean_only, hf_models["llama"]
    ours.llm.decoding_options = dict(options)
    settings = dict(num_beams=1, max_new_tokens=10, min_new_tokens=3, repetition_penalty=1.4)
    eos, pad = ours.processor.tokenizer.eos_token_id, ours.processor.pad_token_id
    longer = [prompt + " here" for prompt in PROMPTS]
    decoders = []
    for prompts in (PROMPTS, PROMPTS[::-1], longer):
        batch = ours.processor.generation_batch(images, prompts)
        assert batch["attention_mask"].min() == 0
        actual = ours.generate_ids(batch, **settings)
        expected = _transformers_greedy(ours, hf, batch, eos_token_id=eos, pad_token_id=pad, **settings)
        assert actual.tolist() == expected.tolist()
        decoders.append(dict(getattr(ours.llm.hf_model, "_instructblip_fixed_step_greedy", {})))
    if options.get("step") == "fixed":
        first = ours.processor.generation_batch(images, PROMPTS)["input_ids"].shape[1]
        assert ours.processor.generation_batch(images, longer)["input_ids"].shape[1] > first
        assert len(decoders[-1]) == 1 and decoders[0] == decoders[-1]  # one decoder served the three calls


@pytest.mark.parametrize("options", GREEDY_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_greedy_loop_stops_and_pads_like_transformers(options, lean_only, hf_models, images):
    """An EOS that rows reach at different steps: finished rows get the pad id, the loop stops when all are done."""
    ours, hf = lean_only, hf_models["llama"]
    ours.llm.decoding_options = dict(options)
    batch = ours.processor.generation_batch(images, PROMPTS)
    pad = ours.processor.pad_token_id
    free = ours.generate_ids(batch, num_beams=1, max_new_tokens=8, min_new_tokens=0, repetition_penalty=1.0)
    # Declare as EOS a token that row 0 produces early and row 1 produces later or never.
    eos = next(int(t) for t in free[0, 1:] if int(t) not in free[1, :2].tolist())
    settings = dict(
        num_beams=1, max_new_tokens=8, min_new_tokens=1, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=pad
    )
    actual = ours.generate_ids(batch, **settings)
    expected = _transformers_greedy(ours, hf, batch, **settings)
    assert actual.tolist() == expected.tolist()
    first_eos = actual[0].tolist().index(eos)
    assert all(t == pad for t in actual[0, first_eos + 1 :].tolist())


def test_encoder_decoder_loop_gives_transformers_token_ids(our_models, hf_models, images, monkeypatch):
    ours, hf = our_models["t5"], hf_models["t5"]

    def refuse(*args, **kwargs):
        raise AssertionError("greedy decoding fell back to transformers' generate")

    monkeypatch.setattr(ours.llm.hf_model, "generate", refuse)
    batch = ours.processor.generation_batch(images, PROMPTS)
    eos, pad = ours.processor.tokenizer.eos_token_id, ours.processor.pad_token_id
    for settings in (
        dict(num_beams=1, max_new_tokens=9, min_new_tokens=3, repetition_penalty=1.4),
        dict(num_beams=1, max_new_tokens=9, min_new_tokens=0, repetition_penalty=1.0),
    ):
        actual = ours.generate_ids(batch, **settings)
        with torch.no_grad():
            expected = hf.generate(**to_transformers_batch(ours, batch), do_sample=False, length_penalty=1.0,
                                   eos_token_id=eos, pad_token_id=pad, **settings)[:, 1:]
        assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_unpadded_prompts_decode_without_a_mask_and_give_transformers_ids(llm, our_models, hf_models, images,
                                                                          monkeypatch):
    """One prompt has no padding: the lean loops (greedy and beam search) give the LLM no attention mask to build,
    and still the ids of transformers' generate."""
    ours, hf = our_models[llm], hf_models[llm]
    batch = ours.processor.generation_batch(images[:1], PROMPTS[:1])
    assert batch["attention_mask"].min() == 1
    masks = []
    model = ours.llm.hf_model
    forward = model.forward

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return forward(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("decoding fell back to transformers' generate")

    monkeypatch.setattr(model, "forward", recording)
    monkeypatch.setattr(model, "generate", refuse)
    eos, pad = ours.processor.tokenizer.eos_token_id, ours.processor.pad_token_id
    skip = 1 if llm == "t5" else batch["input_ids"].shape[1] + ours.config.num_query_tokens
    for settings in (dict(num_beams=1, max_new_tokens=8, min_new_tokens=2, repetition_penalty=1.4),
                     dict(num_beams=3, max_new_tokens=8, min_new_tokens=2, repetition_penalty=1.0)):
        masks.clear()
        actual = ours.generate_ids(batch, **settings)
        assert masks and all(mask is None for mask in masks), settings
        monkeypatch.setattr(model, "forward", forward)   # transformers' generate calls the model itself
        with torch.no_grad():
            expected = hf.generate(**to_transformers_batch(ours, batch), do_sample=False, length_penalty=1.0,
                                   eos_token_id=eos, pad_token_id=pad, **settings)[:, skip:]
        monkeypatch.setattr(model, "forward", recording)
        assert actual.tolist() == expected.tolist(), settings


def test_loop_handles_only_what_it_reproduces(our_models):
    hf_model = our_models["llama"].llm.hf_model
    greedy = dict(num_beams=1, do_sample=False, max_new_tokens=5, num_return_sequences=1)
    assert decoding.handles(hf_model, greedy)
    assert not decoding.handles(hf_model, {**greedy, "num_beams": 3})
    assert not decoding.handles(hf_model, {**greedy, "do_sample": True})
    assert not decoding.handles(hf_model, {**greedy, "num_return_sequences": 2})
    assert not decoding.handles(hf_model, {**greedy, "no_repeat_ngram_size": 2})


# ---------------------------------------------------------------------------------------------- length grouping
def _bimodal_lengths(n=512, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.choice([rng.randint(35, 50), rng.randint(150, 300)]) if rng.random() < 0.2 else rng.randint(35, 50)
            for _ in range(n)]


def test_length_grouped_batches_cover_every_sample_once_with_less_padding():
    from instructblip.data.length_grouping import length_grouped_batches, padding_stats

    lengths = _bimodal_lengths()
    grouped = length_grouped_batches(lengths, batch_size=8, window=128, seed=3)
    assert sorted(i for batch in grouped for i in batch) == list(range(len(lengths)))
    assert all(len(batch) == 8 for batch in grouped)
    for k, batch in enumerate(grouped):  # a batch never mixes windows
        assert {i // 128 for i in batch} == {k // 16}
    assert grouped == length_grouped_batches(lengths, batch_size=8, window=128, seed=3)
    plain = [list(range(i, i + 8)) for i in range(0, len(lengths), 8)]
    before = padding_stats(lengths, plain)["padding_per_useful_token"]
    after = padding_stats(lengths, grouped)["padding_per_useful_token"]
    assert after < before / 4
    with pytest.raises(ValueError, match="multiple of batch_size"):
        length_grouped_batches(lengths, batch_size=8, window=100)


def test_packing_respects_the_capacity():
    from instructblip.data.length_grouping import pack_first_fit, padding_stats

    lengths = _bimodal_lengths()
    rows = pack_first_fit(lengths, capacity=300)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 300 for row in rows)
    assert padding_stats(lengths, rows, row_capacity=300)["padding_tokens"] == 300 * len(rows) - sum(lengths)


def test_length_grouped_sampler_keeps_the_global_layout_ranks_and_resume():
    from instructblip.data.length_grouping import LengthGroupedBatchSampler
    from instructblip.train.data import GlobalBatchSampler

    lengths = _bimodal_lengths(2048)

    def sampler(rank, world, start, num, cls=LengthGroupedBatchSampler):
        extra = dict(length_of=lengths.__getitem__, window_batches=4) if cls is LengthGroupedBatchSampler else {}
        return list(cls(4, rank, world, start, num, **extra))

    two_ranks = [sampler(rank, 2, 0, 12) for rank in range(2)]
    plain = [sampler(rank, 2, 0, 12, GlobalBatchSampler) for rank in range(2)]
    for window in range(3):  # per window of 4 global batches: the same samples as the plain layout, regrouped
        span = slice(4 * window, 4 * window + 4)
        grouped_ids = sorted(i for rank in range(2) for batch in two_ranks[rank][span] for i in batch)
        plain_ids = sorted(i for rank in range(2) for batch in plain[rank][span] for i in batch)
        assert grouped_ids == plain_ids
    assert two_ranks != plain
    assert sampler(1, 2, 5, 7) == two_ranks[1][5:]  # resuming mid-window yields the rest unchanged


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_fixed_shape_loss_equals_the_labelled_positions_loss(kind, our_models, images, monkeypatch):
    """The form the loss takes under torch.compile and CUDA-graph capture: same loss, per-row losses (a row without
    labels included) and gradients as the labelled-positions selection, which needs a device-host synchronisation."""
    from instructblip.model import language

    model = our_models[kind]
    batch = _training_batch(model, images)
    batch["labels"] = torch.cat([batch["labels"], torch.full_like(batch["labels"][:1], -100)])
    batch = {k: v if k == "labels" else torch.cat([v, v[:1]]) for k, v in batch.items()}
    unused = set(model.unused_parameter_names())
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and n not in unused]
    results = []
    for fixed in (False, True):
        monkeypatch.setattr(language, "fixed_shapes", lambda fixed=fixed: fixed)
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=False)
        out.loss.backward()
        results.append((out.loss.detach(), out.per_sample_loss.detach(), [p.grad.clone() for p in trainable]))
    model.zero_grad(set_to_none=True)
    (loss, per_row, grads), (fixed_loss, fixed_per_row, fixed_grads) = results
    assert fixed_per_row[2].item() == 0.0 and per_row[2].item() == 0.0
    torch.testing.assert_close(fixed_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fixed_per_row, per_row, rtol=1e-6, atol=1e-7)
    for fixed_grad, grad in zip(fixed_grads, grads):
        torch.testing.assert_close(fixed_grad, grad, rtol=1e-5, atol=1e-7)


class _HostReads(TorchDispatchMode):
    """Records the ops that need a tensor's values on the host: a read (``.item()``, ``bool(t)``) or an output
    whose shape depends on the values (``nonzero``, indexing by a mask). A CUDA graph capture fails at each."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.index.Tensor:  # integer indices have a fixed shape; a mask does not
            dynamic = any(i is not None and i.dtype == torch.bool for i in args[1])
        else:
            dynamic = torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags
        if dynamic:
            self.found.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", LLM_KINDS)
@pytest.mark.parametrize("fixed", [True, False])
def test_training_step_reads_nothing_on_the_host_in_its_fixed_shape_form(fixed, kind, our_models, images,
                                                                         monkeypatch):
    """The training forward and backward as a CUDA-graph capture sees them (transformers then skips its own mask
    checks): no op may need tensor values on the host. The decoder-only labelled-positions selection
    (``fixed=False``) needs them, which shows the check can fail; T5's loss takes the fixed-shape form always."""
    from instructblip.model import language

    monkeypatch.setattr(language, "fixed_shapes", lambda: fixed)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    model = our_models[kind]
    batch = _training_batch(model, images)
    mode = _HostReads()
    with mode:
        model(**batch, return_logits=False).loss.backward()
    model.zero_grad(set_to_none=True)
    if fixed or kind == "t5":
        assert mode.found == []
    else:
        assert "aten.index.Tensor" in mode.found or "aten.nonzero.default" in mode.found


def test_fixed_decode_step_reads_nothing_on_the_host(lean_only, images, monkeypatch):
    """The greedy decode step that ``step="graphed"`` captures (choice, bookkeeping, the token's forward), as a
    capture sees it: no op may need tensor values on the host. The loop's own stop test does (``all_finished``),
    which shows the check can fail."""
    ours = lean_only
    ours.llm.decoding_options = {"cache": "static", "step": "fixed"}
    batch = ours.processor.generation_batch(images, PROMPTS)
    settings = dict(num_beams=1, max_new_tokens=6, min_new_tokens=2, repetition_penalty=1.3)
    ours.generate_ids(batch, **settings)  # builds the decoder (and its prefilled cache) for these shapes
    (decoder,) = ours.llm.hf_model._instructblip_fixed_step_greedy.values()
    decoder.step_index.fill_(1)  # a step with its token slot and the cache's slots still ahead
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    mode = _HostReads()
    with torch.no_grad(), mode:
        decoder._step()
    assert mode.found == []
    with mode:
        decoding._GreedyChooser(decoder.tokens[:, :0], 2, 0, 0, 1.0).all_finished()
    assert "aten._local_scalar_dense.default" in mode.found


def test_decoding_compile_option_is_checked_and_reaches_torch_compile(lean_only, images, monkeypatch):
    """``decoding.compile``: true, false or max-autotune, any other value named with the allowed ones; the fixed
    step compiles its forward in max-autotune's mode without graphs of its own (the whole step is the graph), the
    loop's step in max-autotune's mode with them. torch.compile is recorded, not run (minutes on this CPU)."""
    from instructblip.errors import ConfigError

    with pytest.raises(ConfigError, match=r"decoding.compile='fast'; allowed: true, false, max-autotune"):
        decoding.check_decoding_options({"compile": "fast"}, "cpu")
    modes = []

    def record(fn, **kwargs):
        modes.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    ours = lean_only
    batch = ours.processor.generation_batch(images, PROMPTS)
    settings = dict(num_beams=1, max_new_tokens=4)
    ours.llm.decoding_options = {}
    plain = ours.generate_ids(batch, **settings).tolist()
    for options in ({"cache": "static", "step": "fixed", "compile": "max-autotune"},
                    {"cache": "static", "compile": "max-autotune"}):
        ours.llm.decoding_options = decoding.check_decoding_options(options, "cpu")
        assert ours.generate_ids(batch, **settings).tolist() == plain
    assert modes == ["max-autotune-no-cudagraphs", "max-autotune"]
    ours.llm.hf_model._instructblip_compiled_steps = {}


def test_prefill_repeats_as_a_graphs_warm_up_and_replay_do(lean_only, images):
    """Graphed, the prefill runs once to warm up and again as the graph's replay, with no step between: it must
    leave the cache as one run does (transformers >= 5 advance the cache's filled length in every forward)."""
    ours = lean_only
    ours.llm.decoding_options = {"cache": "static", "step": "fixed"}
    batch = ours.processor.generation_batch(images, PROMPTS)
    ours.generate_ids(batch, num_beams=1, max_new_tokens=3)
    (decoder,) = ours.llm.hf_model._instructblip_fixed_step_greedy.values()
    embeds = torch.randn(decoder.mask.shape[0], decoder.prompt_length, ours.llm.hidden_size)
    decoder.mask[:, : decoder.prompt_length] = 1
    positions = torch.arange(decoder.prompt_length).expand(decoder.mask.shape[0], -1)
    with torch.no_grad():
        once = decoder._prefill(embeds, decoder.mask, positions)
        keys_once = [layer.keys.clone() for layer in decoder.past.layers]
        twice = decoder._prefill(embeds, decoder.mask, positions)
    torch.testing.assert_close(twice, once)
    for layer, keys in zip(decoder.past.layers, keys_once):
        torch.testing.assert_close(layer.keys, keys)
        if hasattr(layer, "cumulative_length"):
            assert int(layer.cumulative_length) == decoder.prompt_length


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_decode_step_gives_the_loops_token_ids():
    """``step="graphed"`` on a GPU (fp32, so that only the path differs): the first call warms up, captures and
    replays; the second, with other inputs of the same shapes, replays the kept graph. Left-padded prompts, a
    repetition penalty, a minimum length, and an EOS the rows reach at different steps."""
    import dataclasses

    from instructblip.model.instructblip import InstructBlip
    from instructblip.model.presets import get_preset

    torch.manual_seed(0)
    model = InstructBlip(dataclasses.replace(get_preset("tiny-llama"), dtype_policy="float32")).place("cuda").eval()
    llm = model.llm
    ids = torch.randint(3, llm.vocab_size, (3, 7), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    visuals = [torch.randn(3, 4, llm.hidden_size, device="cuda") for _ in range(2)]
    settings = dict(num_beams=1, max_new_tokens=12, min_new_tokens=2, repetition_penalty=1.3, pad_token_id=0)
    llm.decoding_options = {}
    free = llm.generate(visuals[0], ids, mask, eos_token_id=2, **settings)
    eos = int(free[0, 5])  # row 0 ends at its sixth token; the others at theirs or at the end
    for visual in visuals:
        results = {}
        for name, options in (("loop", {}), ("fixed", {"cache": "static", "step": "fixed"}),
                              ("graphed", {"cache": "static", "step": "graphed"})):
            llm.decoding_options = options
            results[name] = llm.generate(visual, ids, mask, eos_token_id=eos, **settings).tolist()
        assert results["graphed"] == results["fixed"] == results["loop"]
    graphed = [d for d in llm.hf_model._instructblip_fixed_step_greedy.values() if d.graphed]
    assert len(graphed) == 1 and graphed[0].graph is not None  # captured in the first call, replayed in the second
    llm.decoding_options = {}


def test_masked_padding_of_the_instruction_leaves_the_encoding_unchanged(our_models, images):
    """Graphed generation right-pads the Q-Former instruction with masked tokens to a multiple of
    ``GRAPHED_INSTRUCTION_BUCKET`` (one graph for nearby lengths): the queries the LLM sees stay the same."""
    import torch.nn.functional as F

    from instructblip.model.instructblip import GRAPHED_INSTRUCTION_BUCKET

    model = our_models["llama"]
    batch = model.processor.generation_batch(images, PROMPTS)
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    padding = GRAPHED_INSTRUCTION_BUCKET - ids.shape[1] % GRAPHED_INSTRUCTION_BUCKET
    assert padding > 0
    with torch.no_grad():
        plain = model.encode_images(batch["pixel_values"], ids, mask)
        padded = model.encode_images(batch["pixel_values"], F.pad(ids, (0, padding), value=7),
                                     F.pad(mask, (0, padding)))
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_generate_replays_encoding_and_prefill_with_the_loops_token_ids(our_models, images):
    """``generate_ids`` with ``step="graphed"`` (fp32): the image encoding and the prefill are replayed as graphs
    beside the decode step. The first batch records them, the second (other images, other prompts of the same
    shapes) replays them; both give the loop's ids."""
    import copy

    model = copy.deepcopy(our_models["llama"]).place("cuda").float().eval()  # fp32: only the path differs
    model.llm.hf_model._instructblip_fixed_step_greedy = {}
    settings = dict(num_beams=1, max_new_tokens=8, min_new_tokens=2, repetition_penalty=1.3)
    batches = [model.processor.generation_batch(images, PROMPTS),
               model.processor.generation_batch(images[::-1], PROMPTS[::-1])]
    for batch in batches:
        model.llm.decoding_options = {}
        loop = model.generate_ids(batch, **settings).tolist()
        model.llm.decoding_options = {"cache": "static", "step": "graphed"}
        assert model.generate_ids(batch, **settings).tolist() == loop
    assert len(model._graphed_encoding.graphs) == 1  # one signature: recorded once, replayed for the second batch
    (decoder,) = model.llm.hf_model._instructblip_fixed_step_greedy.values()
    assert len(decoder.prefill.graphs) == 1 and decoder.graph is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_encoding_under_autocast_records_the_weight_casts(our_models, images):
    """Under bf16 autocast the Q-Former's fp32 weights are cast on use, and autocast caches the casts until its
    context ends. A graph recorded with that cache on would point at cached copies that are freed when the first
    call's autocast ends, so ``graphs`` warms up and records with the cache off. The replay for other images, in a
    later autocast context, equals the eager encoding."""
    import copy

    from instructblip.model import graphs

    model = copy.deepcopy(our_models["llama"]).place("cuda").eval()
    assert model.qformer.layers[0].self_attention.query.weight.dtype == torch.float32
    cache_states = []

    def encode_images(*args):
        cache_states.append(torch.is_autocast_cache_enabled())
        return model.encode_images(*args)

    encode = graphs.GraphedCall(encode_images)
    batches = [{k: v.cuda() for k, v in model.processor.generation_batch(imgs, PROMPTS).items()}
               for imgs in (images, images[::-1])]
    args = [(b["pixel_values"], b["qformer_input_ids"], b["qformer_attention_mask"]) for b in batches]
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            encode(*args[0])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            replayed = encode(*args[1])
            eager = model.encode_images(*args[1])
    assert cache_states == [False, False]  # the warm-up and the recording; the replay runs no Python
    assert len(encode.graphs) == 1
    assert replayed.dtype == torch.bfloat16
    torch.testing.assert_close(replayed, eager)
