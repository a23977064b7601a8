"""Generated tasks as tfds dataset builders, read back by random access into zoo's ``Task`` batches.

Each task is a ``tfds.core.GeneratorBasedBuilder`` that generates every example locally (nothing is
downloaded), writes ``file_format="array_record"``, and is read through tfds' random-access data
source (``builder.as_data_source``, what ``tfds.data_source`` returns). TensorFlow is never needed:
only ``as_dataset``/``as_numpy`` would import it, and nothing here calls them.

Records
-------
One record is one variable-length example with the features

* ``inputs``  int32 [n]: tokens in ``[0, config.vocab_size)``;
* ``targets`` int32 [n]: classes in ``[0, config.n_classes)`` (0 where ``mask`` is False);
* ``mask``    bool  [n]: the positions that count in the loss;
* ``index``   int64: the example's index in its split.

Example ``index`` of ``split`` is a pure function of ``(config, split, index)``: its generator is
``numpy.random.default_rng(SeedSequence([config.seed, SPLITS[split], index, 0]))``. Records are stored
in index order (``disable_shuffling=True``), so two builds of one config are identical, file for file.
Splits are zoo's ``SPLITS``: ``train`` (``config.train_size`` examples) and ``eval``
(``config.eval_size``), which may draw lengths from different ranges (length generalisation).

Batches
-------
``TfdsTask`` implements zoo's ``Task`` protocol on a built dataset: ``batch(step, split)`` returns
``inputs``, ``targets``, ``mask``, ``reset`` [batch_size, length] and is a pure function of
``(config, split, step)``, so a resumed run sees the same data. Rows have ``length`` positions, by
default the split's longest example, ``config.max_length(split)``; padding is token 0, target 0,
mask False.

* ``pack=False``: one record per row, padded. Batch ``step`` reads the records at positions
  ``step * batch_size …`` of an endless stream that visits the split in a fresh seeded permutation
  every epoch, so every record is seen once per epoch.
* ``pack=True``: rows are filled with several records joined by ``reset`` flags (``zoo.data.pack``).
  How many fit depends on their lengths, so batch ``step`` draws records uniformly at random, with
  replacement, from a generator seeded by ``(seed, split, step)``, and packs them next-fit until the
  next one does not fit.

* ``batch_at_length(step, length, split="eval")`` (the training loop's ``eval_lengths``): for a config
  with an eval length field (``config.with_eval_length``: ``eval_sequence_length`` by default, as
  ``passkey`` has), held-out batch ``step`` of the config's copy with that field set to ``length``
  (and ``train_size=1``: eval records never depend on it), built into its own directory like any
  config, one record per row of exactly ``length`` steps. Tasks without such a field lack the
  attribute, so the loop refuses their ``eval_lengths`` before training.

Where the data lives
--------------------
``data_dir`` argument, else the environment variable ``ZOO_DATA_DIR``, else ``~/.cache/zoo/tfds``.
A config is built on first use (``TfdsTask.prepare()`` or the first ``batch``) into
``<data_dir>/<task>/<config.name>/1.0.0`` and reused after; ``config.name`` spells out every field, so
two configs never share a directory.

Adding a task
-------------
A task is a config class, an example function ``(rng, config, split) -> dict of 1-D numpy arrays``
(``inputs``, ``targets``, ``mask``, of one length), and a three-line builder in its own package::

    @dataclasses.dataclass(eq=False, kw_only=True)
    class ReverseConfig(SequenceConfig):
        n_symbols: int = 2
        max_string_length: int = 40

        vocab_size = property(lambda self: self.n_symbols + 1)     # + the blank
        n_classes = property(lambda self: self.n_symbols)

        def max_length(self, split: str) -> int:                   # the longest example of ``split``
            return 2 * self.max_string_length

        def check(self) -> None:                                   # ValueError naming the field
            super().check()
            require(self, self.n_symbols >= 1, "n_symbols", "must be at least 1")

    def reverse_example(rng, config, split):
        ...
        return {"inputs": ..., "targets": ..., "mask": ...}

    class Reverse(SequenceBuilder):
        \"\"\"Reverse a string (Delétang et al. 2023).\"\"\"
        CONFIG = ReverseConfig
        generate = staticmethod(reverse_example)

    make_task = task_factory(Reverse)    # then TASKS["reverse"]: make_task(batch_size=…, n_symbols=…)

The builder's tfds name is its class name in snake case (``Reverse`` -> ``reverse``). Config fields
must not be named like ``TfdsTask``'s own arguments (``batch_size``, ``length``, ``pack``,
``data_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from zoo.data.pack import check_example, fit_count, pack, pad
from zoo.data.task import SPLITS, Batch

Example = dict[str, np.ndarray]
DATA_DIR_ENV = "ZOO_DATA_DIR"
MAX_NAME = 200
# Tags that keep the per-example generators and the per-epoch orders independent streams.
EXAMPLE_STREAM, ORDER_STREAM, PACK_STREAM = 0, 1, 2
_CUSTOM_CONFIG_NOTICE = "Using custom data configuration"
EVAL_LENGTH_FIELD = "eval_sequence_length"
_TFDS_FIELDS = frozenset(field.name for field in dataclasses.fields(tfds.core.BuilderConfig))


class _QuietCustomConfigs(logging.Filter):
    """Drops tfds' warning for a config not listed in ``BUILDER_CONFIGS``: every config here is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CUSTOM_CONFIG_NOTICE)


logging.getLogger("absl").addFilter(_QuietCustomConfigs())


def default_data_dir() -> Path:
    """``$ZOO_DATA_DIR`` if set, else ``~/.cache/zoo/tfds``."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "zoo" / "tfds")


def require(config: Any, ok: bool, field: str, message: str) -> None:
    """Raise ValueError naming the config class, the field and its value unless ``ok``."""
    if not ok:
        raise ValueError(f"{type(config).__name__}: {field}={getattr(config, field, None)!r} {message}")


def task_fields(config: SequenceConfig) -> dict[str, Any]:
    """The config's own fields (those of the task, not tfds' bookkeeping), in declaration order."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _TFDS_FIELDS}


def config_name(config: SequenceConfig) -> str:
    """A directory name that spells out every task field, e.g. ``seed=0,train_size=64,n_symbols=8``."""
    def spell(value):
        return "none" if value is None else str(value).lower().replace(" ", "")
    name = ",".join(f"{key}={spell(value)}" for key, value in task_fields(config).items())
    if len(name) > MAX_NAME:    # a directory name has at most 255 bytes: keep a prefix and a digest
        name = f"{name[: MAX_NAME - 17]},{hashlib.sha1(name.encode()).hexdigest()[:16]}"
    return name


@dataclasses.dataclass(eq=False, kw_only=True)
class SequenceConfig(tfds.core.BuilderConfig):
    """What every generated task has: a seed and the sizes of its two splits.

    Subclasses add their fields (with defaults), and define ``vocab_size``, ``n_classes``,
    ``max_length(split)`` and, for their own fields, ``check()``. ``name`` is derived from the fields.
    """

    name: str = ""
    seed: int = 0
    train_size: int = 1024
    eval_size: int = 256

    def __post_init__(self):
        self.check()
        self.name = config_name(self)
        self.description = f"{type(self).__name__}({self.name})"

    def check(self) -> None:
        """ValueError naming the first field that is out of range."""
        require(self, isinstance(self.seed, int) and self.seed >= 0, "seed", "must be a non-negative int")
        require(self, self.train_size >= 1, "train_size", "must be at least 1")
        require(self, self.eval_size >= 1, "eval_size", "must be at least 1")

    def split_size(self, split: str) -> int:
        check_split(split)
        return {"train": self.train_size, "eval": self.eval_size}[split]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def n_classes(self) -> int:
        raise NotImplementedError

    def max_length(self, split: str) -> int:
        """The length of the longest example ``split`` can hold."""
        raise NotImplementedError

    def with_eval_length(self, length: int) -> SequenceConfig | None:
        """A copy whose ``eval`` examples all have ``length`` steps, or None if the task has no such field.

        By default a config with a field ``eval_sequence_length`` (``passkey``) sets it; subclasses whose
        eval length is spelled otherwise override this (``linear_regression``: ``eval_n_points``).
        """
        if EVAL_LENGTH_FIELD not in task_fields(self):
            return None
        return dataclasses.replace(self, **{EVAL_LENGTH_FIELD: length})

    def eval_row_length(self, length: int) -> int:
        """How many steps the eval rows of ``with_eval_length(length)`` have: ``length`` itself, unless
        the task measures length otherwise (the Chomsky tasks: the input length, before the answer)."""
        return length


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")


def check_step(step: int) -> None:
    if not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example ``index`` of ``split``: a function of these three numbers alone."""
    check_split(split)
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index, EXAMPLE_STREAM]))


def generate_example(generate: Callable[..., Mapping[str, np.ndarray]], config: SequenceConfig,
                     split: str, index: int) -> Example:
    """Example ``index`` of ``split``, checked against the config (lengths, token and class ranges)."""
    raw = generate(example_rng(config.seed, split, index), config, split)
    where = f"{type(config).__name__} {split}[{index}]"
    n = check_example(raw, where)
    example = {
        "inputs": np.asarray(raw["inputs"], np.int32),
        "targets": np.asarray(raw["targets"], np.int32),
        "mask": np.asarray(raw["mask"], bool),
    }
    if not 1 <= n <= config.max_length(split):
        raise ValueError(f"{where}: length {n} outside [1, max_length={config.max_length(split)}]")
    if example["inputs"].min() < 0 or example["inputs"].max() >= config.vocab_size:
        raise ValueError(f"{where}: inputs outside [0, vocab_size={config.vocab_size})")
    if example["targets"].min() < 0 or example["targets"].max() >= config.n_classes:
        raise ValueError(f"{where}: targets outside [0, n_classes={config.n_classes})")
    return example


class SequenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tfds builder whose examples come from ``generate(rng, config, split)``; no download.

    Subclasses set ``CONFIG`` (a ``SequenceConfig`` subclass) and ``generate`` (a staticmethod).
    ``Builder(config=..., data_dir=...)``: the config defaults to ``CONFIG()``, the data_dir to
    ``default_data_dir()``, the file format to array_record.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    CONFIG: ClassVar[type[SequenceConfig]] = SequenceConfig
    generate: ClassVar[Callable[..., Mapping[str, np.ndarray]]]

    def __init__(self, *, config: SequenceConfig | None = None, data_dir: str | os.PathLike | None = None,
                 **kwargs):
        config = self.CONFIG() if config is None else config
        if not isinstance(config, self.CONFIG):
            raise TypeError(f"{type(self).__name__}: config must be a {self.CONFIG.__name__}, "
                            f"got {type(config).__name__}")
        kwargs.setdefault("file_format", "array_record")
        data_dir = default_data_dir() if data_dir is None else data_dir
        super().__init__(config=config, data_dir=os.fspath(data_dir), **kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' own lookup, for a builder inside a package, touches ``importlib_resources``, a backport
        # that tfds 4.9.10 does not install on Python >= 3.9: ModuleNotFoundError at download_and_prepare.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        sequence = functools.partial(tfds.features.Tensor, shape=(None,))
        return tfds.core.DatasetInfo(
            builder=self,
            description=(type(self).__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({
                "inputs": sequence(dtype=np.int32),
                "targets": sequence(dtype=np.int32),
                "mask": sequence(dtype=np.bool_),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            disable_shuffling=True,      # records in index order: builds are reproducible file for file
        )

    def _split_generators(self, dl_manager):
        del dl_manager    # everything is generated here
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        for index in range(config.split_size(split)):
            yield index, {**generate_example(type(self).generate, config, split, index), "index": index}


@functools.lru_cache(maxsize=64)
def epoch_order(seed: int, split: str, epoch: int, n_records: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n_records`` records of ``split``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], epoch, ORDER_STREAM]))
    order = rng.permutation(n_records)
    order.flags.writeable = False
    return order


def record_indices(seed: int, split: str, step: int, per_batch: int, n_records: int) -> np.ndarray:
    """The records batch ``step`` reads: positions ``step * per_batch …`` of the endless epoch stream."""
    check_split(split)
    check_step(step)
    positions = step * per_batch + np.arange(per_batch)
    epochs, within = np.divmod(positions, n_records)
    orders = [epoch_order(seed, split, int(epoch), n_records) for epoch in epochs]
    return np.array([order[i] for order, i in zip(orders, within, strict=True)], np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsTask:
    """zoo's ``Task`` on a ``SequenceBuilder`` dataset: ``batch(step, split)`` gives [batch_size, length]."""

    builder_cls: type[SequenceBuilder]
    config: SequenceConfig
    batch_size: int = 32
    length: int | None = None
    pack: bool = False
    data_dir: str | os.PathLike | None = None
    _sources: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _at_length: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.config, self.builder_cls.CONFIG):
            raise TypeError(f"{self.name}: config must be a {self.builder_cls.CONFIG.__name__}, "
                            f"got {type(self.config).__name__}")
        if self.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be at least 1, got {self.batch_size}")
        for split in SPLITS:
            if self.length is not None and self.length < self.config.max_length(split):
                raise ValueError(f"{self.name}: length={self.length} is shorter than the longest {split} "
                                 f"example, max_length={self.config.max_length(split)}")

    @property
    def name(self) -> str:
        return self.builder_cls.name

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    def row_length(self, split: str) -> int:
        return self.length or self.config.max_length(split)

    @property
    def batch_at_length(self) -> Callable[..., Batch]:
        """``batch_at_length(step, length, split="eval")``, the training loop's protocol for
        ``eval_lengths``: held-out batch ``step`` of the config's copy ``config.with_eval_length(length)``
        (its own dataset directory, since the name spells the field out; its ``train_size`` is cut to 1,
        as eval records do not depend on it), rows exactly ``length`` long; for the Chomsky tasks
        ``length`` is the input length, as in the paper's plots, and the rows hold the answer too.

        For a config without a length field this attribute does not exist (AttributeError), so that
        ``zoo.train.loop.supports_lengths`` reports the task unsupported before training starts.
        """
        if self.config.with_eval_length(self.config.max_length("eval")) is None:
            raise AttributeError(f"{type(self).__name__} {self.name!r}: {type(self.config).__name__} has no "
                                 f"eval length field ({EVAL_LENGTH_FIELD} or a with_eval_length override), "
                                 f"so it has no batch_at_length")
        return self._batch_at_length

    def at_eval_length(self, length: int) -> TfdsTask:
        """This task on ``config.with_eval_length(length)`` (cached per length), rows of ``length`` steps."""
        if length not in self._at_length:
            config = self.config.with_eval_length(length)
            if config is None:
                raise ValueError(f"{self.name}: {type(self.config).__name__} cannot set an eval length")
            config = dataclasses.replace(config, train_size=1)
            if config.max_length("eval") != config.eval_row_length(length):
                raise ValueError(f"{self.name}: with_eval_length({length}) gave eval examples of up to "
                                 f"{config.max_length('eval')} steps, not {config.eval_row_length(length)}")
            self._at_length[length] = dataclasses.replace(self, config=config, length=None, pack=False)
        return self._at_length[length]

    def _batch_at_length(self, step: int, length: int, split: str = "eval") -> Batch:
        if split != "eval":
            raise ValueError(f"{self.name}: batch_at_length sets the eval split's length, "
                             f"got split={split!r}")
        check_step(step)
        return self.at_eval_length(int(length)).batch(step, split)

    def builder(self) -> SequenceBuilder:
        return self.builder_cls(config=self.config, data_dir=self.data_dir)

    def prepare(self) -> TfdsTask:
        """Build the dataset unless it is on disk already, and open both splits for random access."""
        if set(self._sources) != set(SPLITS):
            builder = self.builder()
            builder.download_and_prepare()
            self._sources.update({split: builder.as_data_source(split=split) for split in SPLITS})
        return self

    def records(self, split: str, indices) -> list[dict[str, Any]]:
        source = self.prepare()._sources[split]
        return source.__getitems__([int(i) for i in indices])

    def batch(self, step: int, split: str = "train") -> Batch:
        check_split(split)
        check_step(step)
        if self.pack:
            return pack(self.packed_records(step, split), self.row_length(split), self.batch_size)
        n_records = self.config.split_size(split)
        indices = record_indices(self.config.seed, split, step, self.batch_size, n_records)
        return pad(self.records(split, indices), self.row_length(split))

    def packed_records(self, step: int, split: str) -> list[dict[str, Any]]:
        """Records drawn at random for batch ``step``, as many as next-fit packing places in the rows."""
        seed = np.random.SeedSequence([self.config.seed, SPLITS[split], step, PACK_STREAM])
        rng = np.random.default_rng(seed)
        n_records, length = self.config.split_size(split), self.row_length(split)
        drawn: list[dict[str, Any]] = []
        while True:     # draw batch_size at a time; stop at the first record that no longer fits
            drawn += self.records(split, rng.integers(0, n_records, size=self.batch_size))
            fit = fit_count([len(record["inputs"]) for record in drawn], length, self.batch_size)
            if fit < len(drawn):
                return drawn[:fit]


def task_factory(builder_cls: type[SequenceBuilder]) -> Callable[..., TfdsTask]:
    """``make_task(batch_size=32, length=None, pack=False, data_dir=None, **config_fields)`` for ``TASKS``."""
    def make_task(*, batch_size: int = 32, length: int | None = None, pack: bool = False,
                  data_dir: str | os.PathLike | None = None, **config_fields) -> TfdsTask:
        return TfdsTask(builder_cls, builder_cls.CONFIG(**config_fields), batch_size=batch_size,
                        length=length, pack=pack, data_dir=data_dir)
    make_task.__name__ = make_task.__qualname__ = f"make_{builder_cls.name}_task"
    fields = [f.name for f in dataclasses.fields(builder_cls.CONFIG) if f.name not in _TFDS_FIELDS]
    make_task.__doc__ = f"A ``TfdsTask`` for ``{builder_cls.name}``; config fields: {', '.join(fields)}."
    return make_task
