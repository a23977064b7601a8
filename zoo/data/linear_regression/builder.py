"""In-context linear regression: every sequence is a fresh linear function, to be learned from its own
points.

Garg, Tsipras, Liang & Valiant (NeurIPS 2022), "What Can Transformers Learn In-Context? A Case Study
of Simple Function Classes", §2-3, the task the linear-RNN in-context-learning papers reuse (e.g.
Grazzi et al. 2024, "Is Mamba Capable of In-Context Learning?"; Park et al. 2024, "Can Mamba Learn How
to Learn?"). Example ``index`` of a split draws, from its own seeded generator
(``zoo.data.tfds_task.example_rng``), in this order:

* a weight vector ``w ~ N(0, I_d / d)`` (so ``E[(w·x)^2] = 1``),
* ``n`` inputs ``x_i ~ N(0, I_d)``, stored as float32,
* ``n`` noises ``e_i ~ N(0, 1)``, and the targets ``y_i = w·x_i + noise * e_i`` (computed in float64
  from the stored float32 ``x_i``, then stored as float32). The noises are drawn even when
  ``noise=0``, so configs that differ only in ``noise`` share ``w`` and every ``x_i``.

``d = dim``; ``n = n_points`` for ``train`` and ``eval_n_points`` (default ``n_points``) for ``eval``,
so the eval split can hold longer contexts than training (length generalisation). Each record has
``n`` queries: query ``k`` (0-based) asks for ``y_k`` given ``x_k`` and the ``k`` pairs before it.

Records (vector records, ``zoo.data.vectors``): ``inputs`` float32 [T, d + 1], ``targets`` float32
[T, 1], ``mask`` bool [T], in one of two layouts (``layout``):

``"interleaved"`` (Garg et al.; ``T = 2n``): an x-token then a y-token for each point::

    step      0           1            2           3           …  2n-2            2n-1
    inputs    [x_0, 0]    [0_d, y_0]   [x_1, 0]    [0_d, y_1]  …  [x_{n-1}, 0]    [0_d, y_{n-1}]
    targets   y_0         0            y_1         0           …  y_{n-1}         0
    mask      T           F            T           F           …  T               F

``"paired"`` (one step per point, the previous target beside the new input; ``T = n``)::

    step      0           1            2           …  n-1
    inputs    [x_0, 0]    [x_1, y_0]   [x_2, y_1]  …  [x_{n-1}, y_{n-2}]
    targets   y_0         y_1          y_2         …  y_{n-1}
    mask      T           T            T           …  T

The model reads ``d + 1`` float features per step (``input_dim``, also ``vocab_size``) and emits one
number per step (``n_classes = n_targets = 1``), its prediction of the target; the loss is the masked
mean squared error, ``zoo.data.linear_regression.regression_loss``. Since ``w ~ N(0, I_d / d)``, that
error is Garg et al.'s squared error divided by ``d`` (their ``w ~ N(0, I_d)``): predicting 0 scores
``1 + noise**2``, and least squares on the ``k`` preceding points scores 0 from ``k = d`` on when
``noise=0`` (``zoo.data.linear_regression.bayes_predictions``).

``train_size`` is the number of distinct functions ``w`` seen in training: few of them and a model can
memorise them instead of learning to regress (Raventós et al. 2023, "Pretraining task diversity and
the emergence of non-Bayesian in-context learning for regression").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator

import numpy as np

from zoo.data.tfds_task import Example, SequenceConfig, check_split, example_rng, require
from zoo.data.vectors import VectorBuilder, vector_task_factory

LAYOUTS = ("interleaved", "paired")


@dataclasses.dataclass(eq=False, kw_only=True)
class LinearRegressionConfig(SequenceConfig):
    """``n_points`` (x, y) pairs per example (``eval_n_points`` in ``eval``) of dimension ``dim``,
    target noise std ``noise``, and the record ``layout`` (``"interleaved"`` or ``"paired"``)."""

    train_size: int = 8192
    eval_size: int = 256
    n_points: int = 32
    eval_n_points: int | None = None
    dim: int = 8
    noise: float = 0.0
    layout: str = "interleaved"

    @property
    def input_dim(self) -> int:
        return self.dim + 1

    vocab_size = input_dim      # no tokens: the width of the input vectors
    n_classes = property(lambda self: 1)      # one output per step, the predicted y
    n_targets = n_classes

    def split_points(self, split: str) -> int:
        """The number of (x, y) pairs, and so of queries, in every example of ``split``."""
        check_split(split)
        if split == "eval" and self.eval_n_points is not None:
            return self.eval_n_points
        return self.n_points

    def steps_per_point(self) -> int:
        return 2 if self.layout == "interleaved" else 1

    def max_length(self, split: str) -> int:
        return self.steps_per_point() * self.split_points(split)

    def with_eval_length(self, length: int) -> LinearRegressionConfig:
        """A copy whose ``eval`` examples have ``length`` steps (``eval_n_points = length / steps per
        point``); ValueError for a length the layout cannot have (odd, for ``"interleaved"``)."""
        per_point = self.steps_per_point()
        if not isinstance(length, int | np.integer) or length < per_point or length % per_point:
            raise ValueError(f"{type(self).__name__}: layout={self.layout!r} has {per_point} step(s) per "
                             f"point, so an eval length must be a positive multiple of {per_point}, "
                             f"got {length!r}")
        return dataclasses.replace(self, eval_n_points=int(length) // per_point)

    def check(self) -> None:
        super().check()
        for field in ("n_points", "dim"):
            require(self, positive_int(getattr(self, field)), field, "must be an int of at least 1")
        require(self, self.eval_n_points is None or positive_int(self.eval_n_points), "eval_n_points",
                "must be None (n_points) or an int of at least 1")
        noise = self.noise
        require(self, isinstance(noise, numbers.Real) and not isinstance(noise, bool)
                and math.isfinite(noise) and noise >= 0, "noise", "must be a finite number >= 0 (a std)")
        require(self, self.layout in LAYOUTS, "layout", f"must be one of {LAYOUTS}")


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def regression_layout(x: np.ndarray, y: np.ndarray, layout: str) -> Example:
    """The record of points ``x`` [n, d] with targets ``y`` [n] in ``layout`` (module docstring)."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    n, d = x.shape
    if layout == "interleaved":
        inputs = np.zeros((2 * n, d + 1), np.float32)
        inputs[0::2, :d] = x
        inputs[1::2, d] = y
        targets = np.zeros((2 * n, 1), np.float32)
        targets[0::2, 0] = y
        mask = np.arange(2 * n) % 2 == 0
    elif layout == "paired":
        inputs = np.zeros((n, d + 1), np.float32)
        inputs[:, :d] = x
        inputs[1:, d] = y[:-1]
        targets = y[:, None].copy()
        mask = np.ones(n, bool)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return {"inputs": inputs, "targets": targets, "mask": mask}


def regression_points(rng: np.random.Generator, config: LinearRegressionConfig, split: str):
    """``(w float64 [d], x float32 [n, d], y float32 [n])`` of one example, drawn in the documented order."""
    n, d = config.split_points(split), config.dim
    w = rng.standard_normal(d) / math.sqrt(d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    noise = rng.standard_normal(n)
    y = (x.astype(np.float64) @ w + config.noise * noise).astype(np.float32)
    return w, x, y


def regression_example(rng: np.random.Generator, config: LinearRegressionConfig, split: str) -> Example:
    _, x, y = regression_points(rng, config, split)
    return regression_layout(x, y, config.layout)


def regression_examples(config: LinearRegressionConfig, split: str) -> Iterator[Example]:
    """The records of ``split`` in index order: example ``i`` from ``example_rng(seed, split, i)``."""
    for index in range(config.split_size(split)):
        yield regression_example(example_rng(config.seed, split, index), config, split)


class LinearRegression(VectorBuilder):
    """In-context linear regression (Garg et al. 2022): a fresh ``w`` per sequence, predict ``w·x``."""

    CONFIG = LinearRegressionConfig
    examples = staticmethod(regression_examples)


make_task = vector_task_factory(LinearRegression)
