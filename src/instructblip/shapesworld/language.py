"""Text-only pretraining of the tiny causal LM (a transformers LLaMA) on the world's text.

The LLM of InstructBLIP arrives pretrained and stays frozen; in the miniature it is pretrained here, on the
documents of :mod:`instructblip.shapesworld.text` laid out as ``<context> BOS <instruction> <answer> EOS`` (the
scene text where the visual queries will later stand), plus plain ``<context> BOS <caption> EOS`` documents for the
BLIP-2 stage-2 layout (queries, BOS, caption). The loss covers the answer (and EOS), as in the instruction
tuning of the LLMs InstructBLIP starts from, and optionally the instruction (see ``CausalLMPretraining``). Output:
a Hugging Face directory (``config.json``, safetensors, the tokenizer) that the InstructBLIP config's ``llm`` loads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from instructblip.data.length_grouping import length_grouped_batches
from instructblip.shapesworld import text as world_text
from instructblip.shapesworld.tokenizer import train_tokenizer


@dataclass
class LanguageConfig:
    out: str                      # directory written (Hugging Face layout)
    documents: int = 20000        # text documents generated
    tokenizer_vocab: int = 1024   # BPE target size (the world needs fewer; the trainer stops at what it finds)
    hidden_size: int = 256
    intermediate_size: int = 688
    layers: int = 4
    heads: int = 4
    max_length: int = 256
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    # more documents of some datasets (or "shapesworld_vqa/<kind>": one sort of question), beside the even spread
    focus_documents: dict[str, int] = field(default_factory=dict)
    # phases before the `steps` on every document, each {steps: N, pools: [names]}, drawing only from the documents
    # of those names: the lookups are learnt one or two at a time (in the full mixture from the start, a 2-layer LM
    # learns the one it meets most and stays near chance on the rest for thousands of steps)
    curriculum: list[dict] = field(default_factory=list)
    length_window: int = 8        # batches sorted by length together (1: random batches)
    unmarked_words: float = 0.0   # share of documents naming the written word without "word" (text.documents)
    shuffled_objects: float = 0.0  # share of documents listing the scene's objects in a random order (text.documents)
    pooled_contexts: float = 0.0  # share of documents whose scene text stands one object per position (pooled_context)
    focused_contexts: float = 0.0  # share of lookup documents whose scene text is what they ask about (text.documents)
    instruction_loss: float = 0.0  # weight of each document's mean loss on its instruction beside its answer's
    # the same weight for the documents judging where a shape lies (text.Document.judged; None: instruction_loss),
    # see CausalLMPretraining
    statement_instruction_loss: float | None = None


class _Sequences(Dataset):
    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class CurriculumBatches(Sampler):
    """The run's batches as lists of row indices: ``phases`` is ``[(steps, rows it draws from), ...]``. Each phase
    streams its rows in shuffled passes and cuts the stream into length-grouped batches (``window`` batches sorted
    by length together, :func:`instructblip.data.length_grouping.length_grouped_batches`), so that a batch pads to a
    length near its own rows' (the documents range from 10 to 160 tokens)."""

    def __init__(self, lengths: list[int], phases: list[tuple[int, list[int]]], batch_size: int, window: int,
                 seed: int):
        self.lengths, self.phases, self.batch_size, self.window, self.seed = lengths, phases, batch_size, window, seed

    def __len__(self):
        return sum(steps for steps, _ in self.phases)

    def __iter__(self):
        rng = random.Random(self.seed)
        for phase, (steps, rows) in enumerate(self.phases):
            stream: list[int] = []
            while len(stream) < steps * self.batch_size:
                stream += rng.sample(rows, len(rows))
            stream = stream[: steps * self.batch_size]
            batches = length_grouped_batches([self.lengths[i] for i in stream], self.batch_size,
                                             self.batch_size * self.window, seed=self.seed * 1000 + phase)
            for batch in batches:
                yield [stream[i] for i in batch]


def pooled_context(tokenizer, context: str) -> list[tuple[int, ...]]:
    """The scene text one object per position: each sentence ("large red circle top left") as the tuple of its
    token ids, which share one input position whose embedding is their mean (``CausalLMPretraining``).

    Why: InstructBLIP's LLM reads the scene from a few query embeddings, each free to carry several words at once. A
    real LLM reads such soft input because its pretraining made it robust; a 2-layer LM that has only ever read one
    word per position does not, and the Q-Former then has to find a code the LLM was never taught. Documents in
    this form teach it to read an object's words superposed in one position, the form a query can take."""
    return [tuple(tokenizer(sentence, add_special_tokens=False)["input_ids"])
            for sentence in context.split(".") if sentence.strip()]


def encode_documents(tokenizer, docs: list[world_text.Document], max_length: int,
                     pooled: list[bool] | None = None) -> list[tuple[list, int, bool]]:
    """``context BOS instruction answer EOS`` as ids, each part tokenized alone (as the processor does), with the
    position where the answer starts and whether the document is judged (``Document.judged``). Where ``pooled[i]``,
    document i's context is :func:`pooled_context`'s: its row holds a tuple of ids for each object, one position
    each."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    rows = []
    for index, doc in enumerate(docs):
        context = pooled_context(tokenizer, doc.context) if pooled and pooled[index] else ids(doc.context)
        prompt = context + [tokenizer.bos_token_id] + ids(doc.instruction)
        row = (prompt + ids(doc.answer) + [tokenizer.eos_token_id])
        cut = max(0, len(row) - max_length)
        rows.append((row[cut:], max(0, len(prompt) - cut), doc.judged))
    return rows


class CausalLMPretraining(L.LightningModule):
    """Next-token loss on the answer and EOS: the LLMs InstructBLIP starts from are instruction-tuned (Vicuna,
    FlanT5) and answer about what they are given; a loss on the random scene text itself would spend most of the
    budget on predicting the unpredictable and leave the model poor at reading its context.

    With ``instruction_loss`` > 0 (and ``bos_id``), the instruction after BOS is predicted too, at that weight: a
    question names objects of the scene before it ("what color is the circle?"), so predicting its words trains
    the same look-back into the context that answering needs, from tokens every document already computes.

    Rows marked judged (``(ids, answer_start, True)``, :func:`encode_documents`: a spatial statement or a side
    question, whose instruction
    names the side to be judged) take ``statement_instruction_loss`` instead. Their words are no question about the
    scene: predicting them teaches guessing the side word a true statement copies from the scene text, and with that
    loss the LM never learnt to judge one, while without it it did within 1500 steps (experiments/README.md,
    "Session 21")."""

    def __init__(self, model, pad_id: int, lr: float, warmup: int, steps: int, bos_id: int | None = None,
                 instruction_loss: float = 0.0, statement_instruction_loss: float | None = None):
        super().__init__()
        if (instruction_loss or statement_instruction_loss) and bos_id is None:
            raise ValueError("instruction_loss needs bos_id: the instruction is what follows BOS")
        self.model = model
        self.pad_id, self.lr, self.warmup, self.steps = pad_id, lr, warmup, steps
        self.bos_id, self.instruction_loss = bos_id, instruction_loss
        self.statement_instruction_loss = (instruction_loss if statement_instruction_loss is None
                                           else statement_instruction_loss)
        self.losses: list[float] = []

    def collate(self, rows: list[tuple[list, int, bool]]) -> dict[str, torch.Tensor]:
        """Padded ids, mask and labels; with pooled positions (tuples of ids) in the batch, also ``input_groups``
        (batch, length, ids per position) and its ``group_mask``."""
        width = max(len(r) for r, _, _ in rows)
        depth = max(len(t) if isinstance(t, tuple) else 1 for row, _, _ in rows for t in row)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        if depth > 1:
            groups = torch.full((len(rows), width, depth), self.pad_id, dtype=torch.long)
            group_mask = torch.zeros((len(rows), width, depth))
        for i, (row, answer_start, _) in enumerate(rows):
            if depth == 1:
                ids[i, : len(row)] = torch.tensor(row)
            else:
                for j, token in enumerate(row):
                    group = token if isinstance(token, tuple) else (token,)
                    groups[i, j, : len(group)] = torch.tensor(group)
                    group_mask[i, j, : len(group)] = 1
                ids[i, : len(row)] = groups[i, : len(row), 0]
            mask[i, : len(row)] = 1
            labels[i, answer_start: len(row)] = ids[i, answer_start: len(row)]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.instruction_loss or self.statement_instruction_loss:
            # after the last BOS before the answer, up to the answer (a document cut at max_length may have lost its
            # BOS: no labels then)
            position = torch.arange(width)
            answer_start = torch.tensor([start for _, start, _ in rows])[:, None]
            last_bos = torch.where((ids == self.bos_id) & (position < answer_start), position, -1).amax(1, keepdim=True)
            inside = (position > last_bos) & (position < answer_start) & (last_bos >= 0)
            batch["instruction_labels"] = torch.where(inside, ids, -100)
            batch["instruction_weights"] = torch.tensor([
                self.statement_instruction_loss if judged else self.instruction_loss for _, _, judged in rows])
        if depth > 1:
            batch.update(input_groups=groups, group_mask=group_mask)
        return batch

    def training_step(self, batch, batch_idx):
        loss = self.document_loss(batch)
        self.losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True)
        return loss

    def document_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over documents of each document's mean answer-token loss: a 25-token description and a one-word
        answer weigh the same (a token mean would give most of the gradient to the long answers, and the one-word
        lookups, which teach the model to read its context, would learn slowest)."""
        if "input_groups" in batch:  # each position's embedding: the mean of its ids' (one id: that id's)
            weights = batch["group_mask"].unsqueeze(-1)
            table = self.model.get_input_embeddings()
            inputs = {"inputs_embeds": (table(batch["input_groups"]) * weights).sum(2) / weights.sum(2).clamp(min=1)}
        else:
            inputs = {"input_ids": batch["input_ids"]}
        logits = self.model(**inputs, attention_mask=batch["attention_mask"]).logits[:, :-1].transpose(1, 2).float()

        def per_document(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            labels = labels[:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
            counted = (labels != -100).float()
            return (per_token * counted).sum(1) / counted.sum(1).clamp(min=1), counted.sum(1) > 0

        loss, labelled = per_document(batch["labels"])
        if "instruction_labels" in batch:
            loss = loss + batch["instruction_weights"] * per_document(batch["instruction_labels"])[0]
        return loss[labelled].mean()

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        schedule = get_cosine_schedule_with_warmup(optimizer, self.warmup, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _pool_rows(named: dict[str, list], pools: list[str], spread: int) -> list[int]:
    """Row indices of the documents a curriculum phase draws from: a focus name's own documents plus, for a dataset
    name, its share of the even spread (every ``len(TASKS)``-th document of the first ``spread``)."""
    from instructblip.shapesworld import tasks

    starts, start = {}, 0
    for name, group in named.items():
        starts[name] = start
        start += len(group)
    names = list(tasks.TASKS)
    rows = []
    for pool in pools:
        if pool in named and pool:
            rows += range(starts[pool], starts[pool] + len(named[pool]))
        if pool in names:
            rows += range(names.index(pool), spread, len(names))
        if pool not in named and pool not in names:
            raise ValueError(f"curriculum pool {pool!r}: not a ShapesWorld dataset nor a key of focus_documents "
                             f"({', '.join(k for k in named if k) or 'none'})")
    if not rows:
        raise ValueError(f"curriculum pools {pools} have no documents")
    return rows


def pretrain_language(cfg: LanguageConfig, progress: bool = True) -> Path:
    """Train the tokenizer, then the LM; write both to ``cfg.out``; returns that path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(cfg.out)
    L.seed_everything(cfg.seed, verbose=False)
    text_options = {"unmarked_words": cfg.unmarked_words, "shuffled_objects": cfg.shuffled_objects,
                    "focused_contexts": cfg.focused_contexts}
    named = {"": world_text.documents(cfg.documents, cfg.seed, **text_options)}
    for name, count in cfg.focus_documents.items():
        named[name] = world_text.documents(count, cfg.seed + 1, [name], **text_options)
    rng = random.Random(cfg.seed)
    # BLIP-2 stage 2 layout: scene, BOS, caption (no instruction)
    captions = [d for d in named[""] if d.answer and d.instruction and d.context and rng.random() < 0.08]
    named[""] = named[""] + [world_text.Document(d.context, "", d.answer) for d in captions]
    docs = [doc for group in named.values() for doc in group]
    tokenizer = train_tokenizer(world_text.tokenizer_corpus(docs), cfg.tokenizer_vocab)
    pooled_rng = random.Random(f"{cfg.seed}/pooled")  # its own stream: the documents stay those of a share of 0
    pooled = [bool(doc.context) and pooled_rng.random() < cfg.pooled_contexts for doc in docs]
    rows = encode_documents(tokenizer, docs, cfg.max_length, pooled)
    phases = [(phase["steps"], _pool_rows(named, phase["pools"], cfg.documents)) for phase in cfg.curriculum]
    phases.append((cfg.steps, list(range(len(rows)))))
    batches = CurriculumBatches([len(row) for row, _, _ in rows], phases, cfg.batch_size, cfg.length_window, cfg.seed)
    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_length + 64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    module = CausalLMPretraining(model, tokenizer.pad_token_id, cfg.lr, cfg.warmup, len(batches),
                                 bos_id=tokenizer.bos_token_id, instruction_loss=cfg.instruction_loss,
                                 statement_instruction_loss=cfg.statement_instruction_loss)
    loader = DataLoader(_Sequences(rows), batch_sampler=batches, collate_fn=module.collate)
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=1.0,
                        max_epochs=-1)
    trainer.fit(module, loader)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "losses.json").write_text(json.dumps(module.losses))
    return out
