"""The tiny LLM's text pretraining: the loss is on the answer only, and every document weighs the same."""

from __future__ import annotations

import torch

from instructblip.shapesworld import text as world_text
from instructblip.shapesworld.language import CausalLMPretraining, encode_documents
from instructblip.shapesworld.tokenizer import train_tokenizer


def _setup():
    docs = world_text.documents(24, seed=0)
    tokenizer = train_tokenizer(world_text.tokenizer_corpus(docs), 256)
    return docs, tokenizer


def test_labels_cover_the_answer_and_eos_only():
    docs, tokenizer = _setup()
    rows = encode_documents(tokenizer, docs, max_length=160)
    module = CausalLMPretraining(torch.nn.Identity(), tokenizer.pad_token_id, 1e-3, 1, 2)
    batch = module.collate(rows[:4])
    for i, (doc, (row, answer_start)) in enumerate(zip(docs[:4], rows[:4])):
        answer = tokenizer(doc.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled == answer, (doc, labelled)
        assert row[answer_start - 1 - len(tokenizer(doc.instruction, add_special_tokens=False)["input_ids"])] \
            == tokenizer.bos_token_id


def test_the_loss_is_the_mean_of_per_document_means():
    docs, tokenizer = _setup()
    rows = encode_documents(tokenizer, docs, max_length=160)[:3]
    vocab = len(tokenizer)

    class Fixed(torch.nn.Module):   # logits depend on the input ids only: the loss can be recomputed by hand
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.table[input_ids]})()

    model = Fixed()
    module = CausalLMPretraining(model, tokenizer.pad_token_id, 1e-3, 1, 2)
    loss = module.document_loss(module.collate(rows))
    means = []
    for row, start in rows:
        ids = torch.tensor(row)
        logits = model.table[ids[:-1]]
        targets = ids[1:]
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        means.append(per_token[start - 1:].mean())
    assert torch.allclose(loss, torch.stack(means).mean(), atol=1e-5)
    # documents of very different answer lengths: a token mean would differ
    lengths = [len(row) - start for row, start in rows]
    assert len(set(lengths)) > 1
