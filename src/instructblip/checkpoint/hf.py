"""The Hugging Face InstructBLIP layout: load it into ``InstructBlip`` and write it back.

A directory holds ``config.json`` (``InstructBlipConfig``: vision_config, qformer_config, text_config,
num_query_tokens, image_token_index), the weights (``model.safetensors``, sharded ``model-XXXXX-of-YYYYY.safetensors``
+ ``model.safetensors.index.json``, or the legacy ``pytorch_model*.bin``) and the processor files (LLM tokenizer,
``qformer_tokenizer/``, processor/preprocessor configs). ``save_hf_checkpoint`` writes exactly what
``transformers.InstructBlipForConditionalGeneration.from_pretrained`` loads.

Key mapping, Hugging Face -> ours (``{i}`` = layer index):

================================================================  ==================================================
``vision_model.embeddings.class_embedding``                       ``vision.trunk.cls_token``
``vision_model.embeddings.position_embedding``                    ``vision.trunk.pos_embed``
``vision_model.embeddings.patch_embedding.*``                     ``vision.trunk.patch_embed.proj.*``
``vision_model.encoder.layers.{i}.layer_norm1/2.*``               ``vision.trunk.blocks.{i}.norm1/2.*``
``vision_model.encoder.layers.{i}.self_attn.qkv.weight``          ``vision.trunk.blocks.{i}.attn.qkv.weight``
``vision_model.encoder.layers.{i}.self_attn.qkv.bias``            ``...attn.q_bias`` + ``...attn.v_bias`` (k third 0)
``vision_model.encoder.layers.{i}.self_attn.projection.*``        ``vision.trunk.blocks.{i}.attn.proj.*``
``vision_model.encoder.layers.{i}.mlp.fc1/fc2.*``                 ``vision.trunk.blocks.{i}.mlp.fc1/fc2.*``
``vision_model.post_layernorm.*``                                 ``vision.ln_vision.*``
``query_tokens``                                                  ``query_tokens``
``qformer.embeddings.word_embeddings/position_embeddings.weight``  ``qformer.embeddings.<same>.weight``
``qformer.embeddings.layernorm.*``                                ``qformer.embeddings.layer_norm.*``
``qformer.encoder.layer.{i}.attention.attention.query/key/value`` ``qformer.layers.{i}.self_attention.<same>``
``qformer.encoder.layer.{i}.attention.output.dense/LayerNorm``    ``qformer.layers.{i}.self_attention.out_proj/layer_norm``
``qformer.encoder.layer.{i}.crossattention.*``                    ``qformer.layers.{i}.cross_attention.*`` (same)
``qformer.encoder.layer.{i}.intermediate.dense``                  ``qformer.layers.{i}.text_ffn.fc_in``
``qformer.encoder.layer.{i}.output.dense/LayerNorm``              ``qformer.layers.{i}.text_ffn.fc_out/layer_norm``
``qformer.encoder.layer.{i}.intermediate_query.dense``            ``qformer.layers.{i}.query_ffn.fc_in``
``qformer.encoder.layer.{i}.output_query.dense/LayerNorm``        ``qformer.layers.{i}.query_ffn.fc_out/layer_norm``
``language_projection.*``                                         ``projection.*``
``language_model.*``                                              ``llm.hf_model.*``
================================================================  ==================================================
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from instructblip.errors import CheckpointError, ConfigError

# (Hugging Face pattern, our pattern); "{i}" matches a layer index, the rest is literal.
_RENAMES = [
    ("vision_model.embeddings.class_embedding", "vision.trunk.cls_token"),
    ("vision_model.embeddings.position_embedding", "vision.trunk.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "vision.trunk.patch_embed.proj."),
    ("vision_model.encoder.layers.{i}.layer_norm1.", "vision.trunk.blocks.{i}.norm1."),
    ("vision_model.encoder.layers.{i}.layer_norm2.", "vision.trunk.blocks.{i}.norm2."),
    ("vision_model.encoder.layers.{i}.self_attn.qkv.weight", "vision.trunk.blocks.{i}.attn.qkv.weight"),
    ("vision_model.encoder.layers.{i}.self_attn.projection.", "vision.trunk.blocks.{i}.attn.proj."),
    ("vision_model.encoder.layers.{i}.mlp.", "vision.trunk.blocks.{i}.mlp."),
    ("vision_model.post_layernorm.", "vision.ln_vision."),
    ("query_tokens", "query_tokens"),
    ("qformer.embeddings.layernorm.", "qformer.embeddings.layer_norm."),
    ("qformer.embeddings.", "qformer.embeddings."),
    ("qformer.encoder.layer.{i}.attention.attention.", "qformer.layers.{i}.self_attention."),
    ("qformer.encoder.layer.{i}.attention.output.dense.", "qformer.layers.{i}.self_attention.out_proj."),
    ("qformer.encoder.layer.{i}.attention.output.LayerNorm.", "qformer.layers.{i}.self_attention.layer_norm."),
    ("qformer.encoder.layer.{i}.crossattention.attention.", "qformer.layers.{i}.cross_attention."),
    ("qformer.encoder.layer.{i}.crossattention.output.dense.", "qformer.layers.{i}.cross_attention.out_proj."),
    ("qformer.encoder.layer.{i}.crossattention.output.LayerNorm.", "qformer.layers.{i}.cross_attention.layer_norm."),
    ("qformer.encoder.layer.{i}.intermediate_query.dense.", "qformer.layers.{i}.query_ffn.fc_in."),
    ("qformer.encoder.layer.{i}.output_query.dense.", "qformer.layers.{i}.query_ffn.fc_out."),
    ("qformer.encoder.layer.{i}.output_query.LayerNorm.", "qformer.layers.{i}.query_ffn.layer_norm."),
    ("qformer.encoder.layer.{i}.intermediate.dense.", "qformer.layers.{i}.text_ffn.fc_in."),
    ("qformer.encoder.layer.{i}.output.dense.", "qformer.layers.{i}.text_ffn.fc_out."),
    ("qformer.encoder.layer.{i}.output.LayerNorm.", "qformer.layers.{i}.text_ffn.layer_norm."),
    ("language_projection.", "projection."),
    ("language_model.", "llm.hf_model."),
]
# Buffers some writers store that the model recomputes (safe to drop on load).
_IGNORED = re.compile(r"(^qformer\.embeddings\.position_ids$|rotary_emb\.inv_freq$)")
_QKV_BIAS = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")
_QV_BIAS = re.compile(r"^vision\.trunk\.blocks\.(\d+)\.attn\.(q|v)_bias$")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))


# Longest pattern first, so that a specific rule (``...self_attention.out_proj.``) wins over a general one.
_HF_TO_OURS = [(_compile(hf), ours) for hf, ours in sorted(_RENAMES, key=lambda r: -len(r[0]))]
_OURS_TO_HF = [(_compile(ours), hf) for hf, ours in sorted(_RENAMES, key=lambda r: -len(r[1]))]


def _rename(key: str, table) -> str | None:
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            replacement = target.replace("{i}", match.group(1)) if match.groups() else target
            return replacement + key[match.end():]
    return None


def hf_to_ours(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a transformers InstructBLIP state dict to ours; the fused vision qkv bias becomes q_bias/v_bias."""
    ours = {}
    for key, tensor in state_dict.items():
        if _IGNORED.search(key):
            continue
        qkv = _QKV_BIAS.match(key)
        if qkv:
            q_bias, k_bias, v_bias = tensor.chunk(3)
            if torch.count_nonzero(k_bias):
                raise CheckpointError(
                    f"{source}: {key} has a non-zero k third; the EVA vision attention keeps the k bias at zero"
                )
            block = f"vision.trunk.blocks.{qkv.group(1)}.attn."
            ours[block + "q_bias"], ours[block + "v_bias"] = q_bias, v_bias
            continue
        renamed = _rename(key, _HF_TO_OURS)
        if renamed is None:
            raise CheckpointError(f"{source}: unexpected weight {key!r} (not part of an InstructBLIP checkpoint)")
        ours[renamed] = tensor
    return ours


def ours_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_to_ours`` (q_bias/v_bias fused back with a zero k third)."""
    hf, biases = {}, {}
    for key, tensor in state_dict.items():
        qv = _QV_BIAS.match(key)
        if qv:
            biases.setdefault(qv.group(1), {})[qv.group(2)] = tensor
            continue
        renamed = _rename(key, _OURS_TO_HF)
        if renamed is None:
            raise CheckpointError(f"no Hugging Face name for weight {key!r}")
        hf[renamed] = tensor
    for block, qv in biases.items():
        hf[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [qv["q"], torch.zeros_like(qv["q"]), qv["v"]]
        )
    return hf


# ---------------------------------------------------------------------------------------------------- reading


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All weights of a directory: single/sharded safetensors, or the legacy single/sharded pytorch_model.bin."""
    from safetensors.torch import load_file

    def load(name: str) -> dict[str, torch.Tensor]:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory}: the index names {name}, which is missing")
        try:
            if name.endswith(".safetensors"):
                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # safetensors/pickle errors have no common base class
            raise CheckpointError(f"cannot read {file}: {str(err).splitlines()[0] if str(err) else err!r}") from err

    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (directory / single).is_file():
            return load(single)
        if (directory / index).is_file():
            weight_map = _read_json(directory / index).get("weight_map", {})
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load(shard))
            return state
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def config_from_hf(hf_config: dict, source: str = "config.json", **overrides):
    """Our ``InstructBlipConfig`` from a transformers InstructBLIP ``config.json`` dict (defaults filled in by
    transformers' own config classes)."""
    from transformers import InstructBlipConfig as HFConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from instructblip.model.instructblip import InstructBlipConfig
    from instructblip.model.qformer import QFormerConfig
    from instructblip.model.vision import VisionConfig

    text = hf_config.get("text_config") or {}
    model_type = text.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{source}: text_config.model_type={model_type!r} is not an architecture transformers knows "
            "(InstructBLIP uses 'llama' or 't5')"
        )
    try:
        hf = HFConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "transformers_version")})
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{source}: not an InstructBLIP config: {err}") from err
    vision, qformer = hf.vision_config, hf.qformer_config
    if not getattr(vision, "qkv_bias", True):
        raise CheckpointError(f"{source}: vision_config.qkv_bias=false is not the EVA ViT this loader maps")
    values = dict(
        vision=VisionConfig(
            backbone="eva",
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.hidden_size,
            layers=vision.num_hidden_layers,
            heads=vision.num_attention_heads,
            mlp_dim=vision.intermediate_size,
            layer_norm_eps=vision.layer_norm_eps,
            # LAVIS-converted checkpoints record LAVIS' ln_vision eps (1e-5) here; transformers' is layer_norm_eps.
            ln_vision_eps=getattr(vision, "ln_vision_eps", vision.layer_norm_eps),
        ),
        qformer=QFormerConfig(
            hidden_size=qformer.hidden_size,
            num_layers=qformer.num_hidden_layers,
            num_heads=qformer.num_attention_heads,
            intermediate_size=qformer.intermediate_size,
            cross_attention_frequency=qformer.cross_attention_frequency,
            vocab_size=qformer.vocab_size,
            max_position_embeddings=qformer.max_position_embeddings,
            layer_norm_eps=qformer.layer_norm_eps,
            dropout=qformer.hidden_dropout_prob,
            attention_dropout=qformer.attention_probs_dropout_prob,
        ),
        llm=hf.text_config.to_dict(),
        num_query_tokens=hf.num_query_tokens,
        image_token_id=getattr(hf, "image_token_index", None),
    )
    values.update(overrides)
    return InstructBlipConfig(**values)


def config_to_hf(model):
    """transformers' ``InstructBlipConfig`` describing ``model`` (raises when the layout cannot hold it)."""
    from transformers import InstructBlipConfig as HFConfig

    config = model.config
    if config.vision.backbone != "eva":
        raise CheckpointError(
            f"the Hugging Face InstructBLIP layout holds only the EVA ViT, not vision.backbone={config.vision.backbone!r}"
        )
    if not config.instruction_aware:
        raise CheckpointError(
            "the Hugging Face InstructBLIP layout always feeds the instruction to the Q-Former; a model with "
            "instruction_aware=False cannot be exported to it (save its state_dict instead)"
        )
    if config.vision.ln_vision_eps != config.vision.layer_norm_eps:
        warnings.warn(
            f"transformers uses vision layer_norm_eps={config.vision.layer_norm_eps} for post_layernorm too; "
            f"this model's ln_vision eps {config.vision.ln_vision_eps} is not kept by the export",
            stacklevel=3,
        )
    vision, qformer = config.vision, config.qformer
    image_token_id = config.image_token_id
    if image_token_id is None and model.processor is not None:
        image_token_id = model.processor.image_token_id
    return HFConfig(
        vision_config=dict(
            hidden_size=vision.width,
            intermediate_size=vision.mlp_dim,
            num_hidden_layers=vision.layers,
            num_attention_heads=vision.heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            layer_norm_eps=vision.layer_norm_eps,
            qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=qformer.hidden_size,
            num_hidden_layers=qformer.num_layers,
            num_attention_heads=qformer.num_heads,
            intermediate_size=qformer.intermediate_size,
            cross_attention_frequency=qformer.cross_attention_frequency,
            vocab_size=qformer.vocab_size,
            max_position_embeddings=qformer.max_position_embeddings,
            layer_norm_eps=qformer.layer_norm_eps,
            hidden_dropout_prob=qformer.dropout,
            attention_probs_dropout_prob=qformer.attention_dropout,
            encoder_hidden_size=vision.width,
        ),
        text_config=model.llm.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_token_index=image_token_id,
    )


# ---------------------------------------------------------------------------------------------------- loading


def _embedding_rows(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        if key in state:
            return key, state[key].shape[0]
    return None


def _check_vocab(directory: Path, hf_config: dict, state: dict[str, torch.Tensor]) -> None:
    """The vocab sizes config.json states must match the embedding tables the weights hold."""
    checks = [
        ("text_config", ("language_model.model.embed_tokens.weight", "language_model.shared.weight")),
        ("qformer_config", ("qformer.embeddings.word_embeddings.weight",)),
    ]
    for section, keys in checks:
        found = _embedding_rows(state, keys)
        stated = (hf_config.get(section) or {}).get("vocab_size")
        if found and stated is not None and stated != found[1]:
            raise CheckpointError(
                f"{directory / 'config.json'}: {section}.vocab_size={stated} but {found[0]} has {found[1]} rows"
            )


def load_hf_checkpoint(directory: str | Path, device: str | torch.device | None = None, **overrides):
    """``InstructBlip`` from a Hugging Face InstructBLIP directory, processor attached when its files are there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    hf_config = _read_json(directory / "config.json")
    state = read_state_dict(directory)
    _check_vocab(directory, hf_config, state)
    processor = _load_processor(directory)
    return build_from_hf(hf_config, state, processor, str(directory), device=device, **overrides)


def build_from_hf(
    hf_config: dict,
    state: dict[str, torch.Tensor],
    processor=None,
    source: str = "checkpoint",
    device: str | torch.device | None = None,
    ln_vision_eps: float | None = None,
    language_model=None,
    **overrides,
):
    """``InstructBlip`` from a transformers config dict + state dict with Hugging Face names (+ our processor).

    ``ln_vision_eps`` replaces the eps transformers uses for ``post_layernorm`` (LAVIS' own ``ln_vision`` has 1e-5).
    ``language_model``: an already built transformers LLM to use as it is (its weights shared, not copied; the
    state's ``language_model.*`` entries are then not needed): the benchmarks build both implementations around one
    7B LLM this way instead of materialising a second copy.

    The LLM is built by transformers' own ``from_pretrained`` (no random init, real rotary buffers); the rest on
    the meta device and filled with ``load_state_dict(assign=True)``.
    """
    from transformers.utils import logging as hf_logging

    from instructblip.model.instructblip import InstructBlip
    from instructblip.model.language import LanguageModel, llm_class, text_config_from_dict

    # The vocabulary is whatever the weights hold (the hub's vicuna config once said 32001 for 32064 rows).
    text_rows = _embedding_rows(state, ("language_model.model.embed_tokens.weight", "language_model.shared.weight"))
    if text_rows is not None:
        hf_config = {**hf_config, "text_config": {**hf_config.get("text_config", {}), "vocab_size": text_rows[1]}}
    try:
        config = config_from_hf(hf_config, source=f"{source}/config.json", **overrides)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err
    if ln_vision_eps is not None:
        config = replace(config, vision=replace(config.vision, ln_vision_eps=ln_vision_eps))

    ours = hf_to_ours(state, source=source)
    llm_state = {k[len("llm.hf_model."):]: v for k, v in ours.items() if k.startswith("llm.hf_model.")}
    rest = {k: v for k, v in ours.items() if not k.startswith("llm.hf_model.")}
    if not config.instruction_aware:  # the ablation has no text branch: the checkpoint's one is not used
        rest = {k: v for k, v in rest.items() if not _is_text_branch(k)}

    if language_model is not None:
        hf_model = language_model
    else:
        llm_config = text_config_from_dict(config.llm)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # no "weights not initialised" chatter for the LLM half of the file
        try:
            hf_model = llm_class(llm_config).from_pretrained(
                None, config=llm_config, state_dict=llm_state, dtype=torch.float32
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    with torch.device("meta"):
        model = InstructBlip(config, language_model=LanguageModel(config.llm, hf_model=hf_model))
    result = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith("llm.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: weights do not fit the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    _materialise_buffers(model)
    model.apply_freezing()
    model.eval()
    if processor is not None:
        _check_tokenizers(processor, model, source)
    model.processor = processor
    model.place(device)
    return model


def _is_text_branch(key: str) -> bool:
    return ".text_ffn." in key or key.startswith(("qformer.embeddings.word_", "qformer.embeddings.position_"))


def _materialise_buffers(model) -> None:
    """Non-persistent buffers built on the meta device (timm's fixed zero k bias) get their real values."""
    for name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if buffer_name == "k_bias":
                    setattr(module, buffer_name, torch.zeros(buffer.shape, dtype=buffer.dtype))
                else:
                    raise CheckpointError(f"buffer {name}.{buffer_name} was not initialised")


def _load_processor(directory: Path):
    """The project's processor when the directory has the tokenizer files (``qformer_tokenizer/``), else None."""
    if not (directory / "qformer_tokenizer").is_dir():
        return None
    from instructblip.processing import InstructBlipProcessor

    return InstructBlipProcessor.from_pretrained(directory)


def _check_tokenizers(processor, model, source: str) -> None:
    """Every token id the tokenizers can produce must have an embedding row."""
    checks = [("LLM tokenizer", len(processor.tokenizer), model.llm.vocab_size, "language model embeddings")]
    if model.config.instruction_aware:
        checks.append(
            ("qformer_tokenizer", len(processor.qformer_tokenizer), model.config.qformer.vocab_size, "Q-Former embeddings")
        )
    for name, tokens, rows, what in checks:
        if tokens > rows:
            raise CheckpointError(f"{source}: the {name} has {tokens} tokens but the {what} have only {rows} rows")


# ---------------------------------------------------------------------------------------------------- writing

_LLM_VOCAB_KEYS = ("language_model.model.embed_tokens.weight", "language_model.shared.weight", "language_model.lm_head.weight")


def _make_room_for_image_token(state: dict[str, torch.Tensor], hf_config) -> None:
    """transformers scatters the queries into ``<image>`` positions, so that id needs an embedding row: when the
    LLM vocabulary ends before it (a model trained with a tokenizer that never had ``<image>``), the exported
    embedding and output matrices grow, to a multiple of 64 as on the hub, with rows equal to the mean row."""
    image_token_id = hf_config.image_token_index
    rows = _embedding_rows(state, _LLM_VOCAB_KEYS)
    if image_token_id is None or rows is None or image_token_id < rows[1]:
        return
    new_rows = (image_token_id + 1 + 63) // 64 * 64
    for key in _LLM_VOCAB_KEYS:
        if key in state:
            weight = state[key]
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            state[key] = torch.cat([weight, mean.expand(new_rows - weight.shape[0], -1)])
    hf_config.text_config.vocab_size = new_rows



def save_hf_checkpoint(model, directory: str | Path, max_shard_size: int = 5 * 1024**3) -> None:
    """Write ``model`` in the layout ``transformers.InstructBlipForConditionalGeneration.from_pretrained`` loads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model)
    state = ours_to_hf(model.state_dict())
    # Tied tensors (T5's shared/encoder/decoder embeddings) are written once; transformers re-ties them.
    seen, unique = set(), {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        unique[key] = tensor.detach().to("cpu").contiguous()
    _make_room_for_image_token(unique, hf_config)
    shards, current, size = [], {}, 0
    for key, tensor in unique.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in unique.values())},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_config.architectures = ["InstructBlipForConditionalGeneration"]
    hf_config.save_pretrained(str(directory))
    if model.processor is not None:
        model.processor.save_pretrained(directory)
