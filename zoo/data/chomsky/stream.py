"""A Chomsky-hierarchy task as a zoo ``Task``: a deterministic stream of [B, T] numpy batches.

As in the paper's training loop, every example of one batch has the same input length, drawn
uniformly from the split's range: 1..40 for ``"train"``, 41..500 for ``"eval"`` (Delétang et al.,
ICLR 2023, §4). ``batch_at_length`` gives a batch of one chosen length, for the per-length
evaluation curve.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.data.chomsky._common import (
    TEST_MAX_LENGTH,
    TEST_MIN_LENGTH,
    TRAIN_MAX_LENGTH,
    TRAIN_MIN_LENGTH,
    TaskSpec,
    collate,
    sample_length,
)
from zoo.data.task import SPLITS, Batch, batch_rng


@dataclasses.dataclass(frozen=True)
class ChomskyTask:
    """``batch_size`` examples of one task per batch, padded to ``pad_to`` tokens if given.

    ``pad_to`` fixes the batch shape (no recompilation under ``jit``); it must be at least the
    longest sequence the split can produce, ``spec.sequence_length(max length)``.
    """

    spec: TaskSpec
    batch_size: int = 32
    train_lengths: tuple[int, int] = (TRAIN_MIN_LENGTH, TRAIN_MAX_LENGTH)
    eval_lengths: tuple[int, int] = (TEST_MIN_LENGTH, TEST_MAX_LENGTH)
    pad_to: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"{self.spec.name}: batch_size must be positive, got {self.batch_size}")
        for field in ("train_lengths", "eval_lengths"):
            low, high = getattr(self, field)
            if not 1 <= low <= high:
                raise ValueError(f"{self.spec.name}: {field} must satisfy 1 <= min <= max, got {(low, high)}")
            if self.pad_to is not None and self.spec.sequence_length(high) > self.pad_to:
                raise ValueError(
                    f"{self.spec.name}: pad_to={self.pad_to} is shorter than the longest {field} "
                    f"sequence ({self.spec.sequence_length(high)} tokens)"
                )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    def batch(self, step: int, split: str = "train") -> Batch:
        rng = batch_rng(self.seed, split, step)
        low, high = self.train_lengths if split == "train" else self.eval_lengths
        length = sample_length(rng, low, high)
        return collate([self.spec.generate(rng, length) for _ in range(self.batch_size)], self.pad_to)

    def batch_at_length(self, step: int, length: int, split: str = "eval") -> Batch:
        """A batch whose examples all have input length ``length``, for per-length evaluation.

        Its seed also depends on ``length``, so each length's examples are drawn independently.
        """
        batch_rng(self.seed, split, step)  # validates split and step
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[split], step, length]))
        return collate([self.spec.generate(rng, length) for _ in range(self.batch_size)], self.pad_to)
