"""The deterministic context-free tasks of Delétang et al., "Neural Networks and the Chomsky
Hierarchy" (ICLR 2023): each is solved by a finite controller with one stack.

* ``stack_manipulation``: a binary stack given bottom to top, then actions 2 = POP, 3 = PUSH 0,
  4 = PUSH 1 (a POP on an empty stack does nothing). Output: the final stack top to bottom, then the
  termination class 2, padded with 0s to ``length + 1`` positions; ``mask`` stops at the terminator.
* ``reverse_string``: a binary string; output: the string reversed (``length`` positions).
* ``modular_arithmetic_brackets``: a random fully bracketed expression mod 5 over digits and
  ``+ −`` (unary minus too), of exactly ``length`` characters, drawn from the paper's recursive
  grammar; class = its value mod 5.
* ``solve_equation``: such an expression with one digit replaced by ``x``, followed by ``=`` and its
  value, ``length`` characters in all; class = the digit that was replaced (unique: without ×, x
  enters the equation with coefficient ±1, which is invertible mod 5).
"""

from __future__ import annotations

import numpy as np

from zoo.data.chomsky._common import Example, TaskSpec, check_args, make_example, random_bits
from zoo.data.chomsky.regular import MODULUS, one_output

POP, PUSH_0, PUSH_1 = 2, 3, 4
END_OF_STACK = 2  # the termination class of stack_manipulation's output

BRACKET_SYMBOLS = "01234+-()"
EQUATION_SYMBOLS = "01234+-()x="
BRACKET_TOKENS = {c: i for i, c in enumerate(BRACKET_SYMBOLS)}
EQUATION_TOKENS = {c: i for i, c in enumerate(EQUATION_SYMBOLS)}


def stack_manipulation(rng: np.random.Generator, length: int) -> Example:
    """A random stack and random actions; the answer is the resulting stack, top first."""
    check_args(rng, length)
    if length == 1:
        # The paper's degenerate case: a one-element stack and no actions.
        symbols = random_bits(rng, 1)
        final_stack = [int(symbols[0])]
    else:
        stack_size = int(rng.integers(1, length))
        stack = random_bits(rng, stack_size)
        actions = rng.integers(POP, PUSH_1 + 1, size=length - stack_size, dtype=np.int32)
        symbols = np.concatenate([stack, actions])
        final_stack = apply_stack_actions(stack, actions)
    answer = final_stack[::-1] + [END_OF_STACK]
    padded = answer + [0] * (length + 1 - len(answer))
    return make_example(symbols, padded, blank=5, n_counted=len(answer))


def apply_stack_actions(stack: np.ndarray, actions: np.ndarray) -> list[int]:
    """The stack (bottom first) after the actions; POP on an empty stack is ignored."""
    current = [int(s) for s in stack]
    for action in actions:
        if action == POP:
            if current:
                current.pop()
        else:
            current.append(int(action) - PUSH_0)
    return current


def reverse_string(rng: np.random.Generator, length: int) -> Example:
    """A random binary string; the answer is the string reversed."""
    check_args(rng, length)
    bits = random_bits(rng, length)
    return make_example(bits, bits[::-1], blank=2)


def random_expression(rng: np.random.Generator, length: int) -> tuple[str, int]:
    """A bracketed +/− expression mod 5 of exactly ``length`` characters, and its value.

    The paper's grammar: lengths 1..4 give ``d``, ``-d``, ``(d)``, ``(-d)``; a longer expression
    is ``(L op R)`` with ``len(L)`` uniform in [1, length - 4] and ``R`` taking the rest.
    """
    if length <= 4:
        digit = int(rng.integers(0, MODULUS))
        text = {1: "{}", 2: "-{}", 3: "({})", 4: "(-{})"}[length].format(digit)
        return text, (-digit if length in (2, 4) else digit) % MODULUS
    left_length = int(rng.integers(1, length - 3))
    left, left_value = random_expression(rng, left_length)
    right, right_value = random_expression(rng, length - 3 - left_length)
    if rng.integers(0, 2) == 0:
        return f"({left}+{right})", (left_value + right_value) % MODULUS
    return f"({left}-{right})", (left_value - right_value) % MODULUS


def modular_arithmetic_brackets(rng: np.random.Generator, length: int) -> Example:
    """A random bracketed expression of ``length`` characters; the class is its value mod 5."""
    check_args(rng, length)
    text, value = random_expression(rng, length)
    return make_example([BRACKET_TOKENS[c] for c in text], [value], blank=len(BRACKET_SYMBOLS))


def solve_equation(rng: np.random.Generator, length: int) -> Example:
    """An equation ``expression(x) = v`` of ``length`` characters; the class is x.

    For ``length < 3`` no equation fits; like the paper, the example is then all ``0`` tokens with
    class 0.
    """
    check_args(rng, length)
    blank = len(EQUATION_SYMBOLS)
    if length < 3:
        return make_example(np.zeros(length, np.int32), [0], blank=blank)
    text, value = random_expression(rng, length - 2)
    # The paper's choice of the unknown: a uniform position, moved right (cyclically) to a digit.
    at = int(rng.integers(0, len(text)))
    while not text[at].isdigit():
        at = (at + 1) % len(text)
    equation = f"{text[:at]}x{text[at + 1:]}={value}"
    return make_example([EQUATION_TOKENS[c] for c in equation], [int(text[at])], blank=blank)


def same_output_length(length: int) -> int:
    return length


def stack_output_length(length: int) -> int:
    """The final stack holds at most ``length`` symbols, plus the terminator."""
    return length + 1


SPECS = (
    TaskSpec("stack_manipulation", "context_free", stack_manipulation, n_symbols=5, n_classes=3,
             output_length=stack_output_length),
    TaskSpec("reverse_string", "context_free", reverse_string, n_symbols=2, n_classes=2,
             output_length=same_output_length),
    TaskSpec("modular_arithmetic_brackets", "context_free", modular_arithmetic_brackets,
             n_symbols=len(BRACKET_SYMBOLS), n_classes=MODULUS, output_length=one_output),
    TaskSpec("solve_equation", "context_free", solve_equation, n_symbols=len(EQUATION_SYMBOLS),
             n_classes=MODULUS, output_length=one_output),
)
