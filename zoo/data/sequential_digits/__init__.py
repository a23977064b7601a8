"""Sequential 8x8 digits as a tfds builder: see ``zoo.data.sequential_digits.builder``."""

from zoo.data.sequential_digits.builder import (
    SequentialDigits,
    SequentialDigitsConfig,
    digit_example,
    digit_images,
    make_task,
    split_indices,
)

__all__ = ["SequentialDigits", "SequentialDigitsConfig", "digit_example", "digit_images", "make_task",
           "split_indices"]
