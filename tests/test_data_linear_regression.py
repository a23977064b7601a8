"""In-context linear regression (``zoo.data.linear_regression``): reproducible records, the two layouts,
targets that are a linear function of the record's own inputs (checked by least squares here), the loss
against numpy, config errors, and the closed-form predictor that solves the task after ``d`` points."""

import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zoo.data import TASKS
from zoo.data.linear_regression import (
    LinearRegression,
    LinearRegressionConfig,
    bayes_predictions,
    make_regression_loss,
    query_index,
    regression_loss,
    regression_metrics,
    regression_points,
)
from zoo.data.tfds_task import example_rng
from zoo.train.loop import make_train_step

DIM, N_POINTS = 3, 10
SMALL = dict(dim=DIM, n_points=N_POINTS, train_size=6, eval_size=4)
LAYOUTS = ("interleaved", "paired")


def read_all(config, data_dir):
    builder = LinearRegression(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    sources = {split: builder.as_data_source(split=split) for split in ("train", "eval")}
    return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def built(data_dir):
    """{layout: {split: records}} of ``SMALL`` (eval with 12 points), built once."""
    return {layout: read_all(LinearRegressionConfig(layout=layout, eval_n_points=12, **SMALL), data_dir)
            for layout in LAYOUTS}


def points_of(record, layout):
    """(x [n, d], y [n]) read back from a record in ``layout`` (the module docstring's tables)."""
    inputs, targets = record["inputs"], record["targets"][:, 0]
    if layout == "interleaved":
        return inputs[0::2, :DIM], inputs[1::2, DIM]
    return inputs[:, :DIM], targets


def test_registered_lazily_and_built_without_tensorflow(built):
    # ``import zoo.data`` leaving tfds unimported is checked for every task in test_data_tasks.py.
    assert TASKS["linear_regression"].__name__ == "make_linear_regression_task"
    assert "tensorflow" not in sys.modules


def test_same_seed_same_records_and_other_seeds_differ(built, tmp_path):
    config = LinearRegressionConfig(layout="interleaved", eval_n_points=12, **SMALL)
    again = read_all(config, tmp_path / "again")
    other = read_all(LinearRegressionConfig(layout="interleaved", eval_n_points=12, seed=1, **SMALL),
                     tmp_path / "other")
    for split in ("train", "eval"):
        for a, b, c in zip(built["interleaved"][split], again[split], other[split], strict=True):
            for key in ("inputs", "targets", "mask", "index"):
                np.testing.assert_array_equal(a[key], b[key])
            assert not np.allclose(a["inputs"], c["inputs"])
    first = built["interleaved"]["train"]
    assert not np.allclose(first[0]["inputs"], first[1]["inputs"])        # a fresh w and x per example
    assert [r["index"] for r in first] == list(range(6))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_and_mask(built, layout):
    for split, n in (("train", N_POINTS), ("eval", 12)):
        for record in built[layout][split]:
            steps = 2 * n if layout == "interleaved" else n
            assert record["inputs"].shape == (steps, DIM + 1) and record["inputs"].dtype == np.float32
            assert record["targets"].shape == (steps, 1) and record["targets"].dtype == np.float32
            assert record["mask"].shape == (steps,) and record["mask"].dtype == bool
            inputs, targets, mask = record["inputs"], record["targets"][:, 0], record["mask"]
            if layout == "interleaved":      # x-tokens [x, 0] (queries), then y-tokens [0_d, y]
                np.testing.assert_array_equal(mask, np.arange(steps) % 2 == 0)
                assert not inputs[0::2, DIM].any() and not inputs[1::2, :DIM].any()
                np.testing.assert_array_equal(inputs[1::2, DIM], targets[0::2])
                assert not targets[1::2].any()
            else:                            # [x_i, y_{i-1}], every step a query
                assert mask.all() and inputs[0, DIM] == 0
                np.testing.assert_array_equal(inputs[1:, DIM], targets[:-1])
            assert np.all(np.abs(inputs[:, :DIM]).sum(1)[mask] > 0)
    # The layouts hold the same points: the same (seed, split, index) draws the same w and x.
    for a, b in zip(built["interleaved"]["eval"], built["paired"]["eval"], strict=True):
        for u, v in zip(points_of(a, "interleaved"), points_of(b, "paired"), strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batches_have_the_vector_shapes(data_dir, layout):
    task = TASKS["linear_regression"](batch_size=3, layout=layout, eval_n_points=12, data_dir=data_dir,
                                      **SMALL)
    assert task.input_dim == task.vocab_size == DIM + 1 and task.n_classes == 1
    per = 2 if layout == "interleaved" else 1
    for split, n in (("train", N_POINTS), ("eval", 12)):
        batch = task.batch(1, split)
        assert batch["inputs"].shape == (3, per * n, DIM + 1) and batch["targets"].shape == (3, per * n, 1)
        assert batch["mask"].shape == batch["reset"].shape == (3, per * n)
        assert batch["mask"].sum() == 3 * n and batch["reset"][:, 0].all()


def test_targets_are_w_dot_x_recovered_by_least_squares(built, data_dir):
    for layout in LAYOUTS:
        for record in built[layout]["train"] + built[layout]["eval"]:
            x, y = points_of(record, layout)
            x, y = x.astype(np.float64), y.astype(np.float64)
            w, *_ = np.linalg.lstsq(x, y, rcond=None)       # n = 10 or 12 > d = 3 points
            assert np.max(np.abs(x @ w - y)) < 1e-5
            assert 0.05 < np.linalg.norm(w) < 5               # w ~ N(0, I/d): |w| about 1
    # ... and w is the example's own draw; with noise the points are no longer on a plane.
    w_drawn, _, _ = regression_points(example_rng(0, "train", 2), LinearRegressionConfig(**SMALL), "train")
    x, y = points_of(built["paired"]["train"][2], "paired")
    np.testing.assert_allclose(np.linalg.lstsq(x.astype(np.float64), y, rcond=None)[0], w_drawn, atol=1e-5)
    noisy = read_all(LinearRegressionConfig(layout="paired", noise=0.5, **SMALL), data_dir)["train"][2]
    x_noisy, y_noisy = points_of(noisy, "paired")
    np.testing.assert_array_equal(x_noisy, x)                 # the same w and x, only y moved
    residual = y_noisy - x_noisy.astype(np.float64) @ w_drawn
    assert 0.1 < np.std(residual) < 1.5


def test_query_index_restarts_at_each_sequence():
    mask = np.array([[1, 0, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
    reset = np.array([[1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0, 0, 0]], bool)
    k = np.asarray(query_index(jnp.asarray(mask), jnp.asarray(reset)))
    np.testing.assert_array_equal(k[0][mask[0]], [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(k[1], [0, 1, 2, 0, 1, 2, 3, 4])


def test_loss_matches_numpy():
    # One row, two packed sequences of d = 1: queries at steps 0, 2 | 4, 5 (query indices 0, 1 | 0, 1).
    inputs = np.zeros((1, 6, 2), np.float32)
    targets = np.array([0.5, 0.0, -1.0, 0.0, 2.0, 0.25], np.float32).reshape(1, 6, 1)
    predictions = np.array([0.0, 9.0, -0.5, 9.0, 1.0, 0.75], np.float32).reshape(1, 6, 1)
    mask = np.array([[1, 0, 1, 0, 1, 1]], bool)
    reset = np.array([[1, 0, 0, 0, 1, 0]], bool)
    batch = {"inputs": inputs, "targets": targets, "mask": mask, "reset": reset}
    errors = {0: 0.25, 2: 0.25, 4: 1.0, 5: 0.25}             # (p - y)^2 by hand
    mse = sum(errors.values()) / 4
    loss, metrics = regression_loss(lambda x, reset: jnp.asarray(predictions), batch)
    np.testing.assert_allclose(loss, mse, rtol=1e-6)
    np.testing.assert_allclose(metrics["mse_first"], (0.25 + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["mse_after_dim"], (0.25 + 0.25) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["normalized_mse"], mse, rtol=1e-6)
    np.testing.assert_allclose(metrics["excess_mse"], mse, rtol=1e-6)
    _, noisy = make_regression_loss(0.5)(lambda x, reset: jnp.asarray(predictions), batch)
    np.testing.assert_allclose(noisy["normalized_mse"], mse / 1.25, rtol=1e-6)
    np.testing.assert_allclose(noisy["excess_mse"], mse - 0.25, rtol=1e-6)
    assert make_regression_loss(0.5) is make_regression_loss(0.5)
    assert make_regression_loss(0.0) is regression_loss
    with pytest.raises(ValueError, match="predictions"):
        regression_metrics(jnp.zeros((1, 6)), jnp.asarray(targets), mask, reset, dim=1)


@pytest.mark.parametrize(("fields", "field"), [
    (dict(n_points=0), "n_points=0"),
    (dict(dim=0), "dim=0"),
    (dict(dim=2.0), "dim=2.0"),
    (dict(eval_n_points=0), "eval_n_points=0"),
    (dict(noise=-0.1), "noise=-0.1"),
    (dict(noise=float("nan")), "noise=nan"),
    (dict(layout="columns"), "layout='columns'"),
    (dict(train_size=0), "train_size=0"),
])
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(ValueError, match=f"LinearRegressionConfig: {field}"):
        LinearRegressionConfig(**fields)
    with pytest.raises(ValueError, match=field):
        TASKS["linear_regression"](**fields)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pack", [False, True])
def test_least_squares_on_the_preceding_points_solves_it_after_d_points(data_dir, layout, pack):
    task = TASKS["linear_regression"](batch_size=3, layout=layout, pack=pack, length=48 if pack else None,
                                      data_dir=data_dir, **SMALL)
    batch = task.batch(0, "eval")
    predictions = bayes_predictions(batch, layout)
    _, metrics = regression_loss(lambda x, reset: jnp.asarray(predictions), batch)
    assert metrics["mse_after_dim"] < 1e-8
    assert metrics["mse_first"] > 0.05 and metrics["mse"] > 0.01      # before d points it cannot be exact
    _, zero = regression_loss(lambda x, reset: jnp.zeros(x.shape[:-1] + (1,)), batch)
    y = batch["targets"][..., 0][batch["mask"]]
    np.testing.assert_allclose(zero["mse"], np.mean(y.astype(np.float64) ** 2), rtol=1e-5)
    assert zero["mse_after_dim"] > 0.05
    # One query checked here: row 0's query 5 (in its first sequence) from its first five points.
    queries = np.flatnonzero(batch["mask"][0])
    xs, ys = batch["inputs"][0, queries, :DIM], batch["targets"][0, queries, 0]
    w, *_ = np.linalg.lstsq(xs[:5].astype(np.float64), ys[:5].astype(np.float64), rcond=None)
    np.testing.assert_allclose(predictions[0, queries[5], 0], xs[5] @ w, rtol=1e-5, atol=1e-6)


class LinearReadout(nnx.Module):
    """The smallest model with the loop's call signature: one linear map of each step's input."""

    def __init__(self, d_input):
        self.linear = nnx.Linear(d_input, 1, rngs=nnx.Rngs(0))

    def __call__(self, inputs, reset):
        del reset
        return self.linear(inputs)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_the_loss_trains_under_the_loops_step(data_dir, noise):
    """``nnx.value_and_grad`` inside the loop's jitted step takes the loss as it is (no keyword-only
    arguments), and an update lowers it."""
    task = TASKS["linear_regression"](batch_size=4, layout="paired", data_dir=data_dir, **SMALL)
    model = LinearReadout(task.input_dim)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    step = make_train_step(make_regression_loss(noise))
    batch = task.batch(0)
    first = step(model, optimizer, batch)
    second = step(model, optimizer, batch)
    assert set(first) == {"loss", "mse", "normalized_mse", "excess_mse", "mse_first", "mse_after_dim"}
    np.testing.assert_allclose(first["excess_mse"], first["mse"] - noise**2, rtol=1e-6)
    assert second["loss"] < first["loss"]
