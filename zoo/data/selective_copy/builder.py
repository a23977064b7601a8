"""Selective copying: remember the tokens scattered among noise, and reproduce them in order.

A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), §4.1.1
and Appendix E.1: the copy task with the positions of the tokens to memorise varied at random, so a
time-invariant model (a fixed convolution kernel, S4) cannot solve it and a model must *select* what
to store from the content of its input. Their setting: 16 tokens to memorise, a vocabulary of 16,
sequences of 4096. Ours is configurable and small by default.

    inputs   ∅ a ∅ ∅ b ∅ c ∅  ▷  ∅ ∅ ∅          (n_tokens + n_noise region, then ▷, n_tokens blanks)
    targets  0 …             0  a b c
    mask     F …             F  T T T

Tokens are drawn uniformly from ``n_symbols`` symbols; their positions are a uniformly random set of
``n_tokens`` among the ``n_tokens + n_noise`` region positions; noise is the blank token ∅. The layout
and special tokens are those of ``zoo.data.copy`` (``copy`` is this task with ``n_noise = 0``):
``vocab_size = n_symbols + 2``, ``n_classes = n_symbols``, every example has length
``2 * n_tokens + n_noise + 1``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.data.copy.builder import blank, copy_layout
from zoo.data.tfds_task import Example, SequenceBuilder, SequenceConfig, require, task_factory


@dataclasses.dataclass(eq=False, kw_only=True)
class SelectiveCopyConfig(SequenceConfig):
    """``n_tokens`` tokens from ``n_symbols`` symbols, scattered among ``n_noise`` noise positions."""

    n_symbols: int = 8
    n_tokens: int = 4
    n_noise: int = 12

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def n_classes(self) -> int:
        return self.n_symbols

    def max_length(self, split: str) -> int:
        return 2 * self.n_tokens + self.n_noise + 1

    def check(self) -> None:
        super().check()
        require(self, self.n_symbols >= 1, "n_symbols", "must be at least 1")
        require(self, self.n_tokens >= 1, "n_tokens", "must be at least 1")
        require(self, self.n_noise >= 0, "n_noise", "must be non-negative")


def selective_copy_example(rng: np.random.Generator, config: SelectiveCopyConfig, split: str) -> Example:
    tokens = rng.integers(0, config.n_symbols, size=config.n_tokens)
    region = np.full(config.n_tokens + config.n_noise, blank(config.n_symbols))
    positions = np.sort(rng.choice(len(region), size=config.n_tokens, replace=False))
    region[positions] = tokens
    return copy_layout(region, tokens, config.n_symbols)


class SelectiveCopy(SequenceBuilder):
    """Selective copying (Gu & Dao 2023, "Mamba", §4.1.1): tokens among noise, copied in order."""

    CONFIG = SelectiveCopyConfig
    generate = staticmethod(selective_copy_example)


make_task = task_factory(SelectiveCopy)
