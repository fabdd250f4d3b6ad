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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from instructblip.data.length_grouping import pack_first_fit


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
    valid = attention_mask.bool()
    lengths = valid.sum(dim=1)
    positions = torch.arange(valid.shape[1], device=valid.device)
    if not torch.equal(valid, positions < lengths[:, None]):
        raise ValueError("packing needs right-padded rows: attention_mask must be ones followed by zeros")
    lengths_list = lengths.tolist()
    rows, capacity = row_layout(lengths_list, one_row)

    # Where each sample starts in the packed layout: its row and its offset within the row.
    row_of = [0] * len(lengths_list)
    offset_of = [0] * len(lengths_list)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            row_of[i], offset_of[i] = r, offset
            offset += lengths_list[i]
    device = inputs_embeds.device
    sample = torch.arange(valid.shape[0], device=device)[:, None].expand_as(valid)[valid]  # of each kept position
    position = positions.expand_as(valid)[valid]  # within its sample
    destination = (
        torch.tensor(row_of, device=device)[sample],
        torch.tensor(offset_of, device=device)[sample] + position,
    )

    packed_shape = (len(rows), capacity)
    embeds = inputs_embeds.new_zeros(*packed_shape, inputs_embeds.shape[-1])
    embeds[destination] = inputs_embeds[valid]
    sample_index = torch.full(packed_shape, -1, dtype=torch.long, device=device)
    sample_index[destination] = sample
    last_of_sample = positions == (lengths[:, None] - 1)
    packed_targets = targets.new_full(packed_shape, -100)
    packed_targets[destination] = targets.masked_fill(last_of_sample, -100)[valid]
    # Positions after the last sample of a row restart at 0 too: a sequence of their own, seen by no sample.
    free = sample_index < 0
    position_ids = torch.where(free, free.long().cumsum(dim=1) - 1, 0)
    position_ids[destination] = position
    return PackedRows(embeds, position_ids, packed_targets, sample_index)
