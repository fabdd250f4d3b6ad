"""Lean greedy and beam search loops (decoder-only and T5-style LLMs): the same token ids as transformers'
``generate``.

transformers' ``generate`` is general: per step it re-prepares the model inputs, runs a list of logits processors
and stopping criteria, and checks many options. InstructBLIP's greedy decoding needs four things: a KV cache, the
repetition penalty, the minimum length (EOS suppressed until ``min_new_tokens``) and EOS/padding bookkeeping. This
loop does exactly those, calling the transformers model itself for every forward (so the numbers are the model's
own), and asks a decoder-only model for the last position's logits only (``logits_to_keep=1``); a T5-style model
runs its encoder once and its decoder one token a step (``greedy_encoder_decoder``).

It reproduces ``generate``'s choices: position ids from the attention mask's cumulative sum (left padding), the
penalty applied to every token id seen so far (the prompt ids when given, then the generated ones), logits in fp32
before the processors, pad after EOS, and a stop once every row has finished or ``max_new_tokens`` are out.
``beam_search`` and ``beam_search_encoder_decoder`` do the same for beam search (``handles_beam_search`` says
which calls qualify); see ``_BeamState`` for how they reproduce ``generate``'s choices and where they save work.
Sampling and several return sequences are left to ``generate`` (``handles`` says which calls are plain greedy).

``cache="static"`` uses transformers' ``StaticCache`` and keeps every decode step's shapes fixed (the attention mask
is one buffer of the final length, filled as tokens come; the cache position is passed where the model takes it),
and ``compile=True`` runs each decode step through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): a GPU
option, the compiled step is kept on the model. ``compile="max-autotune"`` compiles it in the mode that weighs
inductor's own Triton matrix kernels against cuBLAS's for each shape (minutes to compile a 7B model's step; whether
it pays for a decode step's matrix-vector products is what ``experiments/bench/decode_floor.py --inductor``
measures).

``step="graphed"`` (greedy, decoder-only, static cache) goes further: the whole decode step, the choice of the token
(penalty, minimum length, argmax, EOS and pad bookkeeping) and the forward of that token, is written as fixed-shape
tensor ops that read nothing on the host (``_FixedStepGreedy``), captured once as one CUDA graph and replayed per
token; the host only reads "has every row finished?" between replays. The prompt's prefill into the static cache
is replayed as a graph of its own (``graphs.GraphedCall``), and ``InstructBlip.generate_ids`` replays the image
encoding as one too. With ``compile`` the captured step's forward is ``torch.compile``'s (default mode, or
max-autotune, without graphs of its own). The buffers, the static cache and the graphs are kept on the model for the
next call of the same batch size, prompt length and settings.
``kernels="triton"`` (CUDA, decoder-only) runs the LLM's bias-free linear layers through a Triton matrix-vector
kernel for inputs of at most 16 rows (``instructblip.model.gemv``): the one-token decode steps at batch 1-16, where
cuBLAS's kernels leave part of the memory bandwidth unused; the prefill keeps cuBLAS.
``step="fixed"`` runs that same step eagerly, on any device (what the tests compare with ``generate``).
"""

from __future__ import annotations

import functools
import inspect

import torch

from instructblip.errors import ConfigError
from instructblip.model import graphs

# the greedy decode step: a Python loop step, the fixed-shape step run eagerly, or that step replayed as a CUDA graph
DECODE_STEPS = ("loop", "fixed", "graphed")

# Settings the loop implements; any other generate() setting sends the call to transformers' generate.
_HANDLED = {
    "num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "repetition_penalty", "length_penalty",
    "num_return_sequences", "eos_token_id", "pad_token_id",
}
# generation_config fields that add a logits processor the loop does not implement, with their inactive values.
_INACTIVE = {
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "sequence_bias": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "exponential_decay_length_penalty": (None,),
    "min_length": (None, 0), "stop_strings": (None,), "max_time": (None,), "guidance_scale": (None, 1, 1.0),
    "renormalize_logits": (None, False), "epsilon_cutoff": (None, 0, 0.0), "eta_cutoff": (None, 0, 0.0),
}


# generation_config fields that change beam search beyond what ``beam_search`` implements, with their inactive values.
_BEAM_INACTIVE = {
    "num_beam_groups": (None, 1), "diversity_penalty": (None, 0, 0.0), "constraints": (None,),
    "force_words_ids": (None,), "low_memory": (None, False), "encoder_repetition_penalty": (None, 1, 1.0),
    "early_stopping": (None, False, True, "never"),
}


def _deterministic_single_sequence(model, settings: dict) -> bool:
    if set(settings) - _HANDLED or settings.get("do_sample", False):
        return False
    if settings.get("num_return_sequences", 1) != 1 or settings.get("max_new_tokens") is None:
        return False
    config = model.generation_config
    return all(getattr(config, name, None) in inactive for name, inactive in _INACTIVE.items())


def handles(model, settings: dict) -> bool:
    """True when ``settings`` ask for plain greedy decoding the loop reproduces exactly."""
    return settings.get("num_beams", 1) == 1 and _deterministic_single_sequence(model, settings)


def handles_beam_search(model, settings: dict) -> bool:
    """True when ``settings`` ask for beam search (one returned sequence) that ``beam_search`` reproduces exactly."""
    if settings.get("num_beams", 1) <= 1 or not _deterministic_single_sequence(model, settings):
        return False
    config = model.generation_config
    return all(getattr(config, name, None) in inactive for name, inactive in _BEAM_INACTIVE.items())


def _routes_linear_layers(decode):
    """``decode`` (greedy or beam search) run with the model's linear layers through Triton's gemv when its
    ``kernels`` option says ``triton``, for that call only: the LLM module may be shared (the benchmarks run
    transformers' generate on the same module). Only such a call imports the module that needs Triton, after the
    option's check (a clear refusal without Triton or a CUDA device, for beam search as for greedy)."""

    @functools.wraps(decode)
    def routed(model, *args, kernels: str = "torch", **kwargs):
        if kernels != "triton":
            return decode(model, *args, kernels=kernels, **kwargs)
        check_decoding_options({"kernels": kernels}, str(model.device), key="decoding_options")
        from instructblip.model import gemv

        gemv.route_linear_layers(model, True)
        try:
            return decode(model, *args, kernels=kernels, **kwargs)
        finally:
            gemv.route_linear_layers(model, False)

    return routed


@torch.no_grad()
@_routes_linear_layers
def greedy(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_ids: torch.Tensor | None,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    cache: str = "dynamic",
    compile: bool | str = False,
    step: str = "loop",
    kernels: str = "torch",
    **ignored,
) -> torch.Tensor:
    """New token ids (B, n <= max_new_tokens) after the prompt ``inputs_embeds`` (left-padded, ``attention_mask``).

    ``model``: a transformers causal LM. ``prompt_ids``: the prompt's token ids for the repetition penalty (None:
    the penalty sees only generated tokens). ``step``: ``loop`` (a Python step), ``fixed`` or ``graphed`` (static
    cache only; see the module docstring); ``kernels``: ``torch`` or ``triton`` (the module docstring). ``ignored``: the generate() settings that do not change greedy decoding
    (``num_beams=1``, ``do_sample=False``, ``length_penalty``, ``num_return_sequences=1``).
    """
    check_decoding_options({"cache": cache, "compile": compile, "step": step, "kernels": kernels},
                           str(inputs_embeds.device), key="decoding_options")
    if step != "loop":
        decoder = _FixedStepGreedy.for_call(model, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                                            min_new_tokens, repetition_penalty, step == "graphed", compile, kernels)
        return decoder.run(inputs_embeds, attention_mask, prompt_ids)
    batch = attention_mask.shape[0]
    steps = _CausalSteps(model, attention_mask, max_new_tokens, cache, compile, kernels)
    chooser = _GreedyChooser(
        prompt_ids if prompt_ids is not None else attention_mask.new_zeros(batch, 0),
        eos_token_id, pad_token_id, min_new_tokens, repetition_penalty,
    )
    logits = steps.prefill(inputs_embeds)
    for index in range(max_new_tokens):
        token = chooser.choose(logits)
        if index + 1 == max_new_tokens or chooser.all_finished():
            break
        logits = steps.next(token)
    return chooser.generated()


@torch.no_grad()
def greedy_encoder_decoder(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    **ignored,
) -> torch.Tensor:
    """The same loop for T5-style models: the encoder runs once, the decoder one token a step from its start token
    (which, as in ``generate``, the repetition penalty sees). Returns the new ids without the start token."""
    steps = _Seq2SeqSteps(model, inputs_embeds, attention_mask)
    token = steps.start_tokens
    chooser = _GreedyChooser(token[:, None], eos_token_id, pad_token_id, min_new_tokens, repetition_penalty)
    for _ in range(max_new_tokens):
        token = chooser.choose(steps.logits(token))
        if chooser.all_finished():
            break
    return chooser.generated()


@torch.no_grad()
@_routes_linear_layers
def beam_search(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_ids: torch.Tensor | None,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int | None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    cache: str = "dynamic",
    compile: bool | str = False,
    step: str = "loop",
    kernels: str = "torch",
    **ignored,
) -> torch.Tensor:
    """Beam search after the prompt ``inputs_embeds`` (left-padded, ``attention_mask``): the best hypothesis' new
    token ids per row, (B, n <= max_new_tokens), as ``generate(num_beams=...)`` returns them.

    With the dynamic cache the prompt is prefilled once per row and its cache rows are copied to the beams by the
    first reorder (``generate`` prefills every beam: ``num_beams`` times the work for the same numbers). A static
    cache holds a fixed number of rows, so there every beam is prefilled and the cache is reordered in place.
    ``ignored``: settings that do not change beam search here (``do_sample=False``, ``num_return_sequences=1``).
    ``step``: greedy decoding's option; beam search always runs its loop (its bookkeeping reads the host per step).
    """
    batch = attention_mask.shape[0]
    steps = _CausalSteps(model, attention_mask, max_new_tokens, cache, compile, kernels)
    state = _BeamState(
        prompt_ids if prompt_ids is not None else attention_mask.new_zeros(batch, 0), num_beams, max_new_tokens,
        eos_token_id, pad_token_id, min_new_tokens, repetition_penalty, length_penalty,
        model.generation_config.early_stopping,
    )
    if steps.static:  # a static cache has a row per beam from the start
        steps.repeat_rows(num_beams)
        inputs_embeds = inputs_embeds.repeat_interleave(num_beams, dim=0)
    logits = steps.prefill(inputs_embeds)
    if not steps.static:  # from here on one row per beam
        steps.repeat_rows(num_beams)
    for _ in range(max_new_tokens):
        chosen = state.step(logits)
        if chosen is None:
            break
        source_rows, token = chosen
        if steps.static:
            _reorder_in_place(steps.past, source_rows)
        else:
            steps.past.reorder_cache(source_rows)
        logits = steps.next(token)
    return state.best()


@torch.no_grad()
def beam_search_encoder_decoder(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int | None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    **ignored,
) -> torch.Tensor:
    """Beam search for T5-style models: the encoder and the first decoder step run once per row (the beams start
    alike), then one decoder row per beam. Returns the best hypothesis' new ids without the start token."""
    steps = _Seq2SeqSteps(model, inputs_embeds, attention_mask)
    token = steps.start_tokens
    state = _BeamState(
        token[:, None], num_beams, max_new_tokens, eos_token_id, pad_token_id, min_new_tokens, repetition_penalty,
        length_penalty, model.generation_config.early_stopping,
    )
    for index in range(max_new_tokens):
        chosen = state.step(steps.logits(token))
        if chosen is None:
            break
        source_rows, token = chosen
        if index == 0:  # one row per beam from here on; the cross-attention cache too
            steps.past.reorder_cache(source_rows)
            steps.repeat_rows(num_beams)
        else:  # the cross-attention rows are equal within a sample: only the decoder's own cache moves
            steps.past.self_attention_cache.reorder_cache(source_rows)
    return state.best()


# compile: false, true (torch.compile's default modes) or max-autotune (its mode that autotunes matrix kernels);
# kernels: the linear layers' kernels for inputs of at most 16 rows, torch's (cuBLAS on a GPU) or Triton's gemv
DECODING_DEFAULTS = {"cache": "dynamic", "compile": False, "step": "loop", "kernels": "torch"}


def check_decoding_options(options: dict, device: str, key: str = "decoding") -> dict:
    """``LanguageModel.decoding_options`` from a config (``{cache, compile, step, kernels}``), checked: each wrong
    value names its key and the allowed values. Decoder-only LLMs use them; T5 decodes with its dynamic cache."""
    options = {**DECODING_DEFAULTS, **dict(options or {})}
    unknown = sorted(set(options) - set(DECODING_DEFAULTS))
    if unknown:
        raise ConfigError(f"{key}: unknown keys {unknown}; allowed: {', '.join(DECODING_DEFAULTS)}")
    if options["cache"] not in ("dynamic", "static"):
        raise ConfigError(f"{key}.cache={options['cache']!r}; allowed: dynamic, static")
    if not (isinstance(options["compile"], bool) or options["compile"] == "max-autotune"):
        raise ConfigError(f"{key}.compile={options['compile']!r}; allowed: true, false, max-autotune")
    if options["step"] not in DECODE_STEPS:
        raise ConfigError(f"{key}.step={options['step']!r}; allowed: {', '.join(DECODE_STEPS)}")
    if options["step"] != "loop" and options["cache"] != "static":
        raise ConfigError(f"{key}.step={options['step']} needs {key}.cache=static (fixed shapes)")
    if options["step"] == "graphed" and not str(device).startswith("cuda"):
        raise ConfigError(f"{key}.step=graphed needs a CUDA device (device={device}); {key}.step=fixed runs the "
                          "same step anywhere")
    if options["kernels"] not in ("torch", "triton"):
        raise ConfigError(f"{key}.kernels={options['kernels']!r}; allowed: torch, triton")
    if options["kernels"] == "triton":
        try:
            from instructblip.model import gemv
        except ImportError as error:
            message = f"{key}.kernels=triton needs Triton ({error}), which torch's Linux wheels bring"
            raise ConfigError(message) from error
        if not (str(device).startswith("cuda") or gemv.INTERPRETED):
            raise ConfigError(f"{key}.kernels=triton needs a CUDA device (device={device}), or TRITON_INTERPRET=1 "
                              "to run the kernel through Triton's interpreter")
    return options


def _step_forward(model, kernels: str):
    """The function a compiled decode step compiles. Routed through Triton's gemv it is a function of its own:
    torch.compile keeps compiled code per function and by default does not guard on modules' classes, so code
    compiled for the model's forward with torch's linear layers would be reused after the routing (as a GPU run
    found: the same speed, no compile)."""
    if kernels != "triton":
        return model.forward

    def forward_through_gemv(**inputs):
        return model(**inputs)

    return forward_through_gemv


def _forward_arguments(model) -> tuple[str, bool]:
    """(the name of the model forward's cache argument, whether it takes ``cache_position``): transformers renamed
    ``past_key_values`` to ``cache`` and dropped ``cache_position`` in later versions; use what the model has."""
    parameters = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "cache_position" in parameters


class _Seq2SeqSteps:
    """A T5-style LLM's calls: the encoder once, then the decoder one token a step, from its start token (as in
    ``generate``), with a self- and cross-attention cache."""

    def __init__(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        from transformers import DynamicCache, EncoderDecoderCache

        self.model = model
        self.cache_arg, _ = _forward_arguments(model)
        # no padding: the encoder and the cross-attention see every position without a mask built for them
        self.attention_mask = None if bool(attention_mask.all()) else attention_mask
        self.encoded = model.get_encoder()(inputs_embeds=inputs_embeds,
                                           attention_mask=self.attention_mask).last_hidden_state
        self.past = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = model.generation_config.decoder_start_token_id
        start = model.config.decoder_start_token_id if start is None else start
        self.start_tokens = attention_mask.new_full((inputs_embeds.shape[0],), start, dtype=torch.long)

    def repeat_rows(self, times: int) -> None:
        """Each row ``times`` times over (beam search: one row per beam)."""
        self.encoded = self.encoded.repeat_interleave(times, dim=0)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.repeat_interleave(times, dim=0)

    def logits(self, token: torch.Tensor) -> torch.Tensor:
        """The decoder's logits after one more token per row."""
        from transformers.modeling_outputs import BaseModelOutput

        return self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded), attention_mask=self.attention_mask,
            decoder_input_ids=token[:, None], use_cache=True, **{self.cache_arg: self.past},
        ).logits[:, -1]


class _CausalSteps:
    """A decoder-only LLM's forward calls after a left-padded prompt: the prefill, then one token a step.

    It keeps what those calls need between steps: the KV cache, the attention mask (one column longer each step
    with a dynamic cache; with a static cache one buffer of the final length whose next column is switched on, so
    every step has the same shapes), the next position ids (from the mask's cumulative sum, as ``generate``) and,
    where the model takes one, the cache position.
    """

    def __init__(self, model, attention_mask: torch.Tensor, max_new_tokens: int, cache: str, compile: bool | str,
                 kernels: str = "torch"):
        from transformers import DynamicCache, StaticCache

        self.cache_arg, self.takes_cache_position = _forward_arguments(model)
        self.model, self.step_model = model, _compiled_forward(model, compile, kernels) if compile else model
        batch, self.prompt_length = attention_mask.shape
        self.static = cache == "static"
        mask = attention_mask.long()
        self.positions = (mask.cumsum(-1) - 1).clamp_min(0)
        if self.static:
            self.past = StaticCache(config=model.config, max_cache_len=self.prompt_length + max_new_tokens)
            self.mask = mask.new_zeros(batch, self.prompt_length + max_new_tokens)
            self.mask[:, : self.prompt_length] = mask
        elif cache == "dynamic":
            # no padding (every batch-1 call): every cached position is visible to every new token, so the forwards
            # get no mask and the model builds none per step (the static cache's unfilled slots always need one)
            self.past, self.mask = DynamicCache(), None if bool(mask.all()) else mask
        else:
            raise ValueError(f"cache={cache!r}; allowed: 'dynamic', 'static'")
        self.generated = 0

    def repeat_rows(self, times: int) -> None:
        """Each row ``times`` times over (beam search: one row per beam)."""
        if self.mask is not None:
            self.mask = self.mask.repeat_interleave(times, dim=0)
        self.positions = self.positions.repeat_interleave(times, dim=0)

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The prompt's forward; the last position's logits."""
        extra = {"cache_position": torch.arange(self.prompt_length, device=inputs_embeds.device)}
        return self._call(self.model, inputs_embeds=inputs_embeds, **(extra if self.takes_cache_position else {}))

    def next(self, token: torch.Tensor) -> torch.Tensor:
        """The forward of one new token per row; its logits."""
        if self.static:
            self.mask[:, self.prompt_length + self.generated] = 1
        elif self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        extra = {}
        if self.takes_cache_position:
            extra["cache_position"] = torch.tensor([self.prompt_length + self.generated], device=token.device)
        self.generated += 1
        return self._call(self.step_model, input_ids=token[:, None], **extra)

    def _call(self, forward, **inputs) -> torch.Tensor:
        return forward(
            attention_mask=self.mask, position_ids=self.positions, use_cache=True, logits_to_keep=1,
            **{self.cache_arg: self.past}, **inputs,
        ).logits[:, -1]


class _BeamState:
    """generate()'s beam search bookkeeping, in batched tensor ops over (batch, beams, ...).

    Per step, as ``generate`` does: fp32 log-softmax of the logits, then the processors on the log-probabilities
    (repetition penalty over every id the beam has seen, EOS at -inf until ``min_new_tokens``); the running beam
    scores added; the top ``max(2, 1 + #EOS) * beams`` continuations of each sample (so that enough stay open when
    the best ones end); those ending in EOS (and all of them at ``max_new_tokens``) among the first ``beams`` join
    the finished hypotheses with score / length ** ``length_penalty`` (the best ``beams`` are kept), the others
    carry on (the best ``beams`` not ending). A sample stops taking hypotheses once its best running score, at the
    length the ``early_stopping`` mode assumes, cannot beat its worst finished one; the search stops when no sample
    can improve (or, with ``early_stopping=True``, when every sample holds ``beams`` finished hypotheses).

    Unlike ``generate``, which carries every continuation's whole sequence through each step, the finished merge
    looks at the first ``beams`` continuations only (the others can never finish), the token histories hold the new
    tokens only, and a step in which no continuation ends skips the merge and the stop test (one host
    synchronisation per step: "did any continuation end?").
    """

    def __init__(
        self, prompt_ids: torch.Tensor, num_beams: int, max_new_tokens: int, eos_token_id, pad_token_id,
        min_new_tokens: int, repetition_penalty: float, length_penalty: float, early_stopping,
    ):
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        device = prompt_ids.device
        self.batch, self.beams, self.max_new_tokens = prompt_ids.shape[0], num_beams, max_new_tokens
        self.min_new_tokens, self.penalty, self.length_penalty = min_new_tokens, repetition_penalty, length_penalty
        self.early_stopping = early_stopping
        self.eos = torch.tensor(eos, device=device)
        self.candidates = max(2, 1 + len(eos)) * num_beams
        # generate fills the tails with the pad id, or with the first EOS id when the pad id is missing or 0
        fill = pad_token_id if pad_token_id else eos[0]
        self.prompt_ids = prompt_ids
        self.prompt_ids_per_beam = prompt_ids.repeat_interleave(num_beams, dim=0)
        self.running_tokens = torch.full((self.batch, num_beams, max_new_tokens), fill, device=device)
        # only the first beam of a sample is live at the start: the beams would otherwise pick the same tokens
        self.running_scores = torch.zeros(self.batch, num_beams, device=device)
        self.running_scores[:, 1:] = -1.0e9
        self.finished_tokens = self.running_tokens.clone()
        self.finished_scores = torch.full((self.batch, num_beams), -1.0e9, device=device)
        self.finished = torch.zeros(self.batch, num_beams, dtype=torch.bool, device=device)
        self.finished_lengths = torch.zeros(self.batch, num_beams, dtype=torch.long, device=device)
        self.improvable = torch.ones(self.batch, 1, dtype=torch.bool, device=device)
        self.some_finished = False  # until then no sample can have stopped improving
        self.sample_index = torch.arange(self.batch, device=device)[:, None]
        self.generated = 0

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Takes the next-token logits, one row per sample (the first step after a shared prefill) or per beam.
        Returns the cache row each new beam continues and its new token, both (batch * beams,), or None when the
        search is over."""
        rows, vocab = logits.shape
        length = self.generated
        log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        if self.penalty != 1.0:
            seen = self.prompt_ids if rows == self.batch else self.prompt_ids_per_beam
            if length:
                seen = torch.cat([seen, self.running_tokens.view(rows, -1)[:, :length]], dim=1)
            if seen.shape[1]:
                picked = log_probs.gather(1, seen)
                log_probs.scatter_(1, seen, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))
        if length < self.min_new_tokens:
            log_probs.index_fill_(1, self.eos, -float("inf"))
        # (batch, beams * vocab), beam-major as generate lays it out (so that ties break alike)
        scores = (log_probs.view(self.batch, -1, vocab) + self.running_scores[:, :, None]).view(self.batch, -1)
        top_scores, top_index = scores.topk(self.candidates)
        parent = torch.div(top_index, vocab, rounding_mode="floor")
        token = top_index - parent * vocab
        last = length + 1 == self.max_new_tokens
        ends = torch.ones_like(token, dtype=torch.bool) if last else torch.isin(token, self.eos)
        # The step's one host synchronisation. Without an ending continuation there is nothing to merge or to mask,
        # and while no hypothesis has finished every sample can still improve: the bookkeeping below is skipped.
        any_end = last or bool(ends.any())
        if any_end:
            self._finish(top_scores[:, : self.beams], parent[:, : self.beams], token[:, : self.beams],
                         ends[:, : self.beams], length)
            if last:
                return None
            top_scores = top_scores + ends.to(torch.float32) * -1.0e9  # the continuations that ended stop here
        keep = top_scores.topk(self.beams).indices
        self.running_scores = top_scores.gather(1, keep)
        parent, token = parent.gather(1, keep), token.gather(1, keep)
        self.running_tokens = self._extend(parent, token, length)
        self.generated = length + 1
        if self.some_finished:
            if self.early_stopping == "never" and self.length_penalty > 0:
                hypothetical = self.max_new_tokens
            else:
                hypothetical = length + 1
            best_running = self.running_scores[:, :1] / (hypothetical ** self.length_penalty)
            worst_finished = torch.where(self.finished, self.finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
            self.improvable &= (best_running > worst_finished).any(dim=1, keepdim=True)
            going = self.improvable.any()
            if self.early_stopping is True:
                going &= ~self.finished.all()
            if not bool(going):
                return None
        if rows == self.batch:
            source_rows = self.sample_index.expand(-1, self.beams)
        else:
            source_rows = parent + self.sample_index * self.beams
        return source_rows.reshape(-1), token.reshape(-1)

    def _extend(self, parent: torch.Tensor, token: torch.Tensor, length: int) -> torch.Tensor:
        """The running histories of ``parent`` (batch, k) with ``token`` appended at ``length``."""
        tokens = self.running_tokens.gather(1, parent[:, :, None].expand(-1, -1, self.max_new_tokens))
        tokens[:, :, length] = token
        return tokens

    def _finish(self, scores, parent, token, ends, length: int) -> None:
        """Merges the continuations that end now into the best ``beams`` finished hypotheses of each sample."""
        admitted = ends & self.improvable
        if self.early_stopping is True:
            admitted &= ~self.finished.all(dim=1, keepdim=True)
        scores = torch.where(admitted, scores / ((length + 1) ** self.length_penalty), -1.0e9)
        merged_scores = torch.cat([self.finished_scores, scores], dim=1)
        best = merged_scores.topk(self.beams).indices
        self.finished_scores = merged_scores.gather(1, best)
        self.finished = torch.cat([self.finished, admitted], dim=1).gather(1, best)
        lengths = torch.cat([self.finished_lengths, torch.full_like(self.finished_lengths, length + 1)], dim=1)
        self.finished_lengths = lengths.gather(1, best)
        merged_tokens = torch.cat([self.finished_tokens, self._extend(parent, token, length)], dim=1)
        self.finished_tokens = merged_tokens.gather(1, best[:, :, None].expand(-1, -1, self.max_new_tokens))
        self.some_finished = True

    def best(self) -> torch.Tensor:
        """The best finished hypothesis of each sample, cut after the longest of them."""
        return self.finished_tokens[:, 0, : int(self.finished_lengths[:, 0].max())]


def _reorder_in_place(cache, rows: torch.Tensor) -> None:
    """Beam reorder of a static cache that keeps its tensors (a compiled step holds their addresses)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys.copy_(layer.keys.index_select(0, rows))
            layer.values.copy_(layer.values.index_select(0, rows))


class _GreedyChooser:
    """generate()'s greedy choice: fp32 logits, repetition penalty over every id seen, EOS masked until
    ``min_new_tokens``, argmax, the pad id once a row has produced EOS."""

    def __init__(self, seen: torch.Tensor, eos_token_id, pad_token_id: int, min_new_tokens: int, penalty: float):
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(ids, device=seen.device)
        self.seen, self.pad, self.min_new_tokens, self.penalty = seen, pad_token_id, min_new_tokens, penalty
        self.unfinished = torch.ones(seen.shape[0], dtype=torch.bool, device=seen.device)
        self.tokens: list[torch.Tensor] = []

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        # an fp32 copy, as generate() takes: the processors below work in place, and a compiled (CUDA-graph) step
        # hands out a buffer that its next replay overwrites
        logits = logits.to(torch.float32, copy=True)
        if self.penalty != 1.0 and self.seen.shape[1]:
            picked = logits.gather(1, self.seen)
            logits.scatter_(1, self.seen, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))
        if len(self.tokens) < self.min_new_tokens:
            logits[:, self.eos] = -float("inf")
        token = torch.where(self.unfinished, logits.argmax(dim=-1), self.pad)
        self.tokens.append(token)
        self.seen = torch.cat([self.seen, token[:, None]], dim=1)
        self.unfinished &= ~torch.isin(token, self.eos)
        return token

    def all_finished(self) -> bool:
        return not bool(self.unfinished.any())

    def generated(self) -> torch.Tensor:
        return torch.stack(self.tokens, dim=1)


class _FixedStepGreedy:
    """Greedy decoding of a decoder-only LLM with a static cache, the whole decode step in fixed-shape tensor ops.

    One step chooses the next token from the logits buffer exactly as ``_GreedyChooser`` does (fp32, the
    repetition penalty on every id seen, EOS masked before ``min_new_tokens``, argmax, pad once a row has ended),
    writes it into the token buffer, then runs the LLM on it at the next cache position and writes the new logits
    into the buffer. Its counters (the step, the position ids, the cache position) are tensors advanced in place and
    the ids seen are a (B, vocab) mask, so the step reads nothing on the host and can be captured as one CUDA graph
    (``graphed``) and replayed once per token; graphed, the prefill is replayed as a graph too. Between steps the
    host reads whether every row has finished.

    The buffers, the static cache and the graph belong to one (batch, prompt bucket, new tokens, settings) key and
    are reused by later calls with that key (``for_call``): the cache is reset in place and the new prompt
    prefilled into it. Prompts are left-padded to a multiple of ``PROMPT_BUCKET`` (masked: the same answers), so
    that batches of nearby prompt lengths share one graph; the last ``KEPT`` keys are kept per model.
    """

    WARMUP_STEPS = 2  # eager steps before the capture (real steps of the first call): kernels load, compile runs
    PROMPT_BUCKET = 32
    KEPT = 4

    def __init__(self, model, key: tuple, batch: int, prompt_length: int, max_new_tokens: int, device,
                 eos: list[int], pad: int, min_new_tokens: int, penalty: float, graphed: bool, compile: bool | str,
                 kernels: str):
        from transformers import StaticCache

        self.cache_arg, self.takes_cache_position = _forward_arguments(model)
        self.model, self.key = model, key
        # compiled without graphs of its own: the whole step is captured as one (graphed) or runs eagerly (fixed)
        mode = "max-autotune-no-cudagraphs" if compile == "max-autotune" else None
        forward = _step_forward(model, kernels)
        self.forward = torch.compile(forward, dynamic=False, mode=mode) if compile else forward
        self.prompt_length, self.max_new_tokens = prompt_length, max_new_tokens
        self.pad, self.min_new_tokens, self.penalty, self.graphed = pad, min_new_tokens, penalty, graphed
        vocab = model.get_output_embeddings().weight.shape[0]
        self.past = StaticCache(config=model.config, max_cache_len=prompt_length + max_new_tokens)
        self.eos = torch.tensor(eos, device=device)
        self.mask = torch.zeros(batch, prompt_length + max_new_tokens, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self.tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.prompt_cache_position = torch.arange(prompt_length, device=device)
        # the prefill is replayed as a graph of its own (its shapes differ from a step's)
        self.prefill = graphs.GraphedCall(self._prefill, kept=1) if graphed else self._prefill
        self.graph = None
        self.eager_steps = 0  # steps run before the capture, over all calls

    @classmethod
    def for_call(cls, model, attention_mask, max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                 repetition_penalty, graphed: bool, compile: bool | str, kernels: str) -> "_FixedStepGreedy":
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        batch, prompt_length = attention_mask.shape
        bucket = -(-prompt_length // cls.PROMPT_BUCKET) * cls.PROMPT_BUCKET
        key = (batch, bucket, max_new_tokens, tuple(eos), pad_token_id, min_new_tokens,
               float(repetition_penalty), graphed, compile, kernels, attention_mask.device)
        kept = getattr(model, "_instructblip_fixed_step_greedy", None)
        if kept is None:
            kept = model._instructblip_fixed_step_greedy = {}
        decoder = kept.pop(key, None)
        if decoder is None:
            while len(kept) >= cls.KEPT:  # the oldest buffers and graph go before new ones are allocated
                kept.pop(next(iter(kept)))
            decoder = cls(model, key, batch, bucket, max_new_tokens, attention_mask.device, eos, pad_token_id,
                          min_new_tokens, float(repetition_penalty), graphed, compile, kernels)
        kept[key] = decoder  # the most recently used last
        return decoder

    def run(self, inputs_embeds, attention_mask, prompt_ids) -> torch.Tensor:
        self._start(inputs_embeds, attention_mask, prompt_ids)
        for index in range(self.max_new_tokens - 1):
            self._step_once()
            if not bool(self.unfinished.any()):  # the one host read per token
                return self.tokens[:, : index + 1].clone()
        self._choose()  # the last token needs no forward
        return self.tokens.clone()

    def _start(self, inputs_embeds, attention_mask, prompt_ids) -> None:
        """The call's state into the buffers, then the prompt's forward (prefill) into the cache."""
        padding = self.prompt_length - attention_mask.shape[1]  # up to the bucket, on the left, masked
        mask = torch.nn.functional.pad(attention_mask.long(), (padding, 0))
        inputs_embeds = torch.nn.functional.pad(inputs_embeds, (0, 0, padding, 0))
        self.mask.zero_()
        self.mask[:, : self.prompt_length] = mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.position.copy_(positions[:, -1:])
        self.cache_position.fill_(self.prompt_length - 1)  # each step first moves it to its token's slot
        self.step_index.zero_()
        self.seen.zero_()
        if prompt_ids is not None and prompt_ids.shape[1]:
            self.seen.scatter_(1, prompt_ids, True)
        self.tokens.fill_(self.pad)
        self.unfinished.fill_(True)
        self.logits.copy_(self.prefill(inputs_embeds, self.mask, positions))

    def _prefill(self, inputs_embeds, mask, positions) -> torch.Tensor:
        """The prompt's forward into the emptied cache: the last position's logits. Repeatable, as a graph's warm-up
        and replay need: the cache is reset first, in place (the graphs hold its tensors; newer transformers count
        its filled length in a tensor of it, which each forward advances)."""
        self.past.reset()
        extra = {"cache_position": self.prompt_cache_position} if self.takes_cache_position else {}
        return self.model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{self.cache_arg: self.past}, **extra,
        ).logits[:, -1]

    def _choose(self) -> torch.Tensor:
        logits = self.logits  # fp32, overwritten by the next forward: the processors work on it in place
        if self.penalty != 1.0:
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.min_new_tokens > 0:
            early = self.step_index < self.min_new_tokens
            logits[:, self.eos] = torch.where(early, -float("inf"), logits[:, self.eos])
        token = torch.where(self.unfinished, logits.argmax(dim=-1), self.pad)
        self.tokens.scatter_(1, self.step_index.expand(token.shape[0], 1), token[:, None])
        self.seen.scatter_(1, token[:, None], True)
        self.unfinished &= ~torch.isin(token, self.eos)
        self.step_index += 1
        return token

    def _step(self) -> None:
        token = self._choose()
        self.position += 1
        self.cache_position += 1
        self.mask.scatter_(1, self.cache_position.expand(self.mask.shape[0], 1), 1)
        extra = {"cache_position": self.cache_position} if self.takes_cache_position else {}
        logits = self.forward(
            input_ids=token[:, None], attention_mask=self.mask, position_ids=self.position, use_cache=True,
            logits_to_keep=1, **{self.cache_arg: self.past}, **extra,
        ).logits[:, -1]
        self.logits.copy_(logits)

    def _step_once(self) -> None:
        if not self.graphed:
            self._step()
            return
        if self.graph is None and self.eager_steps >= self.WARMUP_STEPS:
            self.graph, _ = graphs.record(self._step)  # nothing runs until the replay below
        if self.graph is not None:
            self.graph.replay()
            return
        graphs.warm_up(self._step)  # a real step of this call, run as the capture will run it
        self.eager_steps += 1


def _compiled_forward(model, compile: bool | str, kernels: str):
    """``torch.compile`` of the model's forward for one-token steps (CUDA graphs), built once per model, mode and
    kernels."""
    mode = "max-autotune" if compile == "max-autotune" else "reduce-overhead"
    kept = getattr(model, "_instructblip_compiled_steps", None)
    if kept is None:
        kept = model._instructblip_compiled_steps = {}
    if (mode, kernels) not in kept:
        kept[mode, kernels] = torch.compile(_step_forward(model, kernels), mode=mode, fullgraph=False)
    return kept[mode, kernels]
