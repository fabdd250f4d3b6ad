"""A lean greedy decoding loop for decoder-only LLMs: the same token ids as transformers' ``generate``, less work.

transformers' ``generate`` is general: per step it re-prepares the model inputs, runs a list of logits processors
and stopping criteria, and checks many options. InstructBLIP's greedy decoding needs four things: a KV cache, the
repetition penalty, the minimum length (EOS suppressed until ``min_new_tokens``) and EOS/padding bookkeeping. This
loop does exactly those, calling the transformers model itself for every forward (so the numbers are the model's
own), and asks it for the last position's logits only (``logits_to_keep=1``).

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
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
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
    seen = prompt_ids if prompt_ids is not None else attention_mask.new_zeros(batch, 0)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generated = []
    extra = {"cache_position": torch.arange(prompt_length, device=device)} if takes_cache_position else {}
    logits = model(
        inputs_embeds=inputs_embeds, attention_mask=full_mask if cache == "static" else attention_mask,
        position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_arg: past}, **extra,
    ).logits[:, -1].float()
    for index in range(max_new_tokens):
        if repetition_penalty != 1.0 and seen.shape[1]:
            picked = logits.gather(1, seen)
            logits.scatter_(1, seen, torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty))
        if index < min_new_tokens:
            logits[:, eos] = -float("inf")
        token = torch.where(unfinished, logits.argmax(dim=-1), pad_token_id)
        generated.append(token)
        seen = torch.cat([seen, token[:, None]], dim=1)
        unfinished &= ~torch.isin(token, eos)
        if index + 1 == max_new_tokens or not bool(unfinished.any()):
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
        ).logits[:, -1].float()
    return torch.stack(generated, dim=1)


def _compiled_forward(model):
    """``torch.compile`` of the model's forward for one-token steps, built once per model."""
    compiled = getattr(model, "_instructblip_compiled_step", None)
    if compiled is None:
        compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        model._instructblip_compiled_step = compiled
    return compiled
