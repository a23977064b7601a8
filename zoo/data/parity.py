"""Running parity: after each bit, say whether the segment so far holds an odd number of ones.

    inputs   x_1 … x_T ∈ {0, 1}
    targets  y_t = x_s ⊕ x_{s+1} ⊕ … ⊕ x_t        (s = the start of t's segment)

One bit of state that flips on every 1 is all a recurrent model needs, yet no fixed window of the
input determines the answer, so a model without memory stays at 50% accuracy. Every position is
supervised, which gives a dense learning signal; the accuracy curve climbs from 0.5 to 1.0 once
the model has learnt to carry the bit.

With ``min_segment < length`` each row is several segments of random lengths packed end to end,
with ``reset`` marking where each starts: the model must also honour ``reset``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.data.task import Batch, batch_rng


@dataclasses.dataclass(frozen=True)
class RunningParity:
    """Running parity of random bit strings, ``batch_size`` rows of ``length`` bits per batch.

    Segments have lengths drawn uniformly from ``[min_segment, length]``; the default
    (``min_segment = length``) gives one segment per row.
    """

    length: int = 32
    batch_size: int = 32
    min_segment: int | None = None
    seed: int = 0

    name = "running_parity"
    vocab_size = 2
    n_classes = 2

    def __post_init__(self):
        if self.length <= 0 or self.batch_size <= 0:
            raise ValueError(
                f"running_parity: length and batch_size must be positive, got length={self.length}, "
                f"batch_size={self.batch_size}"
            )
        if self.min_segment is not None and not 1 <= self.min_segment <= self.length:
            raise ValueError(
                f"running_parity: min_segment must be in [1, length={self.length}], got {self.min_segment}"
            )

    def batch(self, step: int, split: str = "train") -> Batch:
        rng = batch_rng(self.seed, split, step)
        bits = rng.integers(0, 2, size=(self.batch_size, self.length), dtype=np.int32)
        reset = segment_starts(rng, self.batch_size, self.length, self.min_segment or self.length)
        return {
            "inputs": bits,
            "targets": segmented_parity(bits, reset),
            "mask": np.ones(bits.shape, bool),
            "reset": reset,
        }


def segment_starts(rng: np.random.Generator, batch: int, length: int, min_segment: int) -> np.ndarray:
    """bool [B, T]: True at t = 0 and wherever a new segment of length in [min_segment, T] starts."""
    reset = np.zeros((batch, length), bool)
    for row in reset:
        start = 0
        while start < length:
            row[start] = True
            start += int(rng.integers(min_segment, length + 1))
    return reset


def segmented_parity(bits: np.ndarray, reset: np.ndarray) -> np.ndarray:
    """int32 [B, T]: the XOR of ``bits`` from the latest segment start up to and including t.

    The running sum of bits minus its value just before the segment's start, taken mod 2.
    """
    ones_so_far = np.cumsum(bits, axis=-1)
    before = ones_so_far - bits
    # For each t, the count of ones before its segment start: carry forward the value at each start.
    start_index = np.maximum.accumulate(np.where(reset, np.arange(bits.shape[-1]), 0), axis=-1)
    before_segment = np.take_along_axis(before, start_index, axis=-1)
    return ((ones_so_far - before_segment) % 2).astype(np.int32)
