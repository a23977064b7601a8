"""Records whose steps are vectors: float inputs [n, input_dim], and per-step class or multi-hot targets.

``zoo.data.tfds_task`` stores token sequences (int32 ``inputs`` [n]). Real data is not always tokens: a
piano-roll frame is a set of sounding pitches (``bach_chorales``), an image row is 8 intensities
(``sequential_digits``, ``view="rows"``). These records have the features

* ``inputs``  float32 [n, input_dim];
* ``targets`` int32 [n] (classes, as in token records) or float32 [n, n_targets] (multi-hot, one
  independent Bernoulli per unit: the loss is ``zoo.data.bach_chorales.frame_nll``);
* ``mask``    bool [n];  ``index`` int64.

``VectorTask`` batches them as ``TfdsTask`` batches tokens (the same record order, packing and
padding), with the trailing axes kept: ``inputs`` [B, T, input_dim], ``targets`` [B, T] or
[B, T, n_targets], ``mask``/``reset`` [B, T]. Padding is zeros with mask False.

A model reads these inputs through a linear input projection (``input_dim`` features) instead of a
token embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from zoo.data.pack import SEQUENCE_KEYS, check_shape
from zoo.data.task import SPLITS, Batch
from zoo.data.tfds_task import (
    SequenceBuilder,
    SequenceConfig,
    TfdsTask,
    check_split,
    check_step,
    record_indices,
    require,
)

Example = dict[str, np.ndarray]


def fixed_split(items: Sequence[str], sizes: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Disjoint splits of ``items``: sorted, shuffled by ``seed``, cut into consecutive chunks of ``sizes``
    (in the mapping's order; the last split takes the rest), each chunk sorted again."""
    ordered = sorted(items)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    splits, start = {}, 0
    names = list(sizes)
    for i, name in enumerate(names):
        stop = len(shuffled) if i == len(names) - 1 else start + sizes[name]
        splits[name] = sorted(shuffled[start:stop])
        start = stop
    return splits


@dataclasses.dataclass(eq=False, kw_only=True)
class RealDataConfig(SequenceConfig):
    """A task read from data that a package ships: the split sizes come from the data.

    ``train_size``/``eval_size``: ``None`` (all of the split) or a cap, the split's first records
    (for tiny test builds); subclasses define ``full_size(split)``.
    """

    train_size: int | None = None
    eval_size: int | None = None

    def check(self) -> None:
        require(self, isinstance(self.seed, int) and self.seed >= 0, "seed", "must be a non-negative int")
        for field in ("train_size", "eval_size"):
            value = getattr(self, field)
            require(self, value is None or (isinstance(value, int) and value >= 1), field,
                    "must be None (the whole split) or a positive int")

    def full_size(self, split: str) -> int:
        raise NotImplementedError

    def split_size(self, split: str) -> int:
        check_split(split)
        cap = {"train": self.train_size, "eval": self.eval_size}[split]
        return self.full_size(split) if cap is None else min(cap, self.full_size(split))


def vector_length(example: Mapping[str, np.ndarray], where: str) -> int:
    """The number of steps of ``example``; ValueError unless its arrays agree on it."""
    missing = [key for key in SEQUENCE_KEYS if key not in example]
    if missing:
        raise ValueError(f"{where} lacks {missing}: it needs {list(SEQUENCE_KEYS)}, has {sorted(example)}")
    shapes = {key: np.shape(example[key]) for key in SEQUENCE_KEYS}
    if len(shapes["inputs"]) != 2 or len(shapes["mask"]) != 1 or len(shapes["targets"]) not in (1, 2):
        raise ValueError(f"{where}: need inputs [n, d], targets [n] or [n, p], mask [n], got shapes {shapes}")
    if len({shape[0] for shape in shapes.values()}) != 1:
        raise ValueError(f"{where}: inputs, targets and mask must have one length, got shapes {shapes}")
    return shapes["mask"][0]


def empty_vector_batch(like: Mapping[str, np.ndarray], rows: int, length: int) -> Batch:
    """All padding, with the dtypes and trailing axes of the record ``like``."""
    batch = {key: np.zeros((rows, length, *np.shape(like[key])[1:]), np.asarray(like[key]).dtype)
             for key in SEQUENCE_KEYS}
    batch["mask"] = batch["mask"].astype(bool)
    batch["reset"] = np.zeros((rows, length), bool)
    return batch


def place_vectors(batch: Batch, row: int, offset: int, example: Mapping[str, np.ndarray]) -> None:
    n = len(example["mask"])
    for key in SEQUENCE_KEYS:
        batch[key][row, offset : offset + n] = example[key]
    batch["reset"][row, offset] = True


def pack_vectors(examples: Sequence[Mapping[str, np.ndarray]], length: int, rows: int) -> Batch:
    """``zoo.data.pack.pack`` for vector records: next-fit into ``rows`` rows of ``length`` steps."""
    check_shape(length, rows, "pack_vectors")
    if not examples:
        raise ValueError("pack_vectors: needs at least one example (the batch takes its dtypes and shapes)")
    batch = empty_vector_batch(examples[0], rows, length)
    row, offset = 0, 0
    for i, example in enumerate(examples):
        n = vector_length(example, f"pack_vectors: examples[{i}]")
        if not 0 < n <= length:
            raise ValueError(f"pack_vectors: examples[{i}] has length {n}, must be in [1, length={length}]")
        if offset + n > length:
            row, offset = row + 1, 0
        if row == rows:
            raise ValueError(f"pack_vectors: {len(examples)} examples do not fit in rows={rows} of "
                             f"length={length} (examples[{i}] is the first that does not)")
        place_vectors(batch, row, offset, example)
        offset += n
    return batch


def pad_vectors(examples: Sequence[Mapping[str, np.ndarray]], length: int) -> Batch:
    """One record per row, padded with zeros (mask False) to ``length`` steps."""
    check_shape(length, len(examples), "pad_vectors")
    batch = empty_vector_batch(examples[0], len(examples), length)
    for i, example in enumerate(examples):
        n = vector_length(example, f"pad_vectors: examples[{i}]")
        if not 0 < n <= length:
            raise ValueError(f"pad_vectors: examples[{i}] has length {n}, must be in [1, length={length}]")
        place_vectors(batch, i, 0, example)
    return batch


class VectorBuilder(SequenceBuilder, skip_registration=True):
    """A builder of vector records from data on disk (not generated from a seed).

    Subclasses set ``CONFIG`` and implement ``examples(config, split)``, an iterator over the split's
    records in order. The config must define ``input_dim`` and, for multi-hot targets, ``n_targets``
    (``None`` for class targets).
    """

    @staticmethod
    def examples(config: SequenceConfig, split: str) -> Iterator[Example]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if config.n_targets is None:
            targets = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        else:
            targets = tfds.features.Tensor(shape=(None, config.n_targets), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(type(self).__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({
                "inputs": tfds.features.Tensor(shape=(None, config.input_dim), dtype=np.float32),
                "targets": targets,
                "mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            disable_shuffling=True,
        )

    def _generate_examples(self, split: str):
        config = self.builder_config
        count = 0
        for index, example in enumerate(type(self).examples(config, split)):
            n = vector_length(example, f"{type(config).__name__} {split}[{index}]")
            if not 1 <= n <= config.max_length(split):
                raise ValueError(f"{type(config).__name__} {split}[{index}]: length {n} outside "
                                 f"[1, max_length={config.max_length(split)}]")
            count += 1
            yield index, {**example, "index": index}
        if count != config.split_size(split):
            raise ValueError(f"{type(config).__name__}: {split} has {count} records, "
                             f"split_size says {config.split_size(split)}")


@dataclasses.dataclass(frozen=True, eq=False)
class VectorTask(TfdsTask):
    """``TfdsTask`` for vector records: ``batch(step, split)`` keeps the records' trailing axes."""

    builder_cls: type[VectorBuilder]

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    def batch(self, step: int, split: str = "train") -> Batch:
        check_split(split)
        check_step(step)
        if self.pack:
            return pack_vectors(self.packed_records(step, split), self.row_length(split), self.batch_size)
        n_records = self.config.split_size(split)
        indices = record_indices(self.config.seed, split, step, self.batch_size, n_records)
        return pad_vectors(self.records(split, indices), self.row_length(split))


def vector_task_factory(builder_cls: type[VectorBuilder]):
    """``make_task(batch_size=32, length=None, pack=False, data_dir=None, **config_fields)``."""
    def make_task(*, batch_size: int = 32, length: int | None = None, pack: bool = False,
                  data_dir: Any = None, **config_fields) -> VectorTask:
        return VectorTask(builder_cls, builder_cls.CONFIG(**config_fields), batch_size=batch_size,
                          length=length, pack=pack, data_dir=data_dir)
    make_task.__name__ = make_task.__qualname__ = f"make_{builder_cls.name}_task"
    return make_task


__all__ = ["SPLITS", "RealDataConfig", "VectorBuilder", "VectorTask", "fixed_split", "pack_vectors",
           "pad_vectors", "vector_task_factory"]
