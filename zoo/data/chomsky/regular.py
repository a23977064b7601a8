"""The regular tasks of Delétang et al., "Neural Networks and the Chomsky Hierarchy" (ICLR 2023).

Each is decided by a finite automaton, and each is a classification: the model reads the input
string, then one blank, and predicts the class at the blank.

* ``even_pairs``: a binary string (a = 0, b = 1); class 1 iff the number of ``ab`` and ``ba``
  pairs is odd. The count of unequal neighbours is odd exactly when the first and last symbols
  differ, so a two-state automaton (remember the first symbol) solves it.
* ``parity_check``: a binary string; class = the number of ``b`` (1) symbols mod 2.
* ``modular_arithmetic``: an expression ``d op d op … d`` over digits 0..4 and ``+ - ×`` (no
  brackets), of odd length; class = its value mod 5 with the usual precedence (× before + and −,
  left to right). An even ``length`` is rounded down to ``length - 1``, as the paper does.
* ``cycle_navigation``: moves on a 5-cycle, tokens 0 = left (−1), 1 = stay, 2 = right (+1),
  starting at 0; class = the final position, the sum of moves mod 5.
"""

from __future__ import annotations

import numpy as np

from zoo.data.chomsky._common import Example, TaskSpec, check_args, make_example, random_bits

MODULUS = 5
CYCLE_LENGTH = 5

# modular_arithmetic tokens: the digits 0..4 are themselves, then the operators.
PLUS, MINUS, TIMES = MODULUS, MODULUS + 1, MODULUS + 2
ARITHMETIC_SYMBOLS = "01234+-*"


def even_pairs(rng: np.random.Generator, length: int) -> Example:
    """A random binary string; class 1 iff it holds an odd number of ``ab``/``ba`` pairs."""
    check_args(rng, length)
    bits = random_bits(rng, length)
    odd_unequal_pairs = int(np.sum(bits[1:] != bits[:-1])) % 2
    return make_example(bits, [odd_unequal_pairs], blank=2)


def parity_check(rng: np.random.Generator, length: int) -> Example:
    """A random binary string; class = its number of ones mod 2."""
    check_args(rng, length)
    bits = random_bits(rng, length)
    return make_example(bits, [int(bits.sum()) % 2], blank=2)


def odd_length(length: int) -> int:
    """modular_arithmetic's input length: ``length`` rounded down to an odd number."""
    return length if length % 2 == 1 else length - 1


def modular_arithmetic(rng: np.random.Generator, length: int) -> Example:
    """A random bracket-free expression mod 5 of odd length; class = its value."""
    check_args(rng, length)
    n = odd_length(length)
    digits = rng.integers(0, MODULUS, size=n // 2 + 1, dtype=np.int32)
    operators = rng.choice(np.array([PLUS, MINUS, TIMES], np.int32), size=n // 2)
    expression = np.empty(n, np.int32)
    expression[0::2] = digits
    expression[1::2] = operators
    return make_example(expression, [evaluate_without_brackets(expression)], blank=len(ARITHMETIC_SYMBOLS))


def evaluate_without_brackets(expression: np.ndarray) -> int:
    """The value mod 5 of ``d op d op … d``: a sum of signed products, × binding tighter."""
    total, sign, term = 0, 1, int(expression[0])
    for op, digit in zip(expression[1::2], expression[2::2], strict=True):
        if op == TIMES:
            term = term * int(digit) % MODULUS
        else:
            total += sign * term
            sign, term = (1 if op == PLUS else -1), int(digit)
    return (total + sign * term) % MODULUS


def cycle_navigation(rng: np.random.Generator, length: int) -> Example:
    """Random moves (0 = left, 1 = stay, 2 = right) on a 5-cycle from 0; class = final position."""
    check_args(rng, length)
    moves = rng.integers(0, 3, size=length, dtype=np.int32)
    return make_example(moves, [int(np.sum(moves - 1)) % CYCLE_LENGTH], blank=3)


def one_output(length: int) -> int:
    """Classification tasks answer at a single position after the input."""
    return 1


SPECS = (
    TaskSpec("even_pairs", "regular", even_pairs, n_symbols=2, n_classes=2, output_length=one_output),
    TaskSpec("parity_check", "regular", parity_check, n_symbols=2, n_classes=2, output_length=one_output),
    TaskSpec("modular_arithmetic", "regular", modular_arithmetic, n_symbols=len(ARITHMETIC_SYMBOLS),
             n_classes=MODULUS, output_length=one_output, input_length=odd_length),
    TaskSpec("cycle_navigation", "regular", cycle_navigation, n_symbols=3, n_classes=CYCLE_LENGTH,
             output_length=one_output),
)
