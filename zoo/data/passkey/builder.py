"""Passkey retrieval: a number hidden in filler text, asked for at the end.

Mohtashami & Jaggi (2023), "Landmark Attention: Random-Access Infinite Context Length for
Transformers", §4.2: a pass key of random digits sits at a chosen depth of a long run of repeated
filler sentences ("The grass is green. The sky is blue. …"), and the model is asked for it at the
end. Here the sentences are tokens:

    inputs   f f … f  K k_1 … k_n  f … f  Q ∅ … ∅     (K = key marker, Q = question, ∅ = answer blank)
    targets  0 …                          0 k_1 … k_n
    mask     F …                          F T   … T

* digits ``0..9`` are tokens 0..9, so the targets are the digits themselves (``n_classes = 10``);
* ``K`` = 10 ("the pass key is"), ``Q`` = 11 ("what is the pass key?"), ``∅`` = 12;
* filler tokens are ``13 … 13 + n_filler_tokens - 1``. By default the filler is the paper's repeated
  text: the ``j``-th filler token is ``13 + j % n_filler_tokens`` (``j`` counts filler positions only,
  so the key interrupts one periodic text); ``random_filler=True`` draws each one uniformly.

Every example has exactly ``sequence_length`` tokens (``eval_sequence_length`` for ``eval``,
defaulting to the train length). Of the ``F = sequence_length - 2 * n_digits - 2`` filler tokens,
``round(depth * F)`` come before the key; ``depth=None`` draws that count uniformly from ``0..F``.
The paper's sweep over total length and depth is one config per point, e.g.
``TASKS["passkey"](sequence_length=4096, depth=0.25)``.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from zoo.data.tfds_task import Example, SequenceBuilder, SequenceConfig, check_split, require, task_factory

N_DIGITS = 10
KEY_MARKER, QUESTION, ANSWER = 10, 11, 12
FIRST_FILLER = 13


@dataclasses.dataclass(eq=False, kw_only=True)
class PasskeyConfig(SequenceConfig):
    """Examples of ``sequence_length`` tokens, an ``n_digits`` key at ``depth`` (None: uniform)."""

    sequence_length: int = 256
    eval_sequence_length: int | None = None
    depth: float | None = None
    n_digits: int = 5
    n_filler_tokens: int = 8
    random_filler: bool = False

    @property
    def vocab_size(self) -> int:
        return FIRST_FILLER + self.n_filler_tokens

    @property
    def n_classes(self) -> int:
        return N_DIGITS

    def split_length(self, split: str) -> int:
        """Tokens in every example of ``split``."""
        check_split(split)
        if split == "eval" and self.eval_sequence_length is not None:
            return self.eval_sequence_length
        return self.sequence_length

    def max_length(self, split: str) -> int:
        return self.split_length(split)

    def n_filler(self, split: str) -> int:
        """Filler tokens in an example of ``split``: all but the key, its marker, the question, the blanks."""
        return self.split_length(split) - 2 * self.n_digits - 2

    def check(self) -> None:
        super().check()
        require(self, isinstance(self.n_digits, int) and self.n_digits >= 1, "n_digits", "must be at least 1")
        require(self, isinstance(self.n_filler_tokens, int) and self.n_filler_tokens >= 1, "n_filler_tokens",
                "must be at least 1")
        shortest = 2 * self.n_digits + 2
        for field in ("sequence_length", "eval_sequence_length"):
            value = getattr(self, field)
            if value is None and field == "eval_sequence_length":
                continue      # the train length
            require(self, isinstance(value, int) and value >= shortest, field,
                    f"must be an int of at least 2 * n_digits + 2 = {shortest}")
        depth = self.depth
        require(self, depth is None or (isinstance(depth, numbers.Real) and not isinstance(depth, bool)
                                        and 0 <= depth <= 1), "depth", "must be None or a number in [0, 1]")
        require(self, isinstance(self.random_filler, bool), "random_filler", "must be a bool")


def passkey_layout(key: np.ndarray, filler: np.ndarray, n_before: int) -> Example:
    """``filler[:n_before]``, the marked key, the rest of the filler, the question and one blank per digit."""
    key = np.asarray(key, np.int32)
    inputs = np.concatenate([filler[:n_before], [KEY_MARKER], key, filler[n_before:], [QUESTION],
                             np.full(len(key), ANSWER)]).astype(np.int32)
    targets = np.zeros(len(inputs), np.int32)
    targets[-len(key):] = key
    mask = np.zeros(len(inputs), bool)
    mask[-len(key):] = True
    return {"inputs": inputs, "targets": targets, "mask": mask}


def passkey_example(rng: np.random.Generator, config: PasskeyConfig, split: str) -> Example:
    key = rng.integers(0, N_DIGITS, size=config.n_digits)
    n_filler = config.n_filler(split)
    if config.depth is None:
        n_before = int(rng.integers(0, n_filler + 1))
    else:
        n_before = round(config.depth * n_filler)
    if config.random_filler:
        filler = rng.integers(0, config.n_filler_tokens, size=n_filler)
    else:     # the paper's repeated sentences: one periodic text
        filler = np.arange(n_filler) % config.n_filler_tokens
    return passkey_layout(key, FIRST_FILLER + filler, n_before)


class Passkey(SequenceBuilder):
    """Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention")."""

    CONFIG = PasskeyConfig
    generate = staticmethod(passkey_example)


make_task = task_factory(Passkey)
