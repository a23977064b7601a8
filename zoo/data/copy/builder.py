"""Copy: read a random string, then write it out again after a delimiter.

    inputs   s_1 … s_L  ▷  ∅ ∅ … ∅          (▷ = delimiter, token n_symbols; ∅ = blank, n_symbols + 1)
    targets  0   … 0    0  s_1 … s_L
    mask     F   … F    F  T   … T

The model must hold all ``L`` symbols in its state until the delimiter, then emit them in order at
the blank positions: the memory test of recurrent networks since Hochreiter & Schmidhuber (1997),
"Long Short-Term Memory", and Graves et al. (2014), "Neural Turing Machines" (their copy task).
The string length is drawn uniformly from ``[min_copy_length, max_copy_length]`` for ``train``, and
from the ``eval_*`` range for ``eval`` (defaulting to the train range), so length generalisation is
a config away. ``vocab_size = n_symbols + 2``, ``n_classes = n_symbols``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.data.tfds_task import Example, SequenceBuilder, SequenceConfig, require, task_factory


def delimiter(n_symbols: int) -> int:
    return n_symbols


def blank(n_symbols: int) -> int:
    return n_symbols + 1


def copy_layout(region: np.ndarray, answer: np.ndarray, n_symbols: int) -> Example:
    """``region``, the delimiter, one blank per answer token; ``answer`` is the target at the blanks."""
    n_answer = len(answer)
    inputs = np.concatenate([region, [delimiter(n_symbols)], np.full(n_answer, blank(n_symbols))])
    targets = np.zeros(len(inputs), np.int32)
    targets[len(region) + 1 :] = answer
    mask = np.zeros(len(inputs), bool)
    mask[len(region) + 1 :] = True
    return {"inputs": inputs.astype(np.int32), "targets": targets, "mask": mask}


@dataclasses.dataclass(eq=False, kw_only=True)
class CopyConfig(SequenceConfig):
    """``n_symbols`` string symbols; string lengths in ``[min, max]_copy_length`` (eval: ``eval_*``)."""

    n_symbols: int = 8
    min_copy_length: int = 1
    max_copy_length: int = 16
    eval_min_copy_length: int | None = None
    eval_max_copy_length: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def n_classes(self) -> int:
        return self.n_symbols

    def copy_lengths(self, split: str) -> tuple[int, int]:
        """The range of string lengths of ``split``, both ends included."""
        if split == "eval":
            return (self.min_copy_length if self.eval_min_copy_length is None else self.eval_min_copy_length,
                    self.max_copy_length if self.eval_max_copy_length is None else self.eval_max_copy_length)
        return self.min_copy_length, self.max_copy_length

    def max_length(self, split: str) -> int:
        return 2 * self.copy_lengths(split)[1] + 1

    def check(self) -> None:
        super().check()
        require(self, self.n_symbols >= 1, "n_symbols", "must be at least 1")
        require(self, self.min_copy_length >= 1, "min_copy_length", "must be at least 1")
        require(self, self.max_copy_length >= self.min_copy_length, "max_copy_length",
                f"must be at least min_copy_length={self.min_copy_length}")
        low, high = self.copy_lengths("eval")
        require(self, low >= 1, "eval_min_copy_length", "must be at least 1")
        require(self, high >= low, "eval_max_copy_length", f"must be at least the eval minimum {low}")


def copy_example(rng: np.random.Generator, config: CopyConfig, split: str) -> Example:
    low, high = config.copy_lengths(split)
    string = rng.integers(0, config.n_symbols, size=int(rng.integers(low, high + 1)))
    return copy_layout(string, string, config.n_symbols)


class Copy(SequenceBuilder):
    """Copy a random string after a delimiter (Graves et al. 2014, "Neural Turing Machines")."""

    CONFIG = CopyConfig
    generate = staticmethod(copy_example)


make_task = task_factory(Copy)
