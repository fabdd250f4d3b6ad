"""InstructBLIP: frozen image encoder -> instruction-aware Q-Former -> linear projection -> frozen LLM.

``InstructBlip(config)`` builds the model from a typed config (see ``presets.py`` for the released ones);
``InstructBlip.from_pretrained(path)`` loads a Hugging Face InstructBLIP directory (what ``save_pretrained``
writes too) or a LAVIS ``.pth``, with the processor attached. The batch contract (what the processor produces and
``forward`` consumes) is described in ``language.py`` and the project's DESIGN/RULES.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from instructblip.errors import CheckpointError, ConfigError
from instructblip.model import graphs
from instructblip.model.language import DECODER_ONLY, LanguageModel
from instructblip.model.qformer import QFormer, QFormerConfig
from instructblip.model.vision import VisionConfig, VisionEncoder

DTYPE_POLICIES = ("auto", "float32", "bfloat16")

# LAVIS generate() defaults (= the released demo settings); used for every setting the caller leaves out.
GENERATION_DEFAULTS = dict(
    num_beams=5,
    max_new_tokens=256,
    min_new_tokens=1,
    do_sample=False,
    top_p=0.9,
    temperature=1.0,
    repetition_penalty=1.5,
    length_penalty=1.0,
    num_return_sequences=1,
)
# generate_ids with graphed decoding pads the Q-Former instruction to a multiple of this (see there)
GRAPHED_INSTRUCTION_BUCKET = 32


@dataclass
class InstructBlipConfig:
    """The whole model. ``llm`` is a transformers text-config dict (``model_type`` plus the sizes).

    ``num_query_tokens`` and ``instruction_aware`` are the source of truth for the Q-Former's copies of them;
    the Q-Former's ``encoder_hidden_size`` follows the vision width. ``image_token_id`` is transformers'
    ``image_token_index`` (the ``<image>`` id in the LLM vocabulary), kept for export and exact generation parity.
    ``dtype_policy``: ``auto`` = frozen parts in bf16 and trained parts in fp32 on CUDA, all fp32 on CPU;
    ``float32``/``bfloat16`` = everything in that dtype.
    Training speed options (they change no result): ``pack_sequences`` packs the samples of a training batch
    without padding before the LLM (see ``packing.py``); ``activation_checkpointing``
    recomputes the Q-Former's and the LLM's layer activations in the backward pass instead of keeping them.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: dict = field(default_factory=dict)
    num_query_tokens: int = 32
    instruction_aware: bool = True
    freeze_vision: bool = True
    freeze_llm: bool = True
    freeze_qformer: bool = False
    image_token_id: int | None = None
    dtype_policy: str = "auto"
    pack_sequences: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self):
        if not isinstance(self.vision, VisionConfig):
            self.vision = VisionConfig(**dict(self.vision))
        if not isinstance(self.qformer, QFormerConfig):
            self.qformer = QFormerConfig(**dict(self.qformer))
        self.llm = _plain(self.llm)
        if "model_type" not in self.llm:
            raise ConfigError("llm: a transformers text config needs 'model_type' (e.g. 'llama', 't5')")
        if self.dtype_policy not in DTYPE_POLICIES:
            raise ConfigError(f"dtype_policy={self.dtype_policy!r}; allowed: {', '.join(DTYPE_POLICIES)}")
        self.qformer = replace(
            self.qformer,
            num_query_tokens=self.num_query_tokens,
            instruction_aware=self.instruction_aware,
            encoder_hidden_size=self.vision.width,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "InstructBlipConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown InstructBlipConfig keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**values)


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra) -> plain dicts/lists, so transformers configs accept them."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class InstructBlipOutput:
    """``logits`` is None when ``forward(return_logits=False)``; ``per_sample_loss`` (each row's token-mean loss,
    for the per-dataset training logs) is filled then."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    per_sample_loss: torch.Tensor | None = None


class InstructBlip(nn.Module):
    """See the module docstring. Parameters: ``vision`` (trunk + ``ln_vision``), ``query_tokens``, ``qformer``,
    ``projection`` (Q-Former width -> LLM width) and ``llm`` (the transformers LM in ``llm.hf_model``)."""

    def __init__(self, config: InstructBlipConfig, language_model: LanguageModel | None = None):
        super().__init__()
        self.vision = VisionEncoder(config.vision, frozen=config.freeze_vision)
        if self.vision.width != config.qformer.encoder_hidden_size:  # an open_clip tower knows its own width
            config = replace(config, vision=replace(config.vision, width=self.vision.width))
        self.config = config
        qformer_config = config.qformer
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, qformer_config.hidden_size))
        nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
        self.qformer = QFormer(qformer_config)
        self.llm = language_model if language_model is not None else LanguageModel(config.llm)
        self.projection = nn.Linear(qformer_config.hidden_size, self.llm.hidden_size)
        self.processor = None
        self._graphed_encoding = None  # encode_images as a CUDA graph, built by generate_ids when decoding is graphed
        if config.activation_checkpointing:
            self.qformer.activation_checkpointing = True
            self.llm.checkpoint_layers()
        self.apply_freezing()

    # ------------------------------------------------------------------------------------------------ setup

    def apply_freezing(self) -> None:
        """requires_grad from the config's freeze flags (``ln_vision`` trains with the Q-Former, as in LAVIS)."""
        config = self.config
        self.vision.trunk.requires_grad_(not config.freeze_vision)
        self.llm.requires_grad_(not config.freeze_llm)
        for part in (self.query_tokens, self.qformer, self.projection, self.vision.ln_vision):
            part.requires_grad_(not config.freeze_qformer)

    def place(self, device: str | torch.device | None = None) -> "InstructBlip":
        """Move to ``device`` and cast by the dtype policy (auto: frozen parts bf16 on CUDA, the rest fp32)."""
        device = torch.device(device) if device is not None else self.query_tokens.device
        self.to(device)
        policy = self.config.dtype_policy
        if policy == "float32" or (policy == "auto" and device.type != "cuda"):
            return self.float()
        if policy == "bfloat16":
            return self.to(torch.bfloat16)
        towers = ((self.vision.trunk, self.config.freeze_vision), (self.llm, self.config.freeze_llm))
        frozen = [module for module, is_frozen in towers if is_frozen]
        for module in frozen:
            module.to(torch.bfloat16)
        # The rest to fp32 without a detour of the frozen towers through fp32 (a 7B LLM would need 27 GB for it).
        in_frozen = {id(t) for m in frozen for t in (*m.parameters(), *m.buffers())}
        for tensor in (*self.parameters(), *self.buffers()):
            if id(tensor) not in in_frozen and tensor.is_floating_point():
                tensor.data = tensor.data.float()
        return self

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def unused_parameter_names(self) -> list[str]:
        """Parameters no output of this model depends on: the last Q-Former layer's text feed-forward branch (only
        the query outputs go on, so that branch never runs; see ``QFormer.forward(queries_only=True)``). They stay
        in the checkpoint layout; training keeps them frozen (DDP expects every trained parameter to get a
        gradient)."""
        last = len(self.qformer.layers) - 1
        text_ffn = self.qformer.layers[last].text_ffn
        if text_ffn is None:
            return []
        return [f"qformer.layers.{last}.text_ffn.{name}" for name, _ in text_ffn.named_parameters()]

    # ------------------------------------------------------------------------------------------------ encoding

    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected query outputs (B, T*Q, D_llm); a video (B, T, 3, H, W) runs the Q-Former per frame with the same
        instruction and concatenates the frames' queries frame-major.

        ``image_features`` replaces ``pixel_values`` with the frozen trunk's precomputed output, (B, tokens, width)
        or (B, T, tokens, width) (``instructblip.data.features``); ``ln_vision`` still runs, it trains."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("give exactly one of pixel_values and image_features")
        images = pixel_values if image_features is None else image_features
        frames = images.shape[1] if images.dim() == (5 if image_features is None else 4) else None
        if frames is not None:
            images = images.flatten(0, 1)
            if qformer_input_ids is not None:
                qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        if image_features is None:
            queries = self.query_outputs(images, qformer_input_ids, qformer_attention_mask)
        else:
            queries = self.query_outputs(None, qformer_input_ids, qformer_attention_mask, image_features=images)
        visual = self.projection(queries)
        if frames is not None:
            visual = visual.reshape(-1, frames * visual.shape[1], visual.shape[2])
        return visual

    def query_outputs(
        self,
        pixel_values: torch.Tensor | None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Q-Former's query positions (N, Q, hidden) for images (N, 3, H, W) or their trunk features."""
        if image_features is None:
            image_embeds = self.vision(pixel_values)
        else:  # the trunk ran ahead of time; ln_vision runs here, in its own precision as in VisionEncoder
            image_embeds = self.vision.ln_vision(image_features.to(self.vision.ln_vision.weight))
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if not self.config.instruction_aware:
            qformer_input_ids = qformer_attention_mask = None
        elif qformer_input_ids is None:
            raise ValueError("an instruction-aware model needs qformer_input_ids (the instruction's BERT tokens)")
        return self.qformer(queries, qformer_input_ids, qformer_attention_mask, image_embeds, queries_only=True)

    # ------------------------------------------------------------------------------------------------ training

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        image_features: torch.Tensor | None = None,
    ) -> InstructBlipOutput:
        """Loss (token mean over the answer tokens and EOS) and logits (decoder-only: over ``[visual; text]``).

        ``return_logits=False`` (training, with ``labels``): the loss and the per-row losses without the full logits
        (the LM head runs on the labelled positions only, see ``LanguageModel.label_loss``), on the samples packed
        without padding when ``config.pack_sequences``; same loss.
        ``image_features`` (precomputed trunk output, see ``encode_images``) stands in for ``pixel_values``.
        """
        if input_ids is None:
            raise ValueError("forward needs input_ids (the LLM text tokens)")
        visual = self.encode_images(pixel_values, qformer_input_ids, qformer_attention_mask, image_features)
        if not return_logits and labels is not None:
            loss, per_sample = self.llm.label_loss(
                visual,
                input_ids.to(visual.device),
                None if attention_mask is None else attention_mask.to(visual.device),
                labels.to(visual.device),
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                pack_sequences=self.config.pack_sequences,
            )
            return InstructBlipOutput(loss=loss, logits=None, per_sample_loss=per_sample)
        logits, loss = self.llm(
            visual,
            input_ids.to(visual.device),
            None if attention_mask is None else attention_mask.to(visual.device),
            labels=None if labels is None else labels.to(visual.device),
            decoder_input_ids=None if decoder_input_ids is None else decoder_input_ids.to(visual.device),
            decoder_attention_mask=None if decoder_attention_mask is None else decoder_attention_mask.to(visual.device),
        )
        return InstructBlipOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------------------------------------ inference

    def _require_processor(self):
        if self.processor is None:
            raise ConfigError(
                "this model has no processor attached: load it with InstructBlip.from_pretrained(dir) or set "
                "model.processor = instructblip.processing.InstructBlipProcessor(...)"
            )
        return self.processor

    def generation_kwargs(self, **settings) -> dict:
        """transformers ``generate`` keyword arguments: LAVIS defaults for every setting not given."""
        unknown = set(settings) - set(GENERATION_DEFAULTS) - {"eos_token_id", "pad_token_id"}
        if unknown:
            raise ConfigError(f"unknown generation settings {sorted(unknown)}; allowed: {sorted(GENERATION_DEFAULTS)}")
        values = {**GENERATION_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
        if not values["do_sample"]:  # avoid transformers' warnings about sampling settings without sampling
            values.pop("top_p")
            values.pop("temperature")
        tokenizer = getattr(self.processor, "tokenizer", None)
        text_config = self.llm.text_config
        eos = tokenizer.eos_token_id if tokenizer is not None else text_config.eos_token_id
        pad = getattr(self.processor, "pad_token_id", None) if self.processor is not None else None
        values.setdefault("eos_token_id", eos)
        values.setdefault("pad_token_id", pad if pad is not None else text_config.pad_token_id)
        return values

    @torch.no_grad()
    def generate_ids(self, batch: dict[str, torch.Tensor], **settings) -> torch.Tensor:
        """New token ids for a generation batch (left-padded for decoder-only LLMs), padded with the pad id."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        qformer_ids, qformer_mask = batch.get("qformer_input_ids"), batch.get("qformer_attention_mask")
        encode = self.encode_images
        if self.llm.decoding_options.get("step") == "graphed":
            # The encoding replayed as a CUDA graph too, one per shape: the instruction right-padded (masked) to a
            # multiple of GRAPHED_INSTRUCTION_BUCKET tokens, so that batches of nearby lengths share a graph.
            if self._graphed_encoding is None:
                self._graphed_encoding = graphs.GraphedCall(self.encode_images)
            encode = self._graphed_encoding
            if qformer_ids is not None:
                padding = -qformer_ids.shape[1] % GRAPHED_INSTRUCTION_BUCKET
                qformer_mask = torch.ones_like(qformer_ids) if qformer_mask is None else qformer_mask
                qformer_ids, qformer_mask = F.pad(qformer_ids, (0, padding)), F.pad(qformer_mask, (0, padding))
        visual = encode(batch["pixel_values"], qformer_ids, qformer_mask)
        return self.llm.generate(
            visual,
            batch["input_ids"],
            batch.get("attention_mask"),
            visual_token_id=self.config.image_token_id,
            **self.generation_kwargs(**settings),
        )

    @torch.no_grad()
    def generate(self, images, prompts, **settings) -> list[str]:
        """Answers for PIL images (or lists of PIL frames for video) and prompts (one per image, or one for all).

        Settings: num_beams, max_new_tokens, min_new_tokens, do_sample, top_p, temperature, repetition_penalty,
        length_penalty, num_return_sequences; the rest default to LAVIS' (beam 5, 256 new tokens, ...).
        """
        processor = self._require_processor()
        images, prompts = _as_batch(images, prompts)
        batch = processor.generation_batch(images, prompts)
        return processor.decode(self.generate_ids(batch, **settings))

    @torch.no_grad()
    def rank(self, images, prompts, candidates, batch_size: int = 64) -> list[list[float]]:
        """The paper's vocabulary ranking: per sample, each candidate's summed token log-likelihood under the LLM.

        ``candidates``: one list shared by the batch or one list per sample. Decoder-only: the candidate's tokens
        follow the prompt (no EOS); T5: the decoder scores candidate + ``</s>``. Images are encoded once; the
        (sample, candidate) rows are scored ``batch_size`` at a time.
        """
        processor = self._require_processor()
        images, prompts = _as_batch(images, prompts)
        per_sample = candidates and not isinstance(candidates[0], str)
        candidate_lists = [list(c) for c in candidates] if per_sample else [list(candidates)] * len(prompts)
        if len(candidate_lists) != len(prompts):
            raise ConfigError(f"{len(candidate_lists)} candidate lists for {len(prompts)} prompts")
        batch = {k: v.to(self.device) for k, v in processor.generation_batch(images, prompts).items()}
        visual = self.encode_images(batch["pixel_values"], batch.get("qformer_input_ids"), batch.get("qformer_attention_mask"))

        rows = [(i, c) for i, cands in enumerate(candidate_lists) for c in range(len(cands))]
        texts = [candidate_lists[i][c] for i, c in rows]
        tokenizer = processor.tokenizer
        token_rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.llm.kind != DECODER_ONLY:
            token_rows = [ids + [tokenizer.eos_token_id] for ids in token_rows]
        scores = torch.empty(len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = range(start, min(start + batch_size, len(rows)))
            sample = torch.tensor([rows[r][0] for r in chunk], device=self.device)
            candidate_ids, candidate_mask = _right_pad([token_rows[r] for r in chunk], processor.pad_token_id)
            scores[start : chunk.stop] = self.llm.candidate_log_likelihoods(
                visual[sample],
                batch["input_ids"][sample],
                batch["attention_mask"][sample],
                candidate_ids.to(self.device),
                candidate_mask.to(self.device),
            ).cpu()
        out: list[list[float]] = [[] for _ in prompts]
        for (i, _), score in zip(rows, scores.tolist()):
            out[i].append(score)
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "InstructBlip":
        """A Hugging Face InstructBLIP directory (also what ``save_pretrained`` writes) or a LAVIS ``.pth``.

        ``overrides``: InstructBlipConfig fields (e.g. ``instruction_aware=False``, ``dtype_policy``,
        ``freeze_llm``), and ``device`` (placed by the dtype policy). A LAVIS ``.pth`` also needs
        ``vision=`` (EVA weights), ``llm=`` (the LLM directory) and ``model=`` (the released name) or ``config=``;
        see ``instructblip.checkpoint.lavis.load_lavis``.
        """
        from instructblip.checkpoint import hf

        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_file() and path.suffix in (".pth", ".pt"):
            from instructblip.checkpoint import lavis

            lavis_names = ("vision", "llm", "model", "config", "qformer_tokenizer", "ln_vision_eps", "image_size")
            lavis_args = {k: overrides.pop(k) for k in lavis_names if k in overrides}
            if "vision" not in lavis_args or "llm" not in lavis_args:
                raise ConfigError(
                    f"LAVIS checkpoint {path} holds only the trained parts: also give vision=<eva_vit_g.pth> and "
                    "llm=<Hugging Face LLaMA/T5 directory> (and model=<released name> or config=<config.json>)"
                )
            loaded = lavis.load_lavis(path, **lavis_args)
            return hf.build_from_hf(
                loaded.config.to_dict(), loaded.state_dict, loaded.processor, str(path),
                ln_vision_eps=loaded.ln_vision_eps, **overrides,
            )
        if path.is_file():
            raise CheckpointError(
                f"{path}: expected a Hugging Face InstructBLIP directory or a LAVIS .pth/.pt file"
            )
        return hf.load_hf_checkpoint(path, **overrides)

    def save_pretrained(self, path: str | Path, max_shard_size: int = 5 * 1024**3) -> None:
        """Write the Hugging Face layout (config.json, safetensors, processor files when a processor is attached)."""
        from instructblip.checkpoint import hf

        hf.save_hf_checkpoint(self, path, max_shard_size=max_shard_size)


def _as_batch(images, prompts) -> tuple[list, list[str]]:
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ConfigError(f"{len(images)} images but {len(prompts)} prompts")
    return images, prompts


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask
