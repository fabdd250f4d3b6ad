"""Less padding in mixed-length batches: padding statistics, length-grouped batches and a packing bound.

The instruction mixture puts one-word VQA answers beside LLaVA answers of a hundred words and more. A right-padded
batch is as long as its longest row, so a random batch that draws one LLaVA sample pads every other row to it and the
LLM computes mostly padding. Two remedies:

* length-grouped batching (:func:`length_grouped_batches`, :class:`LengthGroupedBatchSampler`): within a window of
  consecutive samples, sort by length and cut the sorted run into batches, then shuffle the batches of the window
  (seeded), so similar lengths share a batch while the order of the stream stays random at the window's scale.
  Nothing changes in the model; every sample is still seen exactly once, only its batch changes.
* sequence packing (:func:`pack_first_fit`): several samples share one row up to a token capacity. It removes
  nearly all padding but needs attention that keeps the packed samples apart (variable-length attention, with
  each sample's visual tokens placed before its own text); ``pack_first_fit`` measures what it would save.

:func:`padding_stats` reports tokens of padding per useful token for any batching. A "useful" token is a non-padding
position of the LLM input ``[visual; text]``: the visual tokens count as useful, they are computed for every sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import Sampler


def padding_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]], row_capacity: int | None = None) -> dict:
    """Padding of ``batches`` (lists of positions into ``lengths``), each right-padded to its longest row.

    With ``row_capacity`` every batch is one packed row of that many tokens instead (``pack_first_fit``).
    """
    useful = padded = 0
    for batch in batches:
        rows = [lengths[i] for i in batch]
        useful += sum(rows)
        padded += row_capacity if row_capacity is not None else max(rows) * len(rows)
    return dict(
        useful_tokens=useful,
        padding_tokens=padded - useful,
        padding_per_useful_token=(padded - useful) / useful if useful else 0.0,
    )


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, window: int, seed: int = 0
) -> list[list[int]]:
    """Batches of positions into ``lengths``: sorted by length inside windows of ``window`` samples (a multiple of
    ``batch_size``), batches shuffled within their window. Deterministic in ``seed``; every position once."""
    if batch_size < 1 or window < batch_size or window % batch_size:
        raise ValueError(f"window={window} must be a positive multiple of batch_size={batch_size}")
    batches: list[list[int]] = []
    for start in range(0, len(lengths), window):
        positions = range(start, min(start + window, len(lengths)))
        ordered = sorted(positions, key=lambda i: (lengths[i], i))
        group = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        random.Random(f"length-grouping-{seed}-{start}").shuffle(group)
        batches.extend(group)
    return batches


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of positions whose lengths sum to at most ``capacity`` (first-fit decreasing); longer samples get a
    row of their own (they would be truncated to ``capacity`` by the processor)."""
    return pack_first_fit_pairs(lengths, [0] * len(lengths), capacity, 0)


def pack_first_fit_pairs(
    first: Sequence[int], second: Sequence[int], first_capacity: int, second_capacity: int
) -> list[list[int]]:
    """Rows of samples with two lengths each (an encoder-decoder sample's encoder and decoder positions) whose sums
    fit both capacities, first-fit decreasing by the two lengths together; a sample longer than a capacity counts as
    that long (it would have been truncated to it)."""
    rows: list[list[int]] = []
    room: list[list[int]] = []
    for i in sorted(range(len(first)), key=lambda i: -(first[i] + second[i])):
        need = (min(first[i], first_capacity), min(second[i], second_capacity))
        for r, (left_first, left_second) in enumerate(room):
            if need[0] <= left_first and need[1] <= left_second:
                rows[r].append(i)
                room[r] = [left_first - need[0], left_second - need[1]]
                break
        else:
            rows.append([i])
            room.append([first_capacity - need[0], second_capacity - need[1]])
    return rows


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """The training sampler's layout (micro-batch ``b`` of rank ``r`` is micro-batch ``m = b * world_size + r`` of
    the global stream, which holds the global sample indices ``[m * batch_size, (m + 1) * batch_size)``) with the
    indices of each window of ``window_batches`` consecutive micro-batches of that stream regrouped by
    ``length_of(g)``.

    The window is counted in micro-batches of the global stream, not per rank, so the grouping does not depend on
    the world size: one process accumulating ``world_size`` micro-batches per step sees exactly the batches that
    the ranks see together. The regrouping is a pure function of the window (``length_of`` must be a pure function
    of ``g``, e.g. the text length of the sample the mixture draws for ``g``), so every rank computes the same
    grouping and a run resumed at micro-batch ``start`` sees the batches it would have seen. The last window stops
    at the end of the run (``start + num_batches`` micro-batches per rank), so every index of the run is used once.
    """

    def __init__(
        self,
        batch_size: int,
        rank: int,
        world_size: int,
        start: int,
        num_batches: int,
        length_of: Callable[[int], int],
        window_batches: int = 64,
        seed: int = 0,
    ):
        if window_batches < 1:
            raise ValueError(f"window_batches={window_batches} must be >= 1")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start, self.num_batches = start, num_batches
        self.length_of, self.window_batches, self.seed = length_of, window_batches, seed

    def __len__(self) -> int:
        # The whole epoch, the batches already consumed included (as GlobalBatchSampler: Lightning counts a resumed
        # run's progress as already fetched).
        return self.start + self.num_batches

    def _window(self, window_index: int) -> list[list[int]]:
        """The window's micro-batches in the order of the global stream."""
        end_of_run = (self.start + self.num_batches) * self.world_size  # micro-batches of the global stream
        first_batch = window_index * self.window_batches
        count = min(self.window_batches, end_of_run - first_batch)
        first = first_batch * self.batch_size
        lengths = [self.length_of(g) for g in range(first, first + count * self.batch_size)]
        grouped = length_grouped_batches(lengths, self.batch_size, len(lengths), seed=self.seed + window_index)
        return [[first + i for i in batch] for batch in grouped]

    def __iter__(self) -> Iterator[list[int]]:
        cached: tuple[int, list[list[int]]] | None = None
        for b in range(self.start, self.start + self.num_batches):
            window_index, offset = divmod(b * self.world_size + self.rank, self.window_batches)
            if cached is None or cached[0] != window_index:
                cached = (window_index, self._window(window_index))
            yield cached[1][offset]
