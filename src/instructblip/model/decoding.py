"""Lean greedy decoding loops (decoder-only and T5-style LLMs): the same token ids as transformers' ``generate``.

transformers' ``generate`` is general: per step it re-prepares the model inputs, runs a list of logits processors
and stopping criteria, and checks many options. InstructBLIP's greedy decoding needs four things: a KV cache, the
repetition penalty, the minimum length (EOS suppressed until ``min_new_tokens``) and EOS/padding bookkeeping. This
loop does exactly those, calling the transformers model itself for every forward (so the numbers are the model's
own), and asks a decoder-only model for the last position's logits only (``logits_to_keep=1``); a T5-style model
runs its encoder once and its decoder one token a step (``greedy_encoder_decoder``).

It reproduces ``generate``'s choices: position ids from the attention mask's cumulative sum (left padding), the
penalty applied to every token id seen so far (the prompt ids when given, then the generated ones), logits in fp32
before the processors, pad after EOS, and a stop once every row has finished or ``max_new_tokens`` are out.
Sampling, beam search and several return sequences are left to ``generate`` (``handles`` says which calls qualify).

``cache="static"`` uses transformers' ``StaticCache`` and keeps every decode step's shapes fixed (the attention mask
is one buffer of the final length, filled as tokens come; the cache position is passed where the model takes it),
and ``compile=True`` runs each decode step through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): a GPU
option, the compiled step is kept on the model.
"""

from __future__ import annotations

import inspect

import torch

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


def handles(model, settings: dict) -> bool:
    """True when ``settings`` ask for plain greedy decoding the loop reproduces exactly."""
    if set(settings) - _HANDLED:
        return False
    if settings.get("num_beams", 1) != 1 or settings.get("do_sample", False):
        return False
    if settings.get("num_return_sequences", 1) != 1 or settings.get("max_new_tokens") is None:
        return False
    config = model.generation_config
    return all(getattr(config, name, None) in inactive for name, inactive in _INACTIVE.items())


@torch.no_grad()
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
    compile: bool = False,
    **ignored,
) -> torch.Tensor:
    """New token ids (B, n <= max_new_tokens) after the prompt ``inputs_embeds`` (left-padded, ``attention_mask``).

    ``model``: a transformers causal LM. ``prompt_ids``: the prompt's token ids for the repetition penalty (None:
    the penalty sees only generated tokens). ``ignored``: the generate() settings that do not change greedy
    decoding (``num_beams=1``, ``do_sample=False``, ``length_penalty``, ``num_return_sequences=1``).
    """
    from transformers import DynamicCache, StaticCache

    batch, prompt_length = attention_mask.shape
    device = inputs_embeds.device
    if cache == "static":
        past = StaticCache(config=model.config, max_cache_len=prompt_length + max_new_tokens)
    elif cache == "dynamic":
        past = DynamicCache()
    else:
        raise ValueError(f"cache={cache!r}; allowed: 'dynamic', 'static'")
    step = _compiled_forward(model) if compile else model

    parameters = inspect.signature(model.forward).parameters
    takes_cache_position = "cache_position" in parameters
    # transformers renamed the forward's cache argument (``past_key_values`` -> ``cache``); use the model's own name
    cache_arg = "cache" if "cache" in parameters else "past_key_values"

    attention_mask = attention_mask.long()
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    if cache == "static":  # one mask of the final length: the same shapes at every decode step
        full_mask = attention_mask.new_zeros(batch, prompt_length + max_new_tokens)
        full_mask[:, :prompt_length] = attention_mask
    chooser = _GreedyChooser(
        prompt_ids if prompt_ids is not None else attention_mask.new_zeros(batch, 0),
        eos_token_id, pad_token_id, min_new_tokens, repetition_penalty,
    )
    extra = {"cache_position": torch.arange(prompt_length, device=device)} if takes_cache_position else {}
    logits = model(
        inputs_embeds=inputs_embeds, attention_mask=full_mask if cache == "static" else attention_mask,
        position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_arg: past}, **extra,
    ).logits[:, -1]
    for index in range(max_new_tokens):
        token = chooser.choose(logits)
        if index + 1 == max_new_tokens or chooser.all_finished():
            break
        if cache == "static":
            full_mask[:, prompt_length + index] = 1
            attention_mask = full_mask
        else:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        if takes_cache_position:
            extra = {"cache_position": torch.tensor([prompt_length + index], device=device)}
        logits = step(
            input_ids=token[:, None], attention_mask=attention_mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **{cache_arg: past}, **extra,
        ).logits[:, -1]
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
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    batch = inputs_embeds.shape[0]
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    encoded = model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    encoder_outputs = BaseModelOutput(last_hidden_state=encoded.last_hidden_state)
    past = EncoderDecoderCache(DynamicCache(), DynamicCache())
    start = model.generation_config.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    token = attention_mask.new_full((batch,), start, dtype=torch.long)
    chooser = _GreedyChooser(token[:, None], eos_token_id, pad_token_id, min_new_tokens, repetition_penalty)
    for index in range(max_new_tokens):
        logits = model(
            encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=token[:, None],
            use_cache=True, **{cache_arg: past},
        ).logits[:, -1]
        token = chooser.choose(logits)
        if chooser.all_finished():
            break
    return chooser.generated()


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


def _compiled_forward(model):
    """``torch.compile`` of the model's forward for one-token steps, built once per model."""
    compiled = getattr(model, "_instructblip_compiled_step", None)
    if compiled is None:
        compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        model._instructblip_compiled_step = compiled
    return compiled
