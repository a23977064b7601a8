"""minGRU and minLSTM ("Were RNNs All We Needed?") against a float64 numpy loop of the paper's equations.

Tolerances: the models run in float32 and the loop in float64; with O(1) values over <= 12 steps the
float32 rounding stays below 1e-5, so outputs are compared at rtol = atol = 1e-5 (2e-5 for gradients,
which sum over all steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.mingru import log_positive_candidate, positive_candidate

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

MODELS = ("mingru", "minlstm")
ALL_MODES = ("sequential", "associative", "chunked", "log_sequential", "log_associative")
B, T, D_IN, D = 3, 11, 5, 6


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def g(v):
    return np.where(v >= 0, v + 0.5, sigmoid(v))


def loop(name, params, xs, h0, reset=None, reverse=False, positive=True):
    """The paper's per-step equations in float64, one time step at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs, h = np.asarray(xs, np.float64), np.array(h0, np.float64)
    cand = g if positive else (lambda v: v)
    time = xs.shape[1]
    ys = np.zeros(xs.shape[:2] + (h.shape[-1],))
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        if reset is not None:
            flag = (reset[:, t + 1] if t + 1 < time else np.zeros(len(h), bool)) if reverse else reset[:, t]
            h[np.asarray(flag)] = 0.0
        x = xs[:, t]
        h_tilde = cand(x @ p["w_h"] + p["bias_h"])
        if name == "mingru":
            z = sigmoid(x @ p["w_z"] + p["bias_z"])
            h = (1 - z) * h + z * h_tilde
        else:
            f = sigmoid(x @ p["w_f"] + p["bias_f"])
            i = sigmoid(x @ p["w_i"] + p["bias_i"])
            h = f / (f + i) * h + i / (f + i) * h_tilde
        ys[:, t] = h
    return ys, h


def random_params(rec, key, d_in=D_IN):
    """init, then random biases (init's are zero) so that every term of the equations is exercised."""
    params = rec.init(key, d_in)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(params))
    return {k: (v + 0.5 * jax.random.normal(kk, v.shape) if k.startswith("bias") else v)
            for kk, (k, v) in zip(keys, sorted(params.items()), strict=True)}


def random_problem(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(scale * rng.normal(size=(B, T, D_IN)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)   # signed: the log modes must cope
    reset = rng.random((B, T)) < 0.2
    reset[0, 4] = True
    return xs, h0, jnp.asarray(reset)


@pytest.mark.parametrize("name", MODELS)
def test_every_mode_matches_float64_loop_with_reset_and_reverse(name):
    rec = zoo.get(name, d_model=D)
    assert rec.modes == ALL_MODES
    params = random_params(rec, jax.random.key(0))
    xs, h0, reset = random_problem(0)
    for reverse in (False, True):
        want_ys, want_h = loop(name, params, xs, h0, np.asarray(reset), reverse)
        for mode in rec.modes:
            ys, h = rec.apply(params, xs, state=h0, reset=reset, mode=mode, reverse=reverse)
            np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5, err_msg=f"{mode} {reverse}")
            np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5, err_msg=f"{mode} {reverse}")
            assert h.dtype == jnp.float32


@pytest.mark.parametrize("name", MODELS)
def test_log_modes_stay_exact_when_gates_saturate(name):
    # Inputs 30x larger drive σ to within 1e-13 of 0 or 1: decays underflow in linear space.
    rec = zoo.get(name, d_model=D)
    params = random_params(rec, jax.random.key(1))
    xs, h0, _ = random_problem(1, scale=30.0)
    want_ys, want_h = loop(name, params, xs, h0)
    for mode in ("log_sequential", "log_associative"):
        ys, h = rec.apply(params, xs, state=h0, mode=mode)
        assert np.isfinite(ys).all()
        np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-4, err_msg=mode)
        np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-4, err_msg=mode)


@pytest.mark.parametrize("name", MODELS)
def test_log_mode_gradients_equal_linear_mode_gradients(name):
    rec = zoo.get(name, d_model=D)
    params = random_params(rec, jax.random.key(2))
    xs, h0, reset = random_problem(2)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, D)), jnp.float32)

    def loss(params, h0, mode):
        ys, h = rec.apply(params, xs, state=h0, reset=reset, mode=mode)
        return jnp.sum(ys * weights) + jnp.sum(h**2)

    want = jax.grad(loss, argnums=(0, 1))(params, h0, "sequential")
    for mode in ("log_sequential", "log_associative"):
        got = jax.grad(loss, argnums=(0, 1))(params, h0, mode)
        pairs = zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True)
        for (path, w), gt in pairs:
            assert np.isfinite(gt).all(), (mode, path)
            np.testing.assert_allclose(gt, w, rtol=2e-5, atol=2e-5, err_msg=f"{mode} {path}")


def test_minlstm_state_stays_between_initial_state_and_candidates():
    # f' + i' = 1 makes each step a convex combination: h_t lies between the smallest and the largest
    # of h_0 and h̃_1..h̃_t, channel by channel, however long the sequence.
    rec = zoo.get("minlstm", d_model=D)
    params = random_params(rec, jax.random.key(3))
    xs, h0, _ = random_problem(3, scale=3.0)
    ys, _ = rec.apply(params, xs, state=h0)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    cands = g(np.asarray(xs, np.float64) @ p["w_h"] + p["bias_h"])                      # [B, T, D]
    seen = np.concatenate([np.asarray(h0)[:, None], cands], axis=1)
    lo, hi = np.minimum.accumulate(seen, axis=1)[:, 1:], np.maximum.accumulate(seen, axis=1)[:, 1:]
    assert (np.asarray(ys) >= lo - 1e-5).all() and (np.asarray(ys) <= hi + 1e-5).all()


def test_positive_candidate_is_continuous_positive_and_its_log_is_exact():
    v = jnp.asarray(np.concatenate([np.linspace(-40, 40, 801), [0.0, -1e-7, 1e-7]]), jnp.float32)
    gv = positive_candidate(v)
    assert (gv > 0).all()
    np.testing.assert_allclose(gv, g(np.asarray(v, np.float64)), rtol=1e-6)
    np.testing.assert_allclose(log_positive_candidate(v), np.log(g(np.asarray(v, np.float64))),
                               rtol=1e-6, atol=1e-6)
    assert float(positive_candidate(jnp.float32(0.0))) == 0.5      # σ(0) = 0 + 1/2: no jump at 0


@pytest.mark.parametrize("name", MODELS)
def test_plain_candidate_matches_loop_and_has_no_log_modes(name):
    rec = zoo.get(name, d_model=D, positive_candidate=False)
    assert rec.modes == ("sequential", "associative", "chunked")
    params = random_params(rec, jax.random.key(4))
    xs, h0, reset = random_problem(4)
    want_ys, want_h = loop(name, params, xs, h0, np.asarray(reset), positive=False)
    ys, h = rec.apply(params, xs, state=h0, reset=reset, mode="associative")
    np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="log_sequential"):
        rec.apply(params, xs, mode="log_sequential")


@pytest.mark.parametrize("name", MODELS)
def test_step_fold_equals_float64_loop(name):
    rec = zoo.get(name, d_model=D)
    params = random_params(rec, jax.random.key(5))
    xs, h0, _ = random_problem(5)
    want_ys, want_h = loop(name, params, xs, h0)
    h = h0
    for t in range(T):
        h, y = rec.step(params, h, xs[:, t])
        np.testing.assert_allclose(y, want_ys[:, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
