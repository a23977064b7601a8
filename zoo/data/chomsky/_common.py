"""What the fifteen Chomsky-hierarchy tasks share: the example layout, length sampling and batching.

Delétang et al., "Neural Networks and the Chomsky Hierarchy" (ICLR 2023), §4 and Appendix A.

One example is one token sequence of ``length`` input symbols followed by ``output_length(length)``
output positions (modular_arithmetic alone rounds an even ``length`` down to odd, as the paper does):

    inputs   x_1 … x_n  ∅ ∅ … ∅          (n = length input symbols, then one blank per output step)
    targets  0   … 0    y_1 … y_m        (the answer, read off at the blank positions)
    mask     F   … F    T   … T F … F    (True where the answer counts)

This is the paper's non-autoregressive setting (its ``make_model_with_empty_targets``): the model
reads the input string and then ``output_length`` blank tokens, and its outputs at the blank
positions are the prediction. A classification task (parity_check, …) has ``output_length = 1``:
one blank after the input, where the class is predicted. The blank is token ``n_symbols``, one past
the task's input alphabet, so ``vocab_size = n_symbols + 1``.

For the tasks whose answer is a variable-length string closed by a termination token
(stack_manipulation, binary_addition, binary_multiplication), the output is padded with zeros to
the fixed ``output_length`` as in the paper, and ``mask`` stops at the termination token: it is the
paper's ``accuracy_mask``. (The paper's loss also covers the zero padding after the terminator;
ours does not, since those positions never count in its accuracy.)

Where a task has no meaningful instance at a tiny length (solve_equation below 3, binary_addition
and binary_multiplication at 1 and 2, missing_duplicate_string at 1, stack_manipulation at 1), the
example is the paper's fixed or degenerate one, so that the training distribution matches its.

Lengths: the paper trains on input lengths drawn uniformly from 1..40, one length per batch, and
tests on every length 41..500 (the score is the accuracy averaged over the test lengths).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence

import numpy as np

from zoo.data.pack import pad

# The paper's length-generalisation regime: train on 1..N = 40, test on N+1..500.
TRAIN_MIN_LENGTH = 1
TRAIN_MAX_LENGTH = 40
TEST_MIN_LENGTH = 41
TEST_MAX_LENGTH = 500

Example = dict[str, np.ndarray]
Generate = Callable[[np.random.Generator, int], Example]


def same_length(length: int) -> int:
    """The default input length: all ``length`` symbols."""
    return length


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One Chomsky-hierarchy task: its generator and the sizes a model needs.

    ``n_symbols`` is the size of the paper's input alphabet; the blank read at output positions is
    token ``n_symbols``, hence ``vocab_size = n_symbols + 1``. ``n_classes`` is the paper's
    ``output_size``. ``output_length(n)`` is the number of output positions after an input of
    length ``n`` (1 for classification tasks); ``input_length(n)`` is the number of input symbols,
    ``n`` except for modular_arithmetic.
    """

    name: str
    level: str
    generate: Generate
    n_symbols: int
    n_classes: int
    output_length: Callable[[int], int]
    # modular_arithmetic rounds an even length down to the odd ``length - 1``, as the paper does.
    input_length: Callable[[int], int] = same_length

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 1

    @property
    def blank(self) -> int:
        return self.n_symbols

    def sequence_length(self, length: int) -> int:
        """Tokens in one example of input length ``length``: the input, then the output blanks."""
        return self.input_length(length) + self.output_length(length)


def check_args(rng: np.random.Generator, length: int) -> None:
    """The validation every generator shares: a numpy Generator and a positive integer length."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")


def make_example(symbols: Sequence[int], answer: Sequence[int], blank: int, n_counted: int | None = None
                 ) -> Example:
    """Lay out one example: the input symbols, then one blank per answer token.

    ``answer`` holds the target classes at the output positions; the first ``n_counted`` of them
    (all, by default) are marked in ``mask``.
    """
    symbols = np.asarray(symbols, np.int32).reshape(-1)
    answer = np.asarray(answer, np.int32).reshape(-1)
    n_in, n_out = symbols.size, answer.size
    n_counted = n_out if n_counted is None else n_counted
    inputs = np.concatenate([symbols, np.full(n_out, blank, np.int32)])
    targets = np.concatenate([np.zeros(n_in, np.int32), answer])
    mask = np.zeros(n_in + n_out, bool)
    mask[n_in:n_in + n_counted] = True
    return {"inputs": inputs, "targets": targets, "mask": mask}


def random_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """int32 [n]: uniform random bits."""
    return rng.integers(0, 2, size=n, dtype=np.int32)


def random_positive_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """int32 [n]: the n-bit pattern of an integer uniform in [1, 2**n - 1] (rejects all-zero).

    The paper draws ``random.randint(1, 2**n - 1)``; drawing bits avoids numpy's 64-bit limit
    for the long test lengths (n up to 500).
    """
    while True:
        bits = random_bits(rng, n)
        if bits.any():
            return bits


def sample_length(rng: np.random.Generator, min_len: int = TRAIN_MIN_LENGTH,
                  max_len: int = TRAIN_MAX_LENGTH) -> int:
    """An input length uniform in ``[min_len, max_len]`` (the paper's ``UniformCurriculum``)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len, got min_len={min_len}, max_len={max_len}")
    return int(rng.integers(min_len, max_len + 1))


def collate(examples: Sequence[Example], pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Stack examples of different lengths into fixed-shape [B, T] arrays.

    ``T`` is ``pad_to`` (for static shapes under ``jit``) or else the longest example. Padding
    positions have ``inputs = targets = 0`` and ``mask = False``; ``reset`` is True at t = 0 only
    (one example per row), which is the zoo batch format of ``zoo.data.task``.
    """
    if len(examples) == 0:
        raise ValueError("examples must be a non-empty sequence of examples")
    lengths = [ex["inputs"].shape[0] for ex in examples]
    longest = max(lengths)
    t = longest if pad_to is None else pad_to
    if t < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
    return pad(examples, t)       # zoo.data.pack's row layout: one example per row
