"""The nonlinear engine against its own ``reference`` (a Python loop over steps).

Two cells are used, both defined here: a peephole LSTM written as a ``SplitCell`` (the structured
path with the hand-written backward pass) and the same function as a plain callable (the generic
``lax.scan`` path), plus a GRU-style ``SplitCell(separate=True)``. Outputs, final states and
gradients (params, inputs, initial state, reset state) must agree in both directions, with and
without resets. float32 tolerances: 1e-5 for values, 1e-4 relative for gradients (sums over B·T
rows taken in a different order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import nonlinear

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN, H = 3, 7, 4, 5
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _normal(rng, *shape, scale=0.7):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def lstm_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w_in": _normal(rng, D_IN, 4 * H), "w_rec": _normal(rng, H, 4 * H),
            "bias": _normal(rng, 4 * H), "peep": _normal(rng, H)}


def lstm_pointwise(params, pre, h):
    i, f, z, o = jnp.split(pre, 4, axis=-1)
    f = jax.nn.sigmoid(f + params["peep"].astype(pre.dtype) * h["c"].astype(pre.dtype))
    c = f.astype(jnp.float32) * h["c"] + (jax.nn.sigmoid(i) * jnp.tanh(z)).astype(jnp.float32)
    y = jax.nn.sigmoid(o) * jnp.tanh(c.astype(pre.dtype))
    return {"h": y.astype(jnp.float32), "c": c}, y


LSTM = nonlinear.SplitCell(
    input_weight=lambda p: p["w_in"], recurrent_weight=lambda p: p["w_rec"], read=lambda h: h["h"],
    pointwise=lstm_pointwise, bias=lambda p: p["bias"])


def plain_lstm(params, h, x_t):
    return LSTM(params, h, x_t)


def gru_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w_in": _normal(rng, D_IN, 3 * H), "w_rec": _normal(rng, H, 3 * H),
            "b_in": _normal(rng, 3 * H), "b_rec": _normal(rng, 3 * H)}


def gru_pointwise(params, pre, h):
    pre_x, pre_h = pre
    pre_h = pre_h + params["b_rec"]
    r = jax.nn.sigmoid(pre_x[:, :H] + pre_h[:, :H])
    z = jax.nn.sigmoid(pre_x[:, H:2 * H] + pre_h[:, H:2 * H])
    n = jnp.tanh(pre_x[:, 2 * H:] + r * pre_h[:, 2 * H:])
    h_new = (1 - z) * n + z * h
    return h_new, h_new


GRU = nonlinear.SplitCell(input_weight=lambda p: p["w_in"],
                          recurrent_weight=lambda p: p["w_rec"], read=lambda h: h,
                          pointwise=gru_pointwise, separate=True, bias=lambda p: p["b_in"])


def lstm_state(seed):
    rng = np.random.default_rng(seed)
    return {"h": _normal(rng, B, H), "c": _normal(rng, B, H)}


def data(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(B, T, D_IN)), dtype)
    reset = jnp.asarray(rng.random((B, T)) < 0.3).at[0, 2].set(True).at[1, T - 1].set(True)
    weights = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    return xs, reset, weights


def assert_trees_close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), **tol)


@pytest.mark.parametrize("cell", [LSTM, plain_lstm], ids=["split", "plain"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_apply_equals_reference(cell, reverse, with_reset):
    params, h0, fresh = lstm_params(1), lstm_state(2), lstm_state(3)
    xs, reset, _ = data(4)
    reset = reset if with_reset else None
    kw = dict(initial_state=h0, reset=reset, reverse=reverse, reset_state=fresh)
    ys, final = jax.jit(lambda p, x: nonlinear.apply(cell, p, x, **kw))(params, xs)
    ys_ref, final_ref = nonlinear.reference(plain_lstm, params, xs, **kw)
    assert_trees_close((ys, final), (ys_ref, final_ref), TOL)


def _loss(cell, reverse, reset, weights, use_reference=False):
    def loss(params, xs, h0, fresh):
        run = nonlinear.reference if use_reference else nonlinear.apply
        ys, final = run(cell, params, xs, initial_state=h0, reset=reset, reverse=reverse,
                        reset_state=fresh)
        return jnp.sum(ys.astype(jnp.float32) * weights) + sum(
            jnp.sum(jnp.sin(s)) for s in jax.tree.leaves(final))
    return loss


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_structured_backward_equals_autodiff_of_the_reference(reverse, with_reset):
    """Gradients for params, inputs, initial_state and reset_state, all four at once."""
    params, h0, fresh = lstm_params(5), lstm_state(6), lstm_state(7)
    xs, reset, weights = data(8)
    reset = reset if with_reset else None
    args = (params, xs, h0, fresh)
    got = jax.jit(jax.grad(_loss(LSTM, reverse, reset, weights), argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(_loss(plain_lstm, reverse, reset, weights, True), argnums=(0, 1, 2, 3))(*args)
    assert_trees_close(got, want, GRAD_TOL)
    if not with_reset:
        assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(got[3]))


def test_structured_backward_equals_generic_scan_backward():
    """The two engine paths, same cell: the SplitCell backward against JAX's transpose of lax.scan."""
    params, h0, fresh = lstm_params(9), lstm_state(10), lstm_state(11)
    xs, reset, weights = data(12)
    args = (params, xs, h0, fresh)
    got = jax.grad(_loss(LSTM, False, reset, weights), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(_loss(plain_lstm, False, reset, weights), argnums=(0, 1, 2, 3))(*args)
    assert_trees_close(got, want, GRAD_TOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_separate_parts_cell_matches_reference_values_and_gradients(reverse):
    params = gru_params(13)
    rng = np.random.default_rng(14)
    h0, fresh = _normal(rng, B, H), _normal(rng, B, H)
    xs, reset, weights = data(15)
    args = (params, xs, h0, fresh)
    plain = lambda p, h, x: GRU(p, h, x)
    got = jax.value_and_grad(_loss(GRU, reverse, reset, weights), argnums=(0, 1, 2, 3))(*args)
    want = jax.value_and_grad(_loss(plain, reverse, reset, weights, True), argnums=(0, 1, 2, 3))(*args)
    assert_trees_close(got, want, GRAD_TOL)


def test_bfloat16_inputs_keep_a_float32_state_and_match_float32_within_a_few_percent():
    """bf16 keeps 8 bits of mantissa; values within 1e-2, gradients (sums over B·T rounded
    products) within 3e-2 of the largest float32 gradient of each leaf."""
    params, h0 = lstm_params(16), lstm_state(17)
    xs, reset, weights = data(18)
    loss32 = _loss(LSTM, False, reset, weights)
    g32 = jax.grad(loss32, argnums=(0, 1))(params, xs, h0, None)
    g16 = jax.grad(loss32, argnums=(0, 1))(params, xs.astype(jnp.bfloat16), h0, None)
    ys, final = nonlinear.apply(LSTM, params, xs.astype(jnp.bfloat16), initial_state=h0, reset=reset)
    ys32, final32 = nonlinear.apply(LSTM, params, xs, initial_state=h0, reset=reset)
    assert ys.dtype == jnp.bfloat16 and final["c"].dtype == jnp.float32
    np.testing.assert_allclose(ys.astype(jnp.float32), ys32, atol=1e-2)
    np.testing.assert_allclose(final["c"], final32["c"], atol=1e-2 * float(jnp.abs(final32["c"]).max()))
    assert g16[1].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 3e-2 * scale


def test_vmap_of_the_structured_path_equals_a_loop():
    params, h0 = lstm_params(19), lstm_state(20)
    xs, reset, weights = data(21)
    stacked = jnp.stack([xs, xs[::-1] * 0.5])
    loss = _loss(LSTM, False, reset, weights)
    grad = jax.grad(lambda p, x: loss(p, x, h0, None))
    got = jax.vmap(grad, in_axes=(None, 0))(params, stacked)
    for k in range(2):
        assert_trees_close(jax.tree.map(lambda g, k=k: g[k], got), grad(params, stacked[k]), GRAD_TOL)


@pytest.mark.parametrize("unroll", [1, 3, 16])
@pytest.mark.parametrize("reverse", [False, True])
def test_blocks_of_steps_equal_the_reference_loop(unroll, reverse):
    """``unroll`` steps per loop iteration: T = 7 runs as 7 blocks of 1, as 2 unrolled blocks of 3
    plus a remainder of 1 (visited last forward, first in reverse), or, T < unroll, as a remainder
    only (a plain loop)."""
    params, h0, fresh = lstm_params(22), lstm_state(23), lstm_state(25)
    xs, reset, weights = data(24)
    kw = dict(initial_state=h0, reset=reset, reverse=reverse, reset_state=fresh)
    got = jax.jit(lambda p, x: nonlinear.apply(LSTM, p, x, unroll=unroll, **kw))(params, xs)
    assert_trees_close(got, nonlinear.reference(plain_lstm, params, xs, **kw), TOL)
    loss = lambda run, cell, **extra: lambda p, x, h, f: jnp.sum(run(
        cell, p, x, initial_state=h, reset=reset, reverse=reverse, reset_state=f, **extra)[0] * weights)
    args = (params, xs, h0, fresh)
    got = jax.grad(loss(nonlinear.apply, LSTM, unroll=unroll), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(nonlinear.reference, plain_lstm), argnums=(0, 1, 2, 3))(*args)
    assert_trees_close(got, want, GRAD_TOL)


def test_unknown_mode_is_rejected_by_name():
    params, h0 = lstm_params(0), lstm_state(0)
    xs, _, _ = data(0)
    with pytest.raises(ValueError, match="mode='deer'"):
        nonlinear.apply(LSTM, params, xs, initial_state=h0, mode="deer")
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=f"unroll must be a positive int.*got {bad!r}"):
            nonlinear.apply(LSTM, params, xs, initial_state=h0, unroll=bad)


@pytest.mark.parametrize("mode", ["auto", "newton"])
@pytest.mark.parametrize("cell", [LSTM, plain_lstm], ids=["split", "plain"])
def test_empty_sequence_returns_the_initial_state(cell, mode):
    params, h0 = lstm_params(25), lstm_state(26)
    xs = jnp.zeros((B, 0, D_IN), jnp.float32)
    ys, final = nonlinear.apply(cell, params, xs, initial_state=h0, mode=mode)
    assert ys.shape == (B, 0, H)
    assert_trees_close(final, h0, TOL)
