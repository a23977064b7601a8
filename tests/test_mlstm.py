"""mlstm: the xLSTM mLSTM block against a float64 numpy loop of its equations, written from the paper
and xlstm's recurrent step (``recurrent_step_stabilized_simple``), not from zoo's code.

Every parameter is drawn at random (the gate weights, zero at init, too), the initial state is
random, and rows carry segment resets. The model runs in float32, the loop in float64 from the same
float32 weights, so the difference is float32 rounding: compared at rtol 1e-4 and atol 1e-5 of each
array's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_loop_checks import (
    check_apply_against_loop,
    check_float64_apply_against_loop,
    check_step_against_loop,
    numpy_block_loop,
    sequential_then_slow,
)

import zoo
from zoo.models.mlstm import MLSTMConfig

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")




BATCH, T, D_IN = 2, 11, 5
CONFIG = {"d_model": 8, "proj_factor": 2.0, "n_heads": 2, "qkv_block_size": 4, "d_conv": 3, "chunk_size": 4}
RESET = np.zeros((BATCH, T), bool)
RESET[0, [4, 5]] = True
RESET[1, [0, 8]] = True


def _silu(v):
    return v / (1 + np.exp(-v))


def _log_sigmoid(v):
    return -np.logaddexp(0.0, -v)


def _layer_norm(x, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)


def _blocks(x, w):
    """Block-diagonal product, block by block."""
    n, bi, _ = w.shape
    return np.concatenate([x[:, j * bi:(j + 1) * bi] @ w[j] for j in range(n)], axis=-1)


def _numpy_step(p, c, state, x_t):
    """One token of the block in float64; state = (window, C, n, m) as xlstm keeps them."""
    window, C, n, m = (s.copy() for s in state)
    e, heads, dh = c.d_inner, c.n_heads, c.d_head
    u = x_t @ p["w_in"] if "w_in" in p else x_t
    up = (_layer_norm(u, c.norm_eps) * p["norm_scale"]) @ p["w_up"]
    x, z = up[:, :e], up[:, e:]
    taps = np.concatenate([window, x[:, None]], axis=1)                      # oldest first
    conv = _silu(np.einsum("bkc,kc->bc", taps, p["conv_kernel"]) + p["conv_bias"])
    q, k, v = _blocks(conv, p["w_q"]), _blocks(conv, p["w_k"]), _blocks(x, p["w_v"])
    qkv = np.concatenate([q, k, v], axis=-1)
    i_pre = qkv @ p["w_igate"] + p["b_igate"]
    f_pre = qkv @ p["w_fgate"] + p["b_fgate"]
    h = np.zeros((x_t.shape[0], e))
    for head in range(heads):
        cols = slice(head * dh, (head + 1) * dh)
        qh, kh, vh = q[:, cols], k[:, cols] / np.sqrt(dh), v[:, cols]
        log_f = _log_sigmoid(f_pre[:, head])
        m_new = np.maximum(log_f + m[:, head], i_pre[:, head])
        f_act = np.exp(log_f + m[:, head] - m_new)[:, None]
        i_act = np.exp(i_pre[:, head] - m_new)[:, None]
        C[:, head] = f_act[..., None] * C[:, head] + i_act[..., None] * np.einsum("bk,bv->bkv", kh, vh)
        n[:, head] = f_act * n[:, head] + i_act * kh
        m[:, head] = m_new
        numerator = np.einsum("bk,bkv->bv", qh, C[:, head])
        denominator = np.maximum(np.abs(np.sum(qh * n[:, head], -1)), np.exp(-m_new)) + c.eps
        h_tilde = numerator / denominator[:, None]
        h[:, cols] = _layer_norm(h_tilde, c.norm_eps) * p["out_norm_scale"][cols]    # per-head GroupNorm
    out = (h + p["skip"] * conv) * _silu(z)
    return (taps[:, 1:], C, n, m), u + out @ p["w_down"]


def _numpy_block(params, c, xs, state, reset, reverse):
    return numpy_block_loop(_numpy_step, params, c, xs, state, reset, reverse)


def _setup(seed=0, d_in=D_IN, **overrides):
    config = dict(CONFIG, **overrides)
    rec = zoo.get("mlstm", **config)
    keys = jax.random.split(jax.random.key(seed), 4)
    params = rec.init(keys[0], d_in)
    # Every parameter random, so that each one is tested (the gates start at zero weight, the
    # scales at one); the gate weights small enough that the gates vary without saturating.
    names = sorted(params)
    draws = jax.random.split(keys[1], len(names))
    params = {name: params[name] + (0.3 if name.startswith(("w_igate", "w_fgate")) else 0.5)
              * jax.random.normal(k, params[name].shape) for name, k in zip(names, draws, strict=True)}
    xs = jax.random.normal(keys[2], (BATCH, T, d_in), jnp.float32)
    state = rec.initial_state(params, BATCH)
    draws = jax.random.split(keys[3], len(state))
    state = tuple(s + jax.random.uniform(k, s.shape, jnp.float32, -0.5, 0.5)
                  for s, k in zip(state, draws, strict=True))
    return rec, params, xs, state, MLSTMConfig(**config)


STATE_NAMES = ("conv window", "C", "n", "m")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", sequential_then_slow(["chunked", "parallel", "sequential", "auto"]))
def test_apply_matches_a_float64_loop_of_the_block(mode, reverse):
    check_apply_against_loop(_setup, _numpy_block, STATE_NAMES, RESET, mode, reverse)


@pytest.mark.parametrize("mode", sequential_then_slow(["chunked", "parallel", "sequential"]))
def test_float64_apply_matches_the_loop_to_float64_precision(mode):
    check_float64_apply_against_loop(_setup, _numpy_block, RESET, mode)


def test_step_matches_a_float64_loop_without_input_projection():
    check_step_against_loop(_setup, _numpy_step, STATE_NAMES, CONFIG["d_model"])


def test_init_follows_xlstm():
    c = MLSTMConfig(d_model=16, n_heads=4)
    params = zoo.get("mlstm", d_model=16, n_heads=4).init(jax.random.key(2), 16)
    np.testing.assert_allclose(params["b_fgate"], np.linspace(3.0, 6.0, 4), rtol=1e-6)
    assert np.all(np.asarray(params["w_igate"]) == 0) and np.all(np.asarray(params["w_fgate"]) == 0)
    assert 0 < float(np.std(params["b_igate"])) < 0.3
    np.testing.assert_array_equal(params["skip"], np.ones(c.d_inner))
    assert params["w_q"].shape == (c.d_inner // c.qkv_block_size, c.qkv_block_size, c.qkv_block_size)
    assert params["w_up"].shape == (16, 2 * c.d_inner)
    np.testing.assert_allclose(float(np.std(params["w_up"])), np.sqrt(2 / (5 * 16)), rtol=0.15)


def test_state_layout():
    c = MLSTMConfig()
    rec = zoo.get("mlstm")
    state = rec.initial_state(rec.init(jax.random.key(0)), 3)
    assert [s.shape for s in state] == [(3, c.d_conv - 1, c.d_inner), (3, c.n_heads, c.d_head, c.d_head),
                                        (3, c.n_heads, c.d_head), (3, c.n_heads)]


@pytest.mark.parametrize("bad,match", [
    ({"n_heads": 3}, "n_heads"), ({"qkv_block_size": 5}, "qkv_block_size"), ({"d_model": 0}, "d_model"),
    ({"proj_factor": 0.01}, "proj_factor"), ({"d_conv": 0}, "d_conv"), ({"chunk_size": 0}, "chunk_size"),
    ({"forget_bias_range": (6.0, 3.0)}, "forget_bias_range"), ({"eps": 0.0}, "eps"),
])
def test_config_that_cannot_work_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("mlstm", **bad)
