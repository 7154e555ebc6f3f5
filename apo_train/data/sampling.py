"""Which rows each optimizer step trains on, and in what order they reach the micro-batches.

Padding is the cost here: a batch is padded to its longest row, and the demo's SFT rows range from a
60-token refusal to a 240-token verbose answer, so about half of a random batch of 16 is padding.
Sorting the rows of one optimizer step by length before they are cut into gradient-accumulation
micro-batches pads each short row only to its own micro-batch's longest. The step still trains on
the same random rows with the same gradient, because the SFT loss divides the summed token losses by
the whole step's token count (transformers' ``num_items_in_batch``), not by each micro-batch's; only
the padding goes. (That holds for a model whose forward takes loss kwargs, as transformers' VLMs and
LMs do; for any other the Trainer averages per micro-batch, and sorting then also changes the weights
of the rows, as accumulation without sorting already does.) Grouping rows by length *across* steps (transformers' ``group_by_length``) saves
more padding but changes what a step averages over: on the demo it made the SFT student fit its rows
worse (loss 0.28 against 0.14 in the same steps).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

__all__ = ["LengthSortedSteps", "sort_by_length"]


def sort_by_length(indices: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """``indices`` longest row first (ties keep their drawn order, so the result is deterministic)."""
    return sorted(indices, key=lambda i: -lengths[i])


class LengthSortedSteps(torch.utils.data.Sampler[int]):
    """Row indices in shuffled passes over the data, each ``step_rows`` consecutive indices (one
    optimizer step: per-device batch x accumulation steps x processes) sorted longest first.

    Every pass draws a new permutation from ``random.Random(seed)`` (the next pass continues that
    generator), so a run is reproducible from its seed. ``lengths``: each row's token count (the
    ``length`` column apo_train's tokenizers write)."""

    def __init__(self, lengths: Sequence[int], step_rows: int, seed: int) -> None:
        if step_rows < 1:
            raise ValueError(f"step_rows must be at least 1, not {step_rows}")
        self.lengths, self.step_rows = list(lengths), step_rows
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        self._rng.shuffle(order)
        for start in range(0, len(order), self.step_rows):
            yield from sort_by_length(order[start : start + self.step_rows], self.lengths)
