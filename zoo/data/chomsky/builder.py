"""The fifteen Chomsky-hierarchy tasks as one tfds builder, ``ChomskyHierarchy``.

Delétang et al., "Neural Networks and the Chomsky Hierarchy" (ICLR 2023). ``ChomskyConfig.task``
names one of the tasks of ``zoo.data.chomsky.TASKS``; each example draws its input length uniformly
from the split's range and calls that task's generator, ``TASKS[task].generate(rng, length)``, so a
record is exactly the generator's example (layout in ``zoo.data.chomsky._common``). The defaults are
the paper's regime: ``train`` lengths 1..40, ``eval`` lengths 41..500.

Row length: a ``TfdsTask`` pads each split to ``config.max_length(split)``, the longest example the
split can hold (``spec.sequence_length`` of its longest input, e.g. 1500 tokens for duplicate_string
at length 500); an explicit ``length=`` must cover the eval split's longest example, or ``TfdsTask``
raises. The per-example input length is recovered with ``input_length(config, split, index)``, for
the paper's accuracy averaged over test lengths.

The paper draws fresh examples at every step, all of one length per batch; here a split is a fixed
set of ``train_size`` / ``eval_size`` examples, each with its own length, so the defaults are larger
than other tasks' (``train_size=16384``, ``eval_size=2048``: about 4 examples per test length).
``zoo.data.chomsky.ChomskyTask`` remains the fresh-sample stream. The task's
``name`` is the Chomsky task's (``parity_check``); its files live under ``chomsky_hierarchy/``.

    make_task = zoo.data.TASKS["parity_check"]       # batch_size=…, length=…, pack=…, config fields
    task = make_task(batch_size=32, train_size=4096, max_eval_length=100)
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from zoo.data.chomsky import TASKS as SPECS
from zoo.data.chomsky._common import (
    TEST_MAX_LENGTH,
    TEST_MIN_LENGTH,
    TRAIN_MAX_LENGTH,
    TRAIN_MIN_LENGTH,
    TaskSpec,
    sample_length,
)
from zoo.data.tfds_task import (
    Example,
    SequenceBuilder,
    SequenceConfig,
    TfdsTask,
    check_split,
    example_rng,
    require,
)


@functools.lru_cache(maxsize=256)
def longest_sequence(task: str, low: int, high: int) -> int:
    """Tokens in the longest example of input length ``low..high`` (cached: asked once per example).

    The maximum over the range, not the length at its top: modular_arithmetic rounds even lengths down.
    """
    return max(SPECS[task].sequence_length(n) for n in range(low, high + 1))


@dataclasses.dataclass(eq=False, kw_only=True)
class ChomskyConfig(SequenceConfig):
    """``task``: a Chomsky task's name; input lengths in ``[min, max]_train_length`` and ``…_eval_length``."""

    train_size: int = 16384
    eval_size: int = 2048
    task: str = "parity_check"
    min_train_length: int = TRAIN_MIN_LENGTH
    max_train_length: int = TRAIN_MAX_LENGTH
    min_eval_length: int = TEST_MIN_LENGTH
    max_eval_length: int = TEST_MAX_LENGTH

    @property
    def spec(self) -> TaskSpec:
        return SPECS[self.task]

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    def lengths(self, split: str) -> tuple[int, int]:
        """The range of input lengths of ``split``, both ends included."""
        check_split(split)
        if split == "eval":
            return self.min_eval_length, self.max_eval_length
        return self.min_train_length, self.max_train_length

    def max_length(self, split: str) -> int:
        return longest_sequence(self.task, *self.lengths(split))

    def with_eval_length(self, length: int) -> ChomskyConfig:
        """A copy whose eval examples all have input length ``length`` (the paper's per-length test
        accuracy); their rows are ``eval_row_length(length)`` steps, the input and the answer."""
        if not isinstance(length, int | np.integer) or isinstance(length, bool) or length < 1:
            raise ValueError(f"{type(self).__name__}: an eval input length must be a positive int, "
                             f"got {length!r}")
        return dataclasses.replace(self, min_eval_length=int(length), max_eval_length=int(length))

    def eval_row_length(self, length: int) -> int:
        return longest_sequence(self.task, length, length)

    def check(self) -> None:
        super().check()
        names = sorted(SPECS)
        require(self, self.task in names, "task", f"must be one of {names}")
        for prefix in ("train", "eval"):
            low, high = f"min_{prefix}_length", f"max_{prefix}_length"
            require(self, isinstance(getattr(self, low), int) and getattr(self, low) >= 1, low,
                    "must be an int of at least 1")
            require(self, isinstance(getattr(self, high), int) and getattr(self, high) >= getattr(self, low),
                    high, f"must be an int of at least {low}={getattr(self, low)}")


def chomsky_example(rng: np.random.Generator, config: ChomskyConfig, split: str) -> Example:
    """An input length uniform in the split's range, then the task's own generator at that length."""
    length = sample_length(rng, *config.lengths(split))
    return config.spec.generate(rng, length)


def input_length(config: ChomskyConfig, split: str, index: int) -> int:
    """The input length of example ``index`` of ``split``: the first number its generator draws."""
    return sample_length(example_rng(config.seed, split, index), *config.lengths(split))


class ChomskyHierarchy(SequenceBuilder):
    """The tasks of "Neural Networks and the Chomsky Hierarchy" (Delétang et al., ICLR 2023)."""

    CONFIG = ChomskyConfig
    generate = staticmethod(chomsky_example)


class ChomskyTfdsTask(TfdsTask):
    """A ``TfdsTask`` named after its Chomsky task (``parity_check``), not the shared builder."""

    @property
    def name(self) -> str:
        return self.config.task


def make_task(*, task: str = "parity_check", batch_size: int = 32, length: int | None = None,
              pack: bool = False, data_dir=None, **config_fields) -> ChomskyTfdsTask:
    """A ``TfdsTask`` for one Chomsky task; ``config_fields`` are ``ChomskyConfig``'s other fields."""
    config = ChomskyConfig(task=task, **config_fields)
    return ChomskyTfdsTask(ChomskyHierarchy, config, batch_size=batch_size, length=length, pack=pack,
                           data_dir=data_dir)
