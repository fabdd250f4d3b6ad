"""Sequence packing for a decoder-only LLM's training forward: the padded batch's samples laid end to end.

A training batch holds rows ``[Q visual] BOS instruction answer EOS PAD...`` of very different lengths (a one-word
VQA answer beside a long conversation), so most of a padded batch can be padding. ``pack`` drops the padding and
places each sample, its own visual tokens before its own text, into rows as long as the batch's longest sample
(first-fit decreasing over the sample lengths). Inside a row, position ids restart at 0 at each sample, and the
model is called with ``position_ids`` and no attention mask: transformers then derives the sample boundaries from
the restarts (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask (sdpa,
eager), or runs flash attention's variable-length kernel (flash attention detects packing only in a single row:
``one_row=True`` puts every sample in one row). Each sample thus sees exactly what it sees in its padded row, with
the same rotary positions, so the per-sample losses are unchanged.

The positions after the last sample of a row are filled with zero embeddings whose position ids also start at 0,
so they form a sequence of their own that no sample attends to; they carry no target.

An encoder-decoder LLM (T5, FlanT5) is packed by ``pack_seq2seq``: each sample's encoder positions (its visual
tokens and instruction) and its decoder positions (its answer) go into the same row, of the encoder rows and of the
decoder rows, and three attention masks keep each sample to its own positions: the encoder's, the decoder's (causal)
and the decoder's cross-attention to the encoder. T5's relative position bias depends only on the distance between
two positions, which packing leaves unchanged within a sample, so no position ids are needed. The masks are additive
(0 or the dtype's lowest value): transformers' eager T5 attention would add a boolean mask's ones instead of masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from instructblip.data.length_grouping import pack_first_fit, pack_first_fit_pairs


@dataclass
class PackedRows:
    """``inputs_embeds`` (R, N, D), ``position_ids`` (R, N), ``targets`` (R, N): the next-token target of each
    position (-100 where there is none), ``sample_index`` (R, N): the batch row each position comes from (-1 after
    the last sample of a row)."""

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    sample_index: torch.Tensor


def row_layout(lengths: list[int], one_row: bool = False) -> tuple[list[list[int]], int]:
    """The packed rows (lists of sample indices, in row order) and the row length: rows as long as the longest
    sample, filled first-fit decreasing, or a single row holding every sample."""
    if one_row:
        return [list(range(len(lengths)))], sum(lengths)
    capacity = max(lengths)
    return pack_first_fit(lengths, capacity), capacity


def pack(
    inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, one_row: bool = False
) -> PackedRows:
    """Pack right-padded rows (``attention_mask`` ones then zeros) into rows as long as the longest sample, as few
    as first-fit decreasing finds (so no packed row is longer than a padded one, and attention with a materialised
    mask costs no more per row); ``one_row``: all samples in a single row (flash attention's variable-length path).

    ``targets`` (B, L) are per-position next-token targets of the padded layout (-100 = none); the last position
    of each sample gets none whatever they say, since its next position belongs to another sample.
    """
    valid = _right_padded(attention_mask, "attention_mask")
    lengths = valid.sum(dim=1)
    positions = torch.arange(valid.shape[1], device=valid.device)
    lengths_list = lengths.tolist()
    rows, capacity = row_layout(lengths_list, one_row)

    destination, sample, position = _destinations(valid, rows, lengths_list)

    packed_shape = (len(rows), capacity)
    embeds = inputs_embeds.new_zeros(*packed_shape, inputs_embeds.shape[-1])
    embeds[destination] = inputs_embeds[valid]
    sample_index = _sample_map(packed_shape, destination, sample)
    last_of_sample = positions == (lengths[:, None] - 1)
    packed_targets = targets.new_full(packed_shape, -100)
    packed_targets[destination] = targets.masked_fill(last_of_sample, -100)[valid]
    # Positions after the last sample of a row restart at 0 too: a sequence of their own, seen by no sample.
    free = sample_index < 0
    position_ids = torch.where(free, free.long().cumsum(dim=1) - 1, 0)
    position_ids[destination] = position
    return PackedRows(embeds, position_ids, packed_targets, sample_index)


@dataclass
class PackedSeq2Seq:
    """Encoder-decoder rows: ``inputs_embeds`` (R, Ne, D) for the encoder; ``decoder_input_ids``, ``labels`` and
    ``sample_index`` (R, Nd; -1 after the last sample of a row) for the decoder; and the additive attention masks
    (R, 1, queries, keys) that keep each sample to its own positions: ``encoder_mask`` (Ne x Ne), ``decoder_mask``
    (Nd x Nd, causal) and ``cross_mask`` (Nd x Ne)."""

    inputs_embeds: torch.Tensor
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    encoder_mask: torch.Tensor
    decoder_mask: torch.Tensor
    cross_mask: torch.Tensor


# Row lengths tried on each side of an encoder-decoder batch, in multiples of the side's longest sample: longer rows
# let many short answers share a row beside one long one, but a row's attention grows with its length squared.
ROW_LENGTH_MULTIPLES = (1, 2, 4)


def seq2seq_row_layout(encoder_lengths: list[int], decoder_lengths: list[int]) -> tuple[list[list[int]], int, int]:
    """The packed rows (lists of sample indices) and the encoder and decoder row lengths: of the row lengths 1, 2 or
    4 times the longest sample on each side (at most the side's total), the pair whose first-fit decreasing rows
    hold the fewest positions, rows x (encoder length + decoder length); on a tie, the shorter rows."""
    longest_encoder, longest_decoder = max(encoder_lengths), max(max(decoder_lengths), 1)
    best = None
    for encoder_multiple in ROW_LENGTH_MULTIPLES:
        for decoder_multiple in ROW_LENGTH_MULTIPLES:
            encoder_capacity = min(encoder_multiple * longest_encoder, sum(encoder_lengths))
            decoder_capacity = min(decoder_multiple * longest_decoder, max(sum(decoder_lengths), 1))
            rows = pack_first_fit_pairs(encoder_lengths, decoder_lengths, encoder_capacity, decoder_capacity)
            positions = len(rows) * (encoder_capacity + decoder_capacity)
            if best is None or positions < best[0]:
                best = (positions, rows, encoder_capacity, decoder_capacity)
    return best[1], best[2], best[3]


def pack_seq2seq(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    labels: torch.Tensor,
    decoder_attention_mask: torch.Tensor | None = None,
) -> PackedSeq2Seq:
    """Pack right-padded encoder rows (``inputs_embeds``, ``attention_mask``) and their decoder rows
    (``decoder_input_ids`` already shifted right within each row, ``labels`` with -100 on padding) into the rows of
    ``seq2seq_row_layout``. A sample's decoder length is its ``decoder_attention_mask``'s ones, or without one its
    positions up to its last label."""
    encoder_valid = _right_padded(attention_mask, "attention_mask")
    if decoder_attention_mask is not None:
        decoder_valid = _right_padded(decoder_attention_mask, "decoder_attention_mask")
    else:
        labelled = labels != -100
        last = torch.where(labelled, torch.arange(labels.shape[1], device=labels.device) + 1, 0).amax(dim=1)
        decoder_valid = torch.arange(labels.shape[1], device=labels.device) < last[:, None]
    encoder_lengths = encoder_valid.sum(dim=1).tolist()
    decoder_lengths = decoder_valid.sum(dim=1).tolist()
    rows, encoder_capacity, decoder_capacity = seq2seq_row_layout(encoder_lengths, decoder_lengths)

    encoder_at, encoder_from, _ = _destinations(encoder_valid, rows, encoder_lengths)
    decoder_at, decoder_from, _ = _destinations(decoder_valid, rows, decoder_lengths)

    embeds = inputs_embeds.new_zeros(len(rows), encoder_capacity, inputs_embeds.shape[-1])
    embeds[encoder_at] = inputs_embeds[encoder_valid]
    encoder_sample = _sample_map((len(rows), encoder_capacity), encoder_at, encoder_from)
    decoder_sample = _sample_map((len(rows), decoder_capacity), decoder_at, decoder_from)
    decoder_ids = decoder_input_ids.new_zeros(len(rows), decoder_capacity)
    decoder_ids[decoder_at] = decoder_input_ids[decoder_valid]
    packed_labels = labels.new_full((len(rows), decoder_capacity), -100)
    packed_labels[decoder_at] = labels[decoder_valid]
    return PackedSeq2Seq(embeds, decoder_ids, packed_labels, decoder_sample,
                         *seq2seq_masks(encoder_sample, decoder_sample, inputs_embeds.dtype))


def seq2seq_masks(
    encoder_sample: torch.Tensor, decoder_sample: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder's, the decoder's (causal) and the cross-attention's additive masks (R, 1, queries, keys) from the
    sample each packed position holds (-1: none). Positions after a row's last sample attend among themselves (a
    query that may attend to nothing would give NaN) and, on the decoder's side, to the whole encoder row; no
    sample attends to them."""
    def same(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return queries[:, :, None] == keys[:, None, :]

    positions = torch.arange(decoder_sample.shape[1], device=decoder_sample.device)
    causal = positions[:, None] >= positions[None, :]
    cross = same(decoder_sample, encoder_sample) | (decoder_sample < 0)[:, :, None]
    return (_additive(same(encoder_sample, encoder_sample), dtype),
            _additive(same(decoder_sample, decoder_sample) & causal, dtype),
            _additive(cross, dtype))


def _right_padded(mask: torch.Tensor, name: str) -> torch.Tensor:
    valid = mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device)
    if not torch.equal(valid, positions < valid.sum(dim=1, keepdim=True)):
        raise ValueError(f"packing needs right-padded rows: {name} must be ones followed by zeros")
    return valid


def _destinations(valid: torch.Tensor, rows: list[list[int]], lengths: list[int]):
    """For each kept position of the padded ``valid`` layout: its (row, column) in the packed layout, where the
    samples of each of ``rows`` lie end to end in its order, ``lengths`` long; its batch row; its position within
    its sample."""
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            row_of[i], offset_of[i] = r, offset
            offset += lengths[i]
    sample = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
    position = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)[valid]
    destination = (torch.tensor(row_of, device=valid.device)[sample],
                   torch.tensor(offset_of, device=valid.device)[sample] + position)
    return destination, sample, position


def _sample_map(shape: tuple[int, int], destination, sample: torch.Tensor) -> torch.Tensor:
    """The batch row each packed position comes from (``sample`` at ``destination``), -1 where none does."""
    sample_index = torch.full(shape, -1, dtype=torch.long, device=sample.device)
    sample_index[destination] = sample
    return sample_index


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, queries, keys): 0 where attention is allowed, the dtype's lowest value elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
