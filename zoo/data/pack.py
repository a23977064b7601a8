"""Packing: several variable-length sequences laid end to end in rows of a fixed length.

A model with a recurrent state can read a row that holds several independent sequences if it is told
where each one starts: ``reset`` is True at every sequence's first position, and the state is
discarded there. Packing keeps shapes static (one compiled step) without wasting most of a row on
padding when sequences are much shorter than the row.

    examples   [a1 a2 a3] [b1 b2] [c1 c2 c3 c4]      length = 6, rows = 2
    inputs     a1 a2 a3 b1 b2 0      c1 c2 c3 c4 0 0
    reset      T  F  F  T  F  F      T  F  F  F  F F
    mask       the examples' masks, False on the padding

Placement is next-fit in the given order: a sequence goes after the previous one in the current row
if it fits there, otherwise it opens the next row. The order of the examples is therefore kept, and
the result is a pure function of the examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from zoo.data.task import Batch

# The per-position features every example carries, all of one length.
SEQUENCE_KEYS = ("inputs", "targets", "mask")
PAD_TOKEN = 0


def check_example(example: Mapping[str, np.ndarray], where: str = "example") -> int:
    """The length of ``example``; ValueError unless inputs, targets, mask are 1-D and equally long."""
    missing = [key for key in SEQUENCE_KEYS if key not in example]
    if missing:
        raise ValueError(f"{where} lacks {missing}: it needs {list(SEQUENCE_KEYS)}, has {sorted(example)}")
    shapes = {key: np.shape(example[key]) for key in SEQUENCE_KEYS}
    if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: inputs, targets and mask must be 1-D of one length, got shapes {shapes}")
    return shapes["inputs"][0]


def empty_batch(rows: int, length: int) -> Batch:
    """All padding: token 0, target 0, mask and reset False."""
    return {
        "inputs": np.full((rows, length), PAD_TOKEN, np.int32),
        "targets": np.zeros((rows, length), np.int32),
        "mask": np.zeros((rows, length), bool),
        "reset": np.zeros((rows, length), bool),
    }


def place(batch: Batch, row: int, offset: int, example: Mapping[str, np.ndarray]) -> None:
    """Write ``example`` into ``batch[row]`` from ``offset`` on, with ``reset`` at its first position."""
    n = len(example["inputs"])
    for key in SEQUENCE_KEYS:
        batch[key][row, offset : offset + n] = example[key]
    batch["reset"][row, offset] = True


def checked_length(example: Mapping[str, np.ndarray], length: int, where: str) -> int:
    n = check_example(example, where)
    if not 0 < n <= length:
        raise ValueError(f"{where} has length {n}, must be in [1, length={length}]")
    return n


def check_shape(length: int, rows: int, where: str) -> None:
    if length <= 0 or rows <= 0:
        raise ValueError(f"{where}: length and rows must be positive, got length={length}, rows={rows}")


def fit_count(lengths: Sequence[int], length: int, rows: int) -> int:
    """How many of the leading sequences ``pack`` can place in ``rows`` rows of ``length`` (next-fit)."""
    row, offset = 0, 0
    for i, n in enumerate(lengths):
        if n > length:
            return i
        if offset + n > length:
            row, offset = row + 1, 0
        if row == rows:
            return i
        offset += n
    return len(lengths)


def pack(examples: Sequence[Mapping[str, np.ndarray]], length: int, rows: int) -> Batch:
    """Pack ``examples`` next-fit into ``rows`` rows of ``length`` positions.

    Returns ``inputs``/``targets`` int32, ``mask``/``reset`` bool, all [rows, length]; padding has
    token 0, target 0, mask False and reset False. Raises ValueError if an example is empty or longer
    than ``length``, or if the examples need more than ``rows`` rows.
    """
    check_shape(length, rows, "pack")
    batch = empty_batch(rows, length)
    row, offset = 0, 0
    for i, example in enumerate(examples):
        n = checked_length(example, length, f"pack: examples[{i}]")
        if offset + n > length:
            row, offset = row + 1, 0
        if row == rows:
            raise ValueError(
                f"pack: {len(examples)} examples do not fit in rows={rows} of length={length} "
                f"(examples[{i}] is the first that does not)"
            )
        place(batch, row, offset, example)
        offset += n
    return batch


def pad(examples: Sequence[Mapping[str, np.ndarray]], length: int) -> Batch:
    """One example per row, padded to ``length``: [len(examples), length], as ``pack`` lays rows out."""
    check_shape(length, len(examples), "pad")
    batch = empty_batch(len(examples), length)
    for i, example in enumerate(examples):
        checked_length(example, length, f"pad: examples[{i}]")
        place(batch, i, 0, example)
    return batch
