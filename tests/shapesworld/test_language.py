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
    for i, (doc, (row, answer_start, _)) in enumerate(zip(docs[:4], rows[:4])):
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
    for row, start, _ in rows:
        ids = torch.tensor(row)
        logits = model.table[ids[:-1]]
        targets = ids[1:]
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        means.append(per_token[start - 1:].mean())
    assert torch.allclose(loss, torch.stack(means).mean(), atol=1e-5)
    # documents of very different answer lengths: a token mean would differ
    lengths = [len(row) - start for row, start, _ in rows]
    assert len(set(lengths)) > 1


def test_curriculum_batches_draw_each_phase_from_its_rows_sorted_by_length():
    from instructblip.shapesworld.language import CurriculumBatches

    lengths = [(7 * i) % 23 for i in range(40)]
    first = list(range(16))
    batches = list(CurriculumBatches(lengths, [(5, first), (6, list(range(40)))], batch_size=4, window=3, seed=0))
    assert len(batches) == 11 and all(len(b) == 4 for b in batches)
    assert all(set(b) <= set(first) for b in batches[:5])
    assert set().union(*batches[5:]) - set(first), "the main phase draws from every row"
    # the first window of the main phase: 3 batches cut from one length-sorted run of 12 rows
    window = sorted(batches[5:8], key=lambda b: min(lengths[i] for i in b))
    for low, high in zip(window, window[1:]):
        assert max(lengths[i] for i in low) <= min(lengths[i] for i in high)
    # a window (3 batches) comes from one pass through the phase's rows: no row twice
    assert len(set().union(*batches[:3])) == 12


def test_question_kinds_ask_that_sort_of_question():
    import random

    from instructblip.shapesworld import tasks, world

    starts = {"color": "what color", "shape": "what shape", "size": "what size", "where": "where is",
              "exists": "is there"}
    rng = random.Random(0)
    for _ in range(30):
        scene = world.sample_scene(rng)
        for kind, start in starts.items():
            asked = tasks.attribute_question(rng, scene, kind)
            if kind in ("size", "where", "exists"):
                assert asked is not None
            if asked is not None:
                question, answer = asked
                assert question.startswith(start) and tasks.question_kind(question) == kind
                if kind == "color":
                    shape = question.split()[-1].rstrip("?")
                    assert answer == next(s.color for s in scene.shapes if s.kind == shape)
    docs = world_text.documents(12, seed=0, names=["shapesworld_vqa/where", "shapesworld_ocr_vqa"])
    assert all("where is" in d.instruction for d in docs[::2])
    assert all(d.answer in d.context for d in docs)


def test_curriculum_pools_name_datasets_or_focus_documents():
    import pytest

    from instructblip.shapesworld.language import _pool_rows

    named = {"": [None] * 24, "shapesworld_vqa/color": [None] * 5}
    assert _pool_rows(named, ["shapesworld_vqa/color"], 24) == list(range(24, 29))
    assert _pool_rows(named, ["shapesworld_caption"], 24) == [0, 12]
    with pytest.raises(ValueError, match="shapesworld_vqa/color"):
        _pool_rows(named, ["vqa"], 24)


def test_unmarked_words_drop_the_marker_only():
    marked = world_text.documents(24, seed=0, names=["shapesworld_ocr_vqa"])
    unmarked = world_text.documents(24, seed=0, names=["shapesworld_ocr_vqa"], unmarked_words=1.0)
    for a, b in zip(marked, unmarked):
        assert "word " in a.context and "word " not in b.context
        assert b.context == a.context.replace("word ", "") and b.answer in b.context


def test_question_kind_names_are_checked():
    import pytest

    with pytest.raises(ValueError, match="color, shape, size, where, exists"):
        world_text.documents(2, seed=0, names=["shapesworld_vqa/colour"])
    with pytest.raises(ValueError, match="shapesworld_vqa only"):
        world_text.documents(2, seed=0, names=["shapesworld_count/color"])


def test_pooled_contexts_stand_each_object_in_one_position_with_its_words_mean_embedding():
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructblip.shapesworld.language import pooled_context

    docs, tokenizer = _setup()
    docs = [d for d in docs if d.context.count(".") >= 2][:4]
    assert len(docs) == 4

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    for doc in docs:  # one tuple per sentence, holding that sentence's ids: the context's ids without the periods
        groups = pooled_context(tokenizer, doc.context)
        assert len(groups) == len([s for s in doc.context.split(".") if s.strip()])
        periods = {i for i in ids(doc.context) if tokenizer.convert_ids_to_tokens(i).strip("▁") == "."}
        assert periods and [t for g in groups for t in g] == [i for i in ids(doc.context) if i not in periods]

    pooled = [True, False, True, False]
    rows = encode_documents(tokenizer, docs, max_length=160, pooled=pooled)
    for doc, (row, start, _), is_pooled in zip(docs, rows, pooled):
        context_positions = len(pooled_context(tokenizer, doc.context)) if is_pooled else len(ids(doc.context))
        assert start == context_positions + 1 + len(ids(doc.instruction))
        assert all(isinstance(t, tuple) for t in row[:context_positions]) == is_pooled

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    module = CausalLMPretraining(model, tokenizer.pad_token_id, 1e-3, 1, 2)
    batch = module.collate(rows)
    assert "input_groups" in batch
    loss = module.document_loss(batch)
    table = model.get_input_embeddings().weight
    means = []
    for row, start, _ in rows:   # each row alone, its embeddings built by hand
        embeds = torch.stack([table[list(t)].mean(0) if isinstance(t, tuple) else table[t] for t in row])
        logits = model(inputs_embeds=embeds[None]).logits[0, :-1]
        targets = torch.tensor([t if isinstance(t, int) else -100 for t in row[1:]])
        means.append(torch.nn.functional.cross_entropy(logits[start - 1:], targets[start - 1:]))
    assert torch.allclose(loss, torch.stack(means).mean(), atol=1e-5)
    # without pooled rows the batch takes the ids path, which the pooled path reproduces for plain rows
    plain = module.collate([rows[1], rows[3]])
    assert "input_groups" not in plain
    assert torch.allclose(module.document_loss(plain), torch.stack([means[1], means[3]]).mean(), atol=1e-5)


def test_instruction_loss_adds_the_instructions_own_mean_at_its_weight():
    docs, tokenizer = _setup()
    rows = encode_documents(tokenizer, docs, max_length=160)[:3]
    vocab = len(tokenizer)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    model = lambda input_ids, attention_mask: type("Out", (), {"logits": table[input_ids]})()  # noqa: E731
    plain = CausalLMPretraining(model, tokenizer.pad_token_id, 1e-3, 1, 2)
    weighted = CausalLMPretraining(model, tokenizer.pad_token_id, 1e-3, 1, 2, bos_id=tokenizer.bos_token_id,
                                   instruction_loss=0.5)
    batch = weighted.collate(rows)
    expected = []
    for i, (doc, (row, start, _)) in enumerate(zip(docs, rows)):
        instruction = tokenizer(doc.instruction, add_special_tokens=False)["input_ids"]
        assert batch["instruction_labels"][i][batch["instruction_labels"][i] != -100].tolist() == instruction
        ids = torch.tensor(row)
        per_token = torch.nn.functional.cross_entropy(table[ids[:-1]], ids[1:], reduction="none")
        expected.append(per_token[start - 1:].mean() + 0.5 * per_token[start - 1 - len(instruction): start - 1].mean())
    assert torch.allclose(weighted.document_loss(batch), torch.stack(expected).mean(), atol=1e-5)
    assert "instruction_labels" not in plain.collate(rows)
    assert weighted.document_loss(batch) > plain.document_loss(plain.collate(rows))


def test_judged_documents_take_their_own_instruction_loss():
    docs, tokenizer = _setup()
    judged = [doc.judged for doc in docs]
    assert any(judged) and not all(judged)
    assert all(doc.answer in ("true", "false", "yes", "no") for doc in docs if doc.judged)
    assert all(doc.judged for doc in docs if doc.answer in ("true", "false"))
    rows = encode_documents(tokenizer, docs, max_length=160)
    assert [judged for _, _, judged in rows] == judged
    vocab = len(tokenizer)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    model = lambda input_ids, attention_mask: type("Out", (), {"logits": table[input_ids]})()  # noqa: E731
    module = CausalLMPretraining(model, tokenizer.pad_token_id, 1e-3, 1, 2, bos_id=tokenizer.bos_token_id,
                                 instruction_loss=0.5, statement_instruction_loss=0.0)
    batch = module.collate(rows)
    assert batch["instruction_weights"].tolist() == [0.0 if j else 0.5 for j in judged]
    expected = []
    for doc, (row, start, _) in zip(docs, rows):
        instruction = len(tokenizer(doc.instruction, add_special_tokens=False)["input_ids"])
        ids = torch.tensor(row)
        per_token = torch.nn.functional.cross_entropy(table[ids[:-1]], ids[1:], reduction="none")
        weight = 0.0 if doc.judged else 0.5
        expected.append(per_token[start - 1:].mean() + weight * per_token[start - 1 - instruction: start - 1].mean())
    assert torch.allclose(module.document_loss(batch), torch.stack(expected).mean(), atol=1e-5)
