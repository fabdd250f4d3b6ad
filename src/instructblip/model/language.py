"""The LLM side: any transformers causal LM (LLaMA/Vicuna, ...) or T5/FlanT5, fed the projected query outputs.

Layouts (Q = number of visual tokens, T*num_query_tokens for video):

* decoder-only, training/scoring: ``[Q visual] BOS instruction answer EOS PAD...`` (right padding); ``labels`` come
  as long as ``input_ids`` (-100 on BOS, instruction and padding) and get Q columns of -100 prepended; the loss is
  the token mean of the shifted cross-entropy, computed in fp32. Position ids 0..N-1, as transformers' forward.
* decoder-only, generation: ``[Q visual] PAD... BOS prompt`` (left padding); transformers' generate derives the
  position ids from the attention mask's cumulative sum, so positions skip the pads.
* encoder-decoder: encoder ``[Q visual] instruction </s> PAD...``; decoder input = labels shifted right from the
  decoder start token; loss = token-mean cross-entropy over labels != -100, in fp32.

Training does not need the logits, only the loss: ``label_loss`` runs the decoder-only LM body and applies the LM
head to the positions that carry a label (the answer tokens and EOS, a small fraction of ``[visual; text]``), so
the vocabulary projection and the fp32 cross-entropy cost answer-length work instead of sequence-length work.
With ``pack_sequences`` (training) the samples are packed without padding first (``packing.py``), for an
encoder-decoder on both the encoder's and the decoder's side.
While ``torch.compile`` traces or a CUDA graph is captured, the head runs on every text position instead (no
shape may depend on where the labels are; see ``fixed_shapes``).
Greedy decoding and beam search go through the lean loops of ``decoding.py``; sampling (and several returned
sequences) through transformers' ``generate``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from instructblip.errors import ConfigError
from instructblip.model import decoding, packing

DECODER_ONLY = "decoder_only"
ENCODER_DECODER = "encoder_decoder"


def text_config_from_dict(llm: dict):
    """A transformers ``PretrainedConfig`` from a plain dict with ``model_type`` (one-line error when unknown)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(llm)
    model_type = values.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"llm.model_type={model_type!r} is not a transformers architecture "
            f"(e.g. 'llama', 't5', 'opt', 'mistral', 'qwen2')"
        )
    return AutoConfig.for_model(model_type, **values)


def llm_kind(text_config) -> str:
    """``decoder_only`` for any causal LM, ``encoder_decoder`` for T5-style seq2seq models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    if getattr(text_config, "is_encoder_decoder", False):
        if type(text_config) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
            return ENCODER_DECODER
    elif type(text_config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return DECODER_ONLY
    raise ConfigError(
        f"llm.model_type={text_config.model_type!r} is neither a causal LM nor an encoder-decoder LM in transformers"
    )


def llm_class(text_config):
    """The transformers model class for a text config (``LlamaForCausalLM``, ``T5ForConditionalGeneration``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if llm_kind(text_config) == ENCODER_DECODER else MODEL_FOR_CAUSAL_LM_MAPPING
    return mapping[type(text_config)]


_fixed_shapes_asked = False


@contextlib.contextmanager
def fixed_shape_loss():
    """Inside it the training loss takes its fixed-shape form, as while a capture runs: a CUDA graph's warm-up steps
    then run the kernels that its capture will record."""
    global _fixed_shapes_asked
    before, _fixed_shapes_asked = _fixed_shapes_asked, True
    try:
        yield
    finally:
        _fixed_shapes_asked = before


def fixed_shapes() -> bool:
    """True while ``torch.compile`` traces, a CUDA graph is being captured or :func:`fixed_shape_loss` asks for it:
    no shape may then depend on a tensor's values (the training loss takes its fixed-shape path)."""
    if _fixed_shapes_asked or torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def fixed_shape_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean loss, per-row token-mean loss) over every position of ``logits`` (B, T, V), the -100 targets
    adding zero: ``label_loss``'s numbers with no shape that depends on where the labels are. Selecting the labelled
    positions needs their count on the host (a device-host synchronisation), which a CUDA graph capture forbids."""
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    token_losses = token_losses.view_as(targets)
    labelled = (targets != -100).sum(dim=1)
    return token_losses.sum() / labelled.sum(), token_losses.sum(dim=1) / labelled.clamp_min(1)


def next_token_targets(visual: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The target of every position of ``[visual; text]`` (decoder-only): position t predicts token t+1, so the
    labels shifted left by one, -100 on the visual tokens and after the last position (the labels move, not the
    large logits)."""
    ignore = labels.new_full(visual.shape[:2], -100)
    return torch.cat([ignore[:, 1:], labels, labels.new_full((labels.shape[0], 1), -100)], dim=1)


class LanguageModel(nn.Module):
    """Wraps a transformers LM (``hf_model``) with the InstructBLIP input layout, loss and generation."""

    def __init__(self, llm: dict, hf_model: nn.Module | None = None):
        super().__init__()
        self.text_config = text_config_from_dict(llm) if hf_model is None else hf_model.config
        self.kind = llm_kind(self.text_config)
        self.hf_model = hf_model if hf_model is not None else llm_class(self.text_config)._from_config(self.text_config)
        # Options of the greedy loop (decoding.greedy): {"cache": "static", "compile": True} on a GPU.
        self.decoding_options: dict = {}

    @property
    def hidden_size(self) -> int:
        config = self.text_config
        return getattr(config, "hidden_size", None) or config.d_model

    @property
    def vocab_size(self) -> int:
        return self.hf_model.get_input_embeddings().weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    def embed_with_visual(
        self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[visual; embed(input_ids)]`` and the mask with ones over the visual tokens."""
        embeds = self.hf_model.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual_mask = torch.ones(visual.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return (
            torch.cat([visual.to(embeds.dtype), embeds], dim=1),
            torch.cat([visual_mask, attention_mask], dim=1),
        )

    def forward(
        self,
        visual: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits, loss). Decoder-only logits cover the whole ``[visual; text]`` sequence."""
        inputs_embeds, mask = self.embed_with_visual(visual, input_ids, attention_mask)
        if self.kind == DECODER_ONLY:
            logits = self.hf_model(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).logits
            loss = None
            if labels is not None:
                loss = token_mean_cross_entropy(logits, next_token_targets(visual, labels))
            return logits, loss
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("an encoder-decoder LLM needs labels or decoder_input_ids")
            decoder_input_ids = self.hf_model._shift_right(labels)
        logits = self.hf_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            use_cache=False,
        ).logits
        loss = token_mean_cross_entropy(logits, labels) if labels is not None else None
        return logits, loss

    def label_loss(
        self,
        visual: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        pack_sequences: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token-mean loss, per-row token-mean loss) without the full logits where the LM head allows it.

        The same numbers as ``forward``'s loss (and a per-row mean for the per-dataset logs; 0 for a row without
        labels). Decoder-only LMs whose head is a plain linear map get it applied only at the labelled positions;
        the others (T5, heads with logit soft-capping or scaling) compute the full logits first.
        ``pack_sequences``: the LLM runs on the samples packed without padding (``packing.py``; an encoder-decoder's
        encoder and decoder rows are packed alike).
        """
        if self.kind != DECODER_ONLY:
            if decoder_input_ids is None:
                decoder_input_ids = self.hf_model._shift_right(labels)
            if pack_sequences:
                return self._packed_seq2seq_losses(
                    visual, input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask
                )
            # labels are not passed on: the loss is computed once, here, from the token losses
            logits, _ = self.forward(
                visual, input_ids, attention_mask, None, decoder_input_ids, decoder_attention_mask
            )
            # The decoder's logits are all computed anyway, and its positions are the answer's: the loss over every
            # one of them, the unlabelled ones adding zero, costs about the same cross-entropy and needs no
            # selection of the labelled ones (index ops, and a host synchronisation on a GPU).
            return fixed_shape_losses(logits, labels)
        inputs_embeds, mask = self.embed_with_visual(visual, input_ids, attention_mask)
        targets = next_token_targets(visual, labels)
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
        llm_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": mask}
        if pack_sequences:
            packed = packing.pack(inputs_embeds, mask, targets, one_row=self._flash_attention())
            # no attention mask: transformers finds the samples from the restarting position ids
            llm_inputs = {"inputs_embeds": packed.inputs_embeds, "position_ids": packed.position_ids}
            targets, rows = packed.targets, packed.sample_index
        fixed = fixed_shapes() and not pack_sequences
        keep = targets != -100
        start = visual.shape[1] - 1  # the visual positions before the last one never carry a target
        # the positions the head runs on: the labelled ones, or (fixed shapes) every one from the last visual on
        select = (lambda x: x[:, start:]) if fixed else (lambda x: x[keep])
        if self._plain_lm_head():
            body = self.hf_model.base_model(**llm_inputs, use_cache=False)
            logits = self.hf_model.get_output_embeddings()(select(body.last_hidden_state))
        else:
            logits = select(self.hf_model(**llm_inputs, use_cache=False).logits)
        if fixed:
            return fixed_shape_losses(logits, select(targets))
        return sample_losses(logits, targets[keep], rows[keep], labels.shape[0])

    def _packed_seq2seq_losses(
        self,
        visual: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``label_loss`` for an encoder-decoder on the samples packed by ``packing.pack_seq2seq``: the encoder runs
        on the packed encoder rows under their mask, the decoder on the packed answers under the causal and the
        cross-attention masks."""
        inputs_embeds, mask = self.embed_with_visual(visual, input_ids, attention_mask)
        packed = packing.pack_seq2seq(inputs_embeds, mask, decoder_input_ids, labels, decoder_attention_mask)
        encoded = self.hf_model.get_encoder()(inputs_embeds=packed.inputs_embeds, attention_mask=packed.encoder_mask)
        # given the encoder's outputs, T5's attention_mask is the decoder's mask over the encoder positions
        logits = self.hf_model(
            encoder_outputs=encoded, attention_mask=packed.cross_mask, decoder_input_ids=packed.decoder_input_ids,
            decoder_attention_mask=packed.decoder_mask, use_cache=False,
        ).logits
        keep = packed.labels != -100
        return sample_losses(logits[keep], packed.labels[keep], packed.sample_index[keep], labels.shape[0])

    def checkpoint_layers(self) -> None:
        """Activation checkpointing on the LLM's blocks (those transformers marks ``GradientCheckpointingLayer``):
        each block keeps only its inputs for the backward pass and recomputes the rest there.

        Not transformers' ``gradient_checkpointing_enable``: it checkpoints a block only while the block is in
        training mode, and a frozen LLM may train in eval mode (``stage.module.frozen_llm_dropout=false``), where it
        would silently do nothing. torch's composable ``checkpoint`` (non-reentrant, the RNG state kept, so the
        recomputed dropout masks are the same) works through module hooks in either mode and leaves parameter names,
        state dicts and FSDP units as they are.
        """
        from torch.distributed._composable import checkpoint
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in self.hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not blocks:
            raise ConfigError(
                f"activation_checkpointing: the {type(self.hf_model).__name__} LLM has no checkpointable blocks"
            )
        for block in blocks:
            checkpoint(block)

    def _flash_attention(self) -> bool:
        """Flash attention keeps packed samples apart only when they share a single row (see ``packing.py``)."""
        return "flash" in str(getattr(self.hf_model.config, "_attn_implementation", ""))

    def _plain_lm_head(self) -> bool:
        """True when logits = output_embeddings(last hidden state), with no soft-capping or scaling after it."""
        config = self.text_config
        return all(getattr(config, name, None) in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))

    @torch.no_grad()
    def generate(
        self,
        visual: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        visual_token_id: int | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """New token ids (B*num_return_sequences, new), padded with the pad id, without prompt or decoder start.

        Decoder-only: when ``visual_token_id`` is given, the prompt ids ``[visual_token_id]*Q + input_ids`` go to
        transformers' generate along with the embeddings, exactly as transformers' InstructBLIP does (so a
        repetition penalty also sees the prompt); without it only the embeddings go (LAVIS: the penalty sees only
        generated tokens).
        """
        inputs_embeds, mask = self.embed_with_visual(visual, input_ids, attention_mask)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": mask}
        if self.kind == DECODER_ONLY:
            prompt_length = 0
            if visual_token_id is not None and visual_token_id < self.vocab_size:
                visual_ids = input_ids.new_full(visual.shape[:2], visual_token_id)
                inputs["input_ids"] = torch.cat([visual_ids, input_ids], dim=1)
                prompt_length = inputs["input_ids"].shape[1]
            if decoding.handles(self.hf_model, generate_kwargs):
                return decoding.greedy(
                    self.hf_model, inputs_embeds, mask, inputs.get("input_ids"), **generate_kwargs,
                    **self.decoding_options,
                )
            if decoding.handles_beam_search(self.hf_model, generate_kwargs):
                return decoding.beam_search(
                    self.hf_model, inputs_embeds, mask, inputs.get("input_ids"), **generate_kwargs,
                    **self.decoding_options,
                )
            return self.hf_model.generate(**inputs, **generate_kwargs)[:, prompt_length:]
        if decoding.handles(self.hf_model, generate_kwargs):
            return decoding.greedy_encoder_decoder(self.hf_model, inputs_embeds, mask, **generate_kwargs)
        if decoding.handles_beam_search(self.hf_model, generate_kwargs):
            return decoding.beam_search_encoder_decoder(self.hf_model, inputs_embeds, mask, **generate_kwargs)
        return self.hf_model.generate(**inputs, **generate_kwargs)[:, 1:]

    def candidate_log_likelihoods(
        self,
        visual: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        candidate_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Summed log-likelihood of each candidate continuation, one per row (all inputs have the same rows).

        Decoder-only: rows are ``[visual] prompt candidate PAD...`` with the prompt's own padding moved to the end,
        so every prompt is directly followed by its candidate. Encoder-decoder: the encoder reads
        ``[visual] prompt`` and the decoder scores the candidate (which should end with ``</s>``).
        """
        if self.kind == DECODER_ONLY:
            ids, mask, targets = _join_right_padded(prompt_ids, prompt_mask, candidate_ids, candidate_mask)
            logits, _ = self.forward(visual, ids, mask)
            visual_ignore = targets.new_full(visual.shape[:2], -100)
            targets = torch.cat([visual_ignore, targets], dim=1)[:, 1:]
            logits = logits[:, :-1]
        else:
            targets = candidate_ids.masked_fill(candidate_mask == 0, -100)
            logits, _ = self.forward(
                visual, prompt_ids, prompt_mask, labels=targets, decoder_attention_mask=candidate_mask
            )
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != -100)).sum(dim=1)


def sample_losses(
    logits: torch.Tensor, targets: torch.Tensor, samples: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token-mean loss, per-sample token-mean loss; 0 for a sample without labels) from the logits of the labelled
    positions (N, V), their targets (N) and the batch row each comes from (N), the cross-entropy in fp32."""
    token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
    per_sample = token_losses.new_zeros(batch_size).index_add(0, samples, token_losses)
    labelled = torch.zeros_like(per_sample).index_add(0, samples, torch.ones_like(token_losses))
    return token_losses.mean(), per_sample / labelled.clamp_min(1)


def token_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the tokens whose label is not -100, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _join_right_padded(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, candidate_ids: torch.Tensor, candidate_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``prompt candidate PAD...`` from padded prompts and candidates (either padding side), plus targets
    (-100 outside the candidate), without a Python loop over rows: each token is scattered to its joined position."""
    rows = prompt_ids.shape[0]
    length = prompt_ids.shape[1] + candidate_ids.shape[1]
    # Real tokens keep their order whichever side the padding was on.
    prompt_positions = prompt_mask.cumsum(dim=1) - 1
    candidate_positions = prompt_mask.sum(dim=1, keepdim=True) + candidate_mask.cumsum(dim=1) - 1
    pad_id = 0
    ids = prompt_ids.new_full((rows, length), pad_id)
    mask = prompt_mask.new_zeros((rows, length))
    targets = prompt_ids.new_full((rows, length), -100)
    # Padding positions are sent to a scratch column past the end and cut off afterwards.
    scratch = length
    ids = torch.cat([ids, ids[:, :1]], dim=1)
    mask = torch.cat([mask, mask[:, :1]], dim=1)
    targets = torch.cat([targets, targets[:, :1]], dim=1)
    p_pos = torch.where(prompt_mask.bool(), prompt_positions, scratch)
    c_pos = torch.where(candidate_mask.bool(), candidate_positions, scratch)
    ids.scatter_(1, p_pos, prompt_ids)
    ids.scatter_(1, c_pos, candidate_ids)
    mask.scatter_(1, p_pos, prompt_mask)
    mask.scatter_(1, c_pos, candidate_mask)
    targets.scatter_(1, c_pos, candidate_ids)
    return ids[:, :length], mask[:, :length], targets[:, :length]
