"""Character-level Shakespeare as a tfds builder: see ``zoo.data.char_lm.builder``."""

from zoo.data.char_lm.builder import (
    UNK,
    CharLm,
    CharLMConfig,
    bits_per_character,
    decode,
    encode,
    make_task,
    split_files,
    split_text,
    vocabulary,
)

__all__ = ["UNK", "CharLMConfig", "CharLm", "bits_per_character", "decode", "encode", "make_task",
           "split_files", "split_text", "vocabulary"]
