"""Sequential digits: scikit-learn's bundled 8x8 handwritten digits read one step at a time.

The 1797 images of ``sklearn.datasets.load_digits`` (the UCI optical-recognition digits, 8x8 pixels of
intensity 0..16, 10 classes) ship inside scikit-learn, so nothing is downloaded. Two views, as in the
sequential-MNIST benchmark of Le, Jaitly & Hinton (2015), "A Simple Way to Initialize Recurrent
Networks of Rectified Linear Units", at 8x8:

* ``view="pixels"``: 64 steps in row-major order, one token per step, the pixel's intensity
  (``vocab_size = 17``);
* ``view="rows"``: 8 steps, one image row per step as a float vector of 8 intensities / 16
  (``input_dim = 8``; vector records, see ``zoo.data.vectors``), so the model sees real
  8-dimensional inputs rather than 8 tokens per row.

The label (``n_classes = 10``) is the target of the last step only (``mask`` is True there alone).
The split is fixed: the images' indices shuffled by ``SPLIT_SEED``, the first ``eval_fraction`` of
them ``eval`` and the rest ``train`` (each kept in index order); ``train_size``/``eval_size`` cap a split
to its first records.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from zoo.data.tfds_task import SequenceBuilder, TfdsTask, require
from zoo.data.vectors import RealDataConfig, VectorBuilder, VectorTask, fixed_split

SPLIT_SEED = 0          # fixed: the split is part of the benchmark, not of a run's seed
N_INTENSITIES = 17      # pixel values 0..16
N_CLASSES = 10
SIDE = 8
VIEWS = ("pixels", "rows")


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [1797, 8, 8] in 0..16, labels int32 [1797])`` from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images).astype(np.uint8)
    images.flags.writeable = False
    labels = np.asarray(digits.target, np.int32)
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def split_indices(eval_fraction: float) -> dict[str, tuple[int, ...]]:
    """The fixed image indices of ``train`` and ``eval``: disjoint, each in increasing order."""
    n_images = len(digit_images()[1])
    n_eval = int(round(eval_fraction * n_images))
    split = fixed_split(range(n_images), {"eval": n_eval, "train": n_images - n_eval}, SPLIT_SEED)
    return {name: tuple(int(i) for i in indices) for name, indices in split.items()}


@dataclasses.dataclass(eq=False, kw_only=True)
class SequentialDigitsConfig(RealDataConfig):
    """``view``: ``"pixels"`` (64 token steps) or ``"rows"`` (8 vector steps); ``eval_fraction`` held out."""

    view: str = "pixels"
    eval_fraction: float = 0.2

    @property
    def vocab_size(self) -> int:
        return N_INTENSITIES

    @property
    def input_dim(self) -> int:
        return SIDE

    @property
    def n_classes(self) -> int:
        return N_CLASSES

    n_targets = None        # class targets

    def max_length(self, split: str) -> int:
        return SIDE * SIDE if self.view == "pixels" else SIDE

    def full_size(self, split: str) -> int:
        return len(split_indices(self.eval_fraction)[split])

    def check(self) -> None:
        super().check()
        require(self, self.view in VIEWS, "view", f"must be one of {VIEWS}")
        require(self, isinstance(self.eval_fraction, float) and 0.0 < self.eval_fraction < 1.0,
                "eval_fraction", "must be a float in (0, 1)")


def digit_example(image: np.ndarray, label: int, view: str) -> dict[str, np.ndarray]:
    """One record: the image as pixel tokens or row vectors; the label at the last step."""
    if view == "pixels":
        inputs = image.reshape(-1).astype(np.int32)
    else:
        inputs = image.astype(np.float32) / (N_INTENSITIES - 1)
    n = len(inputs)
    targets = np.zeros(n, np.int32)
    targets[-1] = label
    mask = np.zeros(n, bool)
    mask[-1] = True
    return {"inputs": inputs, "targets": targets, "mask": mask}


def digit_examples(config: SequentialDigitsConfig, split: str) -> Iterator[dict[str, np.ndarray]]:
    images, labels = digit_images()
    for i in split_indices(config.eval_fraction)[split][: config.split_size(split)]:
        yield digit_example(images[i], int(labels[i]), config.view)


class SequentialDigits(VectorBuilder):
    """scikit-learn's 8x8 digits as a 64-step pixel or 8-step row sequence (Le et al. 2015, at 8x8)."""

    CONFIG = SequentialDigitsConfig
    examples = staticmethod(digit_examples)

    def _info(self):
        if self.builder_config.view == "pixels":   # token records, as every generated task has
            return SequenceBuilder._info(self)
        return super()._info()

    def _generate_examples(self, split: str):
        if self.builder_config.view == "rows":
            yield from super()._generate_examples(split)
            return
        for index, example in enumerate(digit_examples(self.builder_config, split)):
            yield index, {**example, "index": index}


def make_task(*, batch_size: int = 32, length: int | None = None, pack: bool = False, data_dir=None,
              **config_fields) -> TfdsTask:
    """A ``TfdsTask`` (``view="pixels"``) or ``VectorTask`` (``view="rows"``) for ``sequential_digits``."""
    config = SequentialDigitsConfig(**config_fields)
    task_cls = TfdsTask if config.view == "pixels" else VectorTask
    return task_cls(SequentialDigits, config, batch_size=batch_size, length=length, pack=pack,
                    data_dir=data_dir)
