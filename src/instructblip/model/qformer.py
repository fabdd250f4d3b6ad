"""The instruction-aware Q-Former: a BERT-style (post-LN) transformer over [learned queries; instruction tokens].

Every layer runs self-attention over the whole sequence, then splits it: the first ``num_queries`` positions (the
queries) cross-attend to the image tokens on every ``cross_attention_frequency``-th layer (``layer_idx % k == 0``)
and go through their own feed-forward branch (``query_ffn``); the text positions go through ``text_ffn``. Only the
query outputs are passed on to the LLM. The learned query tokens themselves live in the model that uses the
Q-Former (``InstructBlip.query_tokens``, like transformers' ``query_tokens``), which passes them in.

Entry points (one ``QFormer.forward``, the mode chosen by its arguments):

* InstructBLIP instruction-aware features / BLIP-2 image-text matching:
  ``forward(query_embeds, input_ids, attention_mask, image_embeds)``: queries and text see each other
  (bidirectional; text padding masked), queries cross-attend to the image.
* BLIP-2 queries only (``instruction_aware=False``, the paper's ablation, and BLIP-2 stage 2):
  ``forward(query_embeds, image_embeds=image_embeds)``.
* BLIP-2 image-text contrastive text features: ``forward(input_ids=..., attention_mask=...)``: text only, no
  queries, no cross-attention; the [CLS] output is ``hidden[:, 0]``.
* BLIP-2 image-grounded text generation: ``forward(query_embeds, input_ids, attention_mask, image_embeds,
  causal_text=True)``: queries see only queries (and the image), each text token sees all queries and the text
  before it. Feed ``hidden[:, num_queries:]`` to ``QFormerLMHead``.

``load_bert_weights`` initialises a Q-Former (and optionally a ``QFormerLMHead``) from a Hugging Face BERT state
dict the way LAVIS does: self-attention, embeddings and the text FFN from BERT, the query FFN copied from the text
FFN, cross-attention left freshly initialised. ``QFormerConfig.from_bert_config`` reads the matching sizes.

Attention is ``torch.nn.functional.scaled_dot_product_attention``. With ``activation_checkpointing`` set, each layer
keeps only its inputs for the backward pass and recomputes the rest there (``torch.utils.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from instructblip.errors import CheckpointError


@dataclass
class QFormerConfig:
    """Sizes of the Q-Former (defaults: BERT-base as in BLIP-2/InstructBLIP, 30523 = bert-base-uncased + [DEC])."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    max_text_length: int = 128  # the processor truncates instructions on the left to this many tokens
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    instruction_aware: bool = True  # False: no word/position embeddings and no text FFN (queries only)
    initializer_range: float = 0.02
    # std of the fresh cross-attention's query and key weights, and of its value and output weights (None:
    # initializer_range, as BLIP-2). Attention logits start as the product of two such draws, so at 0.02 every query
    # reads an even mix of the image tokens until a long plateau ends. Stage 1 sets them
    # (stage.module.cross_attention_init_std); they matter only when the weights are drawn, not for loaded ones
    cross_attention_init_std: float | None = None
    cross_attention_value_init_std: float | None = None

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0

    @classmethod
    def from_bert_config(cls, bert_config: dict, **overrides) -> "QFormerConfig":
        """Sizes from a Hugging Face ``BertConfig`` dict (e.g. MiniLM-L6: hidden 384, 6 layers), plus [DEC]."""
        values = dict(
            hidden_size=bert_config["hidden_size"],
            num_layers=bert_config["num_hidden_layers"],
            num_heads=bert_config["num_attention_heads"],
            intermediate_size=bert_config["intermediate_size"],
            vocab_size=bert_config["vocab_size"] + 1,
            max_position_embeddings=bert_config["max_position_embeddings"],
            layer_norm_eps=bert_config.get("layer_norm_eps", 1e-12),
            dropout=bert_config.get("hidden_dropout_prob", 0.1),
            attention_dropout=bert_config.get("attention_probs_dropout_prob", 0.1),
        )
        values.update(overrides)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class QFormerAttention(nn.Module):
    """Multi-head (self- or cross-) attention with BERT's post-LN output: ``LN(x + dropout(out_proj(attn(x))))``."""

    def __init__(self, config: QFormerConfig, context_size: int):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"qformer.hidden_size {config.hidden_size} not divisible by num_heads {config.num_heads}")
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_size, config.hidden_size)
        self.value = nn.Linear(context_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.attention_dropout = config.attention_dropout

    def forward(
        self,
        hidden: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rows: int | None = None,
    ) -> torch.Tensor:
        """``rows``: self-attention output for the first ``rows`` positions only (they still attend to all)."""
        context = hidden if context is None else context
        if rows is not None:
            hidden = hidden[:, :rows]
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., :rows, :]
        batch, length, width = hidden.shape
        heads = self.num_heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(self.query(hidden)),
            split_heads(self.key(context)),
            split_heads(self.value(context)),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        return self.layer_norm(hidden + self.dropout(self.out_proj(attended)))


class QFormerFeedForward(nn.Module):
    """BERT intermediate + output: ``LN(x + dropout(fc_out(gelu(fc_in(x)))))``."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(hidden + self.dropout(self.fc_out(F.gelu(self.fc_in(hidden)))))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.self_attention = QFormerAttention(config, config.hidden_size)
        self.cross_attention = (
            QFormerAttention(config, config.encoder_hidden_size) if config.has_cross_attention(layer_idx) else None
        )
        self.query_ffn = QFormerFeedForward(config)
        self.text_ffn = QFormerFeedForward(config) if config.instruction_aware else None

    def forward(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        queries_only: bool = False,
    ) -> torch.Tensor:
        """``queries_only``: compute and return the query positions alone (the text rows' outputs are not needed)."""
        hidden = self.self_attention(hidden, mask=self_mask, rows=num_queries if queries_only else None)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        outputs = []
        if num_queries:
            if self.cross_attention is not None:
                if image_embeds is None:
                    raise ValueError("the Q-Former's queries need image_embeds on cross-attention layers")
                queries = self.cross_attention(queries, context=image_embeds)
            outputs.append(self.query_ffn(queries))
        if text.shape[1]:
            outputs.append(self.text_ffn(text))
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


class QFormerEmbeddings(nn.Module):
    """Word + absolute position embeddings for text (positions from 0 at the first text token; queries get none),
    then one LayerNorm + dropout over [queries; text]."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if config.instruction_aware:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.word_embeddings = self.position_embeddings = None
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, query_embeds: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former has no text branch (instruction_aware=False): pass no input_ids")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.dropout(self.layer_norm(hidden.to(self.layer_norm.weight.dtype)))


def attention_mask_for(
    num_queries: int, text_mask: torch.Tensor | None, text_length: int, causal_text: bool, batch: int, device
) -> torch.Tensor | None:
    """Boolean self-attention mask (True = may attend), broadcastable to (batch, 1, N, N), N = queries + text.

    Bidirectional: every position sees every unpadded position. ``causal_text``: queries see only queries, text
    sees all queries and the text up to itself.
    """
    if text_mask is None and not causal_text:
        return None
    length = num_queries + text_length
    keys = torch.ones(batch, length, dtype=torch.bool, device=device)
    if text_mask is not None:
        keys[:, num_queries:] = text_mask.to(device=device, dtype=torch.bool)
    if not causal_text:
        return keys[:, None, None, :]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    allowed[:num_queries, num_queries:] = False
    allowed[num_queries:, num_queries:] = torch.ones(text_length, text_length, dtype=torch.bool, device=device).tril()
    return allowed[None, None] & keys[:, None, None, :]


class QFormer(nn.Module):
    """The Q-Former body. See the module docstring for the four ways to call ``forward``."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.embeddings = QFormerEmbeddings(config)
        self.layers = nn.ModuleList(QFormerLayer(config, idx) for idx in range(config.num_layers))
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        self.draw_cross_attention(config.cross_attention_init_std, config.cross_attention_value_init_std)

    def draw_cross_attention(self, query_key_std: float | None, value_output_std: float | None,
                             generator: torch.Generator | None = None) -> None:
        """Redraw the cross-attention's query and key weights, and its value and output weights, at these stds
        (None leaves that pair as it is). See ``QFormerConfig.cross_attention_init_std``."""
        for layer in self.layers:
            if layer.cross_attention is None:
                continue
            for names, std in ((("query", "key"), query_key_std), (("value", "out_proj"), value_output_std)):
                for name in names if std is not None else ():
                    nn.init.normal_(getattr(layer.cross_attention, name).weight, std=std, generator=generator)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        causal_text: bool = False,
        queries_only: bool = False,
    ) -> torch.Tensor:
        """Returns the last hidden states (B, num_queries + text length, hidden); queries come first.

        ``attention_mask`` (B, L) is the text padding mask (1 = token); queries are always visible.
        ``queries_only``: return (B, num_queries, hidden) for callers that use only the query outputs (the LLM's
        visual tokens, BLIP-2's image-text matching). The text positions of the last layer then feed nothing, so
        that layer computes the query rows alone (its text self-attention rows and text FFN are skipped): the same
        query outputs and gradients for less work.
        """
        if query_embeds is None and input_ids is None:
            raise ValueError("QFormer.forward needs query_embeds, input_ids or both")
        if queries_only and query_embeds is None:
            raise ValueError("queries_only=True needs query_embeds")
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        text_length = 0 if input_ids is None else input_ids.shape[1]
        hidden = self.embeddings(query_embeds, input_ids)
        mask = attention_mask_for(
            num_queries, attention_mask if text_length else None, text_length, causal_text, hidden.shape[0],
            hidden.device,
        )
        if image_embeds is not None:
            image_embeds = image_embeds.to(hidden.dtype)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            rows_only = queries_only and index == last
            if self.activation_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, num_queries, mask, image_embeds, rows_only, use_reentrant=False)
            else:
                hidden = layer(hidden, num_queries, mask, image_embeds, rows_only)
        return hidden[:, :num_queries] if queries_only else hidden


class QFormerLMHead(nn.Module):
    """BERT's LM prediction head for the Q-Former's text positions: dense -> GELU -> LayerNorm -> vocabulary.

    ``tie_to(qformer)`` shares the output matrix with the word embeddings, as BERT (and LAVIS stage 1) does.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.normal_(self.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.dense.bias)
        nn.init.normal_(self.decoder.weight, std=config.initializer_range)
        nn.init.zeros_(self.decoder.bias)

    def tie_to(self, qformer: QFormer) -> None:
        if qformer.embeddings.word_embeddings is None:
            raise ValueError("cannot tie the LM head to a Q-Former without a text branch")
        self.decoder.weight = qformer.embeddings.word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden))))


def _bert_to_qformer_names(bert_key: str) -> list[str]:
    """Our Q-Former parameter names that a BERT parameter initialises (the text FFN also seeds the query FFN)."""
    key = bert_key.removeprefix("bert.")
    simple = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight": "embeddings.layer_norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.layer_norm.bias",
    }
    if key in simple:
        return [simple[key]]
    parts = key.split(".")
    if len(parts) < 5 or parts[:2] != ["encoder", "layer"]:
        return []
    layer, rest = parts[2], ".".join(parts[3:])
    per_layer = {
        "attention.self.query": ["self_attention.query"],
        "attention.self.key": ["self_attention.key"],
        "attention.self.value": ["self_attention.value"],
        "attention.output.dense": ["self_attention.out_proj"],
        "attention.output.LayerNorm": ["self_attention.layer_norm"],
        "intermediate.dense": ["text_ffn.fc_in", "query_ffn.fc_in"],
        "output.dense": ["text_ffn.fc_out", "query_ffn.fc_out"],
        "output.LayerNorm": ["text_ffn.layer_norm", "query_ffn.layer_norm"],
    }
    module, param = rest.rsplit(".", 1)
    return [f"layers.{layer}.{target}.{param}" for target in per_layer.get(module, [])]


_BERT_LM_HEAD_NAMES = {
    "cls.predictions.transform.dense.weight": "dense.weight",
    "cls.predictions.transform.dense.bias": "dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "layer_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "layer_norm.bias",
    "cls.predictions.decoder.weight": "decoder.weight",
    "cls.predictions.bias": "decoder.bias",
}


@torch.no_grad()
def load_bert_weights(
    qformer: QFormer, bert_state_dict: dict[str, torch.Tensor], lm_head: QFormerLMHead | None = None
) -> list[str]:
    """Initialise ``qformer`` (and ``lm_head`` when the dict has BERT's ``cls.predictions``) from a BERT state dict.

    Embedding tables may have fewer rows than ours (bert-base-uncased 30522 vs 30522 + [DEC]): the extra rows keep
    their fresh initialisation. Returns the Q-Former parameters BERT did not provide (cross-attention, and the
    text branch when BERT lacks layers); raises ``CheckpointError`` on a size mismatch.
    """
    ours = qformer.state_dict()
    loaded: set[str] = set()
    targets: list[tuple[str, torch.Tensor, nn.Module]] = []
    for bert_key, tensor in bert_state_dict.items():
        for name in _bert_to_qformer_names(bert_key):
            if name in ours:
                targets.append((name, tensor, qformer))
        if lm_head is not None and bert_key in _BERT_LM_HEAD_NAMES:
            targets.append((_BERT_LM_HEAD_NAMES[bert_key], tensor, lm_head))
    for name, tensor, module in targets:
        target = module.get_parameter(name)
        if name.endswith("word_embeddings.weight") or name.endswith("position_embeddings.weight") or (
            module is lm_head and name.startswith("decoder")
        ):
            rows = min(target.shape[0], tensor.shape[0])
            if target.shape[1:] != tensor.shape[1:]:
                raise CheckpointError(f"BERT {name}: shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}")
            target[:rows].copy_(tensor[:rows])
        elif target.shape != tensor.shape:
            raise CheckpointError(
                f"BERT weights do not fit the Q-Former: {name} is {tuple(tensor.shape)} in BERT, "
                f"{tuple(target.shape)} here (set QFormerConfig.from_bert_config sizes)"
            )
        else:
            target.copy_(tensor)
        if module is qformer:
            loaded.add(name)
    return sorted(set(ours) - loaded)
