"""The padding benchmark's encoder-decoder figures (experiments/bench/padding.py): a T5 batch's positions padded on
both sides, and as ``pack_sequences`` packs them."""

from __future__ import annotations

from instructblip.testing import import_script


def test_encoder_decoder_padding_counts_both_sides():
    padding = import_script("experiments/bench", "padding")
    # two samples, instructions of 10 tokens, answers of 100 and 2: encoder 32 + 10 + </s> = 43 each, decoder 101
    # and 3. Padded: 2 x (43 + 101) = 288 positions for 190 useful; packed: one row of 86 + 104, no padding at all
    stats = padding.encoder_decoder_stats([(10, 100), (10, 2)], [[0, 1]])
    assert stats["useful_tokens"] == 190
    assert stats["random"]["padding_tokens"] == 98
    assert stats["model_packing"]["padding_tokens"] == 0
    assert stats["random"]["padding_per_useful_token"] == 98 / 190
