"""The context-sensitive tasks of Delétang et al., "Neural Networks and the Chomsky Hierarchy"
(ICLR 2023): each needs more than a stack (a linear-bounded tape) to solve at every length.

* ``duplicate_string``: a binary string w; output w w (``2 * length`` positions).
* ``missing_duplicate_string``: w w with one symbol replaced by the placeholder 2, where
  ``|w| = length // 2`` (an odd length appends the pad token 3); class = the hidden symbol.
* ``odds_first``: a binary string s_1 … s_n; output s_1 s_3 s_5 … s_2 s_4 … (the paper's definition,
  1-based; the authors' code puts the 0-based odd positions first, the same task mirrored).
* ``binary_addition``: ``n + m`` as little-endian binary, ``|n| + |m| = length - 1``, both numbers
  uniform in [1, 2**|n| - 1]; output the sum little-endian without trailing (high) zeros, then the
  termination class 2, padded with 0s to ``length + 1`` positions; ``mask`` stops at the terminator.
* ``binary_multiplication``: the same with ``n × m``, padded to ``length`` positions.
* ``compute_sqrt``: a number uniform in [1, 2**length - 1] in big-endian binary; output
  ``isqrt`` of it, big-endian, zero-filled to ``ceil(length / 2)`` positions.
* ``bucket_sort``: a string over {0, …, 4}; output the sorted string.
"""

from __future__ import annotations

import math

import numpy as np

from zoo.data.chomsky._common import (
    Example,
    TaskSpec,
    check_args,
    make_example,
    random_bits,
    random_positive_bits,
)
from zoo.data.chomsky.context_free import same_output_length, stack_output_length
from zoo.data.chomsky.regular import one_output

MISSING, PAD = 2, 3  # missing_duplicate_string's placeholder and odd-length pad tokens
OPERATOR = 2  # the "+" / "×" token between the two numbers of binary_addition / _multiplication
END_OF_NUMBER = 2  # the termination class after a binary_addition / _multiplication result
BUCKET_SORT_SYMBOLS = 5


def duplicate_string(rng: np.random.Generator, length: int) -> Example:
    """A random binary string; the answer is the string twice."""
    check_args(rng, length)
    bits = random_bits(rng, length)
    return make_example(bits, np.concatenate([bits, bits]), blank=2)


def missing_duplicate_string(rng: np.random.Generator, length: int) -> Example:
    """w w (|w| = length // 2) with one symbol hidden; the class is the hidden symbol.

    For ``length == 1`` there is no w; like the paper, the example is the token 1 with class 1.
    """
    check_args(rng, length)
    if length == 1:
        return make_example([1], [1], blank=4)
    half = random_bits(rng, length // 2)
    doubled = np.concatenate([half, half])
    hidden = int(rng.integers(0, doubled.size))
    answer = int(doubled[hidden])
    doubled[hidden] = MISSING
    symbols = np.concatenate([doubled, np.full(length % 2, PAD, np.int32)])
    return make_example(symbols, [answer], blank=4)


def odds_first(rng: np.random.Generator, length: int) -> Example:
    """A random binary string s_1 … s_n; the answer is s_1 s_3 … followed by s_2 s_4 …."""
    check_args(rng, length)
    bits = random_bits(rng, length)
    return make_example(bits, np.concatenate([bits[0::2], bits[1::2]]), blank=2)


def little_endian_bits(number: int, width: int = 0) -> list[int]:
    """The binary digits of ``number``, least significant first, zero-filled to ``width``.

    With ``width = 0``, zero is ``[0]`` and other numbers have no high zeros.
    """
    return [int(c) for c in reversed(f"{number:b}".zfill(width))]


def from_little_endian(bits: np.ndarray) -> int:
    """The integer whose little-endian binary digits are ``bits`` (Python ints: no overflow)."""
    return int("".join(str(int(b)) for b in bits[::-1]), 2) if len(bits) else 0


def two_operands(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Two little-endian numbers for ``n op m`` of ``length`` tokens: |n| uniform in
    [1, length - 2], |m| = length - 1 - |n|, each value uniform in [1, 2**width - 1]."""
    width_n = int(rng.integers(1, length - 1))
    width_m = length - 1 - width_n
    return random_positive_bits(rng, width_n), random_positive_bits(rng, width_m)


def binary_operation(rng: np.random.Generator, length: int, multiply: bool) -> Example:
    """The shared body of binary_addition and binary_multiplication."""
    check_args(rng, length)
    output_length = length if multiply else length + 1
    if length <= 2:
        # The paper's degenerate case: one number (uniform in [0, 2**length - 2]) and no operator;
        # addition answers with that number, multiplication with ``length - 1`` zeros.
        number = int(rng.integers(0, 2**length - 1))
        symbols = little_endian_bits(number, length)
        result = [0] * (length - 1) if multiply else little_endian_bits(number)
    else:
        n, m = two_operands(rng, length)
        symbols = np.concatenate([n, [OPERATOR], m])
        value = from_little_endian(n) * from_little_endian(m) if multiply else (
            from_little_endian(n) + from_little_endian(m))
        result = little_endian_bits(value)
    answer = result + [END_OF_NUMBER]
    padded = answer + [0] * (output_length - len(answer))
    return make_example(symbols, padded, blank=3, n_counted=len(answer))


def binary_addition(rng: np.random.Generator, length: int) -> Example:
    """``n + m`` in little-endian binary; the answer is the sum, then the terminator."""
    return binary_operation(rng, length, multiply=False)


def binary_multiplication(rng: np.random.Generator, length: int) -> Example:
    """``n × m`` in little-endian binary; the answer is the product, then the terminator."""
    return binary_operation(rng, length, multiply=True)


def sqrt_output_length(length: int) -> int:
    """isqrt of a ``length``-bit number has at most ceil(length / 2) bits."""
    return math.ceil(length / 2)


def compute_sqrt(rng: np.random.Generator, length: int) -> Example:
    """A random ``length``-bit number (big-endian); the answer is its integer square root."""
    check_args(rng, length)
    bits = random_positive_bits(rng, length)
    number = int("".join(map(str, bits)), 2)
    root = f"{math.isqrt(number):b}".zfill(sqrt_output_length(length))
    return make_example(bits, [int(c) for c in root], blank=2)


def bucket_sort(rng: np.random.Generator, length: int) -> Example:
    """A random string over {0, …, 4}; the answer is the string sorted."""
    check_args(rng, length)
    symbols = rng.integers(0, BUCKET_SORT_SYMBOLS, size=length, dtype=np.int32)
    return make_example(symbols, np.sort(symbols), blank=BUCKET_SORT_SYMBOLS)


def duplicate_output_length(length: int) -> int:
    return 2 * length


SPECS = (
    TaskSpec("duplicate_string", "context_sensitive", duplicate_string, n_symbols=2, n_classes=2,
             output_length=duplicate_output_length),
    TaskSpec("missing_duplicate_string", "context_sensitive", missing_duplicate_string, n_symbols=4,
             n_classes=2, output_length=one_output),
    TaskSpec("odds_first", "context_sensitive", odds_first, n_symbols=2, n_classes=2,
             output_length=same_output_length),
    TaskSpec("binary_addition", "context_sensitive", binary_addition, n_symbols=3, n_classes=3,
             output_length=stack_output_length),
    TaskSpec("binary_multiplication", "context_sensitive", binary_multiplication, n_symbols=3,
             n_classes=3, output_length=same_output_length),
    TaskSpec("compute_sqrt", "context_sensitive", compute_sqrt, n_symbols=2, n_classes=2,
             output_length=sqrt_output_length),
    TaskSpec("bucket_sort", "context_sensitive", bucket_sort, n_symbols=BUCKET_SORT_SYMBOLS,
             n_classes=BUCKET_SORT_SYMBOLS, output_length=same_output_length),
)
