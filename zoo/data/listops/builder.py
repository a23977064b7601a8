"""ListOps: the value of a nested list expression, generated with the Long Range Arena grammar.

Nangia & Bowman (2018), "ListOps: A Diagnostic Dataset for Latent Tree Learning"; the long version
of Tay et al. (2021), "Long Range Arena: A Benchmark for Efficient Transformers", whose generator
(``lra_benchmarks/data/listops.py``) this follows:

* a node at depth ``d < max_depth`` is an operator with probability 1/4, else a digit (depth
  ``max_depth``: always a digit; the root has depth 1);
* an operator takes 2..``max_args`` arguments (uniform), each a node one level deeper, and is one of
  ``MIN``, ``MAX``, ``MED`` (the median, rounded down) and ``SM`` (the sum modulo 10);
* a tree is kept if its token count lies in ``[min_tokens, max_tokens]``, else drawn again. The
  defaults are LRA's: ``max_depth=10``, ``max_args=10``, lengths strictly between 500 and 2000.

Tokens are LRA's: an operator opens its bracket (``[MIN`` is one token), ``]`` closes it:

    [MAX 2 9 [MIN 4 7 ] 0 ]          -> 9
    digits 0..9 = tokens 0..9;  [MIN [MAX [MED [SM = 10..13;  ] = 14      (vocab_size = 15)

The label (10 classes) is predicted at the last token, the closing ``]``: ``mask`` is True there
only. (LRA classifies a pooled encoding of the whole sequence; a recurrent model reads it at the end.)
LRA also drops duplicate trees; here examples are drawn independently, and at these lengths a
repeat is vanishingly unlikely. Both splits draw from the same distribution, as in LRA.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zoo.data.tfds_task import Example, SequenceBuilder, SequenceConfig, require, task_factory

N_VALUES = 10
OPERATORS = ("MIN", "MAX", "MED", "SM")
FIRST_OPERATOR = N_VALUES                      # token of "[MIN"; the others follow in OPERATORS order
CLOSE = FIRST_OPERATOR + len(OPERATORS)        # token of "]"
VALUE_P = 0.25                                 # LRA's chance that a node (above max_depth) is an operator
MAX_ATTEMPTS = 100_000                         # trees drawn for one example before giving up on the bounds


def apply_operator(operator: str, values: list[int]) -> int:
    """LRA's ``to_value`` for one saturated operator."""
    if operator == "MIN":
        return min(values)
    if operator == "MAX":
        return max(values)
    if operator == "MED":
        return int(np.median(values))
    return sum(values) % N_VALUES


def longest_tree(max_depth: int, max_args: int) -> int:
    """Tokens in the largest tree the grammar allows: operators with ``max_args`` arguments down to depth
    ``max_depth - 1``, digits at ``max_depth``."""
    tokens = 1
    for _ in range(max_depth - 1):
        tokens = 2 + max_args * tokens
    return tokens


@dataclasses.dataclass(eq=False, kw_only=True)
class ListOpsConfig(SequenceConfig):
    """LRA's grammar (``max_depth``, ``max_args``) and token-count bounds ``[min_tokens, max_tokens]``."""

    train_size: int = 96_000     # LRA's 96k train / 2k test examples
    eval_size: int = 2_000
    max_depth: int = 10
    max_args: int = 10
    min_tokens: int = 501        # LRA keeps 500 < length < 2000
    max_tokens: int = 1999

    @property
    def vocab_size(self) -> int:
        return CLOSE + 1

    @property
    def n_classes(self) -> int:
        return N_VALUES

    def max_length(self, split: str) -> int:
        return self.max_tokens

    def check(self) -> None:
        super().check()
        require(self, isinstance(self.max_depth, int) and self.max_depth >= 2, "max_depth",
                "must be an int of at least 2 (the root is depth 1: 1 allows no operator)")
        require(self, isinstance(self.max_args, int) and self.max_args >= 2, "max_args",
                "must be an int of at least 2")
        require(self, isinstance(self.min_tokens, int) and self.min_tokens >= 1, "min_tokens",
                "must be an int of at least 1")
        require(self, isinstance(self.max_tokens, int) and self.max_tokens >= self.min_tokens, "max_tokens",
                f"must be an int of at least min_tokens={self.min_tokens}")
        longest = longest_tree(self.max_depth, self.max_args)
        require(self, self.min_tokens <= longest, "min_tokens",
                f"exceeds the longest tree that max_depth={self.max_depth}, max_args={self.max_args} allow "
                f"({longest} tokens)")


class TreeTooLong(Exception):
    """A tree outgrew ``max_tokens`` while being drawn: it would be rejected, so stop drawing it."""


def draw_tree(rng: np.random.Generator, config: ListOpsConfig, depth: int, tokens: list[int]) -> int:
    """Append one node (at ``depth``) of LRA's grammar to ``tokens``; return its value."""
    if len(tokens) >= config.max_tokens:
        raise TreeTooLong
    is_operator = depth < config.max_depth and rng.random() <= VALUE_P
    if not is_operator:
        value = int(rng.integers(N_VALUES))
        tokens.append(value)
        return value
    opening = len(tokens)
    tokens.append(-1)         # the operator token, chosen after its arguments as LRA does
    n_args = int(rng.integers(2, config.max_args + 1))
    values = [draw_tree(rng, config, depth + 1, tokens) for _ in range(n_args)]
    operator = int(rng.integers(len(OPERATORS)))
    tokens[opening] = FIRST_OPERATOR + operator
    tokens.append(CLOSE)
    return apply_operator(OPERATORS[operator], values)


def listops_example(rng: np.random.Generator, config: ListOpsConfig, split: str) -> Example:
    """Trees drawn until one has ``min_tokens..max_tokens`` tokens; its value is the target at the end."""
    del split     # both splits share LRA's distribution
    for _ in range(MAX_ATTEMPTS):
        tokens: list[int] = []
        try:
            value = draw_tree(rng, config, 1, tokens)
        except TreeTooLong:
            continue
        if config.min_tokens <= len(tokens) <= config.max_tokens:
            inputs = np.asarray(tokens, np.int32)
            targets = np.zeros(len(inputs), np.int32)
            targets[-1] = value
            mask = np.zeros(len(inputs), bool)
            mask[-1] = True
            return {"inputs": inputs, "targets": targets, "mask": mask}
    raise ValueError(f"ListOpsConfig: no tree with min_tokens={config.min_tokens}.."
                     f"max_tokens={config.max_tokens} in {MAX_ATTEMPTS} draws "
                     f"(max_depth={config.max_depth}, max_args={config.max_args})")


class ListOps(SequenceBuilder):
    """ListOps with the Long Range Arena grammar (Nangia & Bowman 2018; Tay et al. 2021)."""

    name = "listops"      # not tfds' "list_ops" from the class name
    CONFIG = ListOpsConfig
    generate = staticmethod(listops_example)


make_task = task_factory(ListOps)
