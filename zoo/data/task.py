"""What every task gives the training loop: a deterministic stream of numpy batches.

A batch is a dict of numpy arrays, all with leading axes [B, T]:

* ``inputs``  int32 [B, T]: tokens in ``[0, vocab_size)``.
* ``targets`` int32 [B, T]: classes in ``[0, n_classes)``.
* ``mask``    bool  [B, T]: which targets count in the loss and the metrics.
* ``reset``   bool  [B, T]: True where a new segment starts (the model's state is discarded there),
  so several segments can be packed into one row with static shapes.

``task.batch(step, split)`` is a pure function of ``(task config, split, step)``. A run resumed
from a checkpoint at step ``s`` therefore sees exactly the batches an uninterrupted run would have
seen from ``s`` on, and the held-out split never overlaps the training stream's seeds.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Batch = dict[str, np.ndarray]

# Each split draws from its own seed sequence, so "eval" batches are held out from "train".
SPLITS = {"train": 0, "eval": 1}


class Task(Protocol):
    """A generated task: token inputs, per-position class targets."""

    name: str
    vocab_size: int
    n_classes: int

    def batch(self, step: int, split: str = "train") -> Batch: ...


def batch_rng(seed: int, split: str, step: int) -> np.random.Generator:
    """The generator for one batch: a function of (seed, split, step) only, independent of history."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], step]))
