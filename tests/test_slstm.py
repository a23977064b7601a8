"""slstm: xLSTM's sLSTM block and layer against a float64 numpy loop of their equations, written from
the paper (§2.2) and xlstm's vanilla step (``blocks/slstm/src/vanilla/slstm.py``), not from zoo's code.

Every parameter is drawn at random, the initial state is random (normaliser n > 0), and rows carry
segment resets (a reset starts from the zero state, where the stabiliser starts at ĩ). The model
runs in float32, the loop in float64 from the same float32 weights: compared at rtol 1e-4 and atol
1e-5 of each array's scale (tests/block_loop_checks.py). The overflow test checks the stabilised
cell against the unstabilised equations (c̄, n̄ without m) run in float64, where exp(ĩ) for ĩ ~ 400
still fits; in float32 it would be inf.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_loop_checks import check_apply_against_loop, check_step_against_loop, numpy_block_loop
from scipy.special import erf

import zoo
from zoo.models.slstm import SLSTMConfig

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")

BATCH, T, D_IN = 2, 11, 5
BLOCK = {"d_model": 8, "n_heads": 2, "d_conv": 3, "ffn_proj_factor": 1.5}
# The bare layer, without convolution, with the paper's exponential forget gate and 4 heads of 2.
LAYER = {"d_model": 8, "n_heads": 4, "d_conv": 0, "forget_gate": "exp", "block": False}
EPS = SLSTMConfig().norm_eps
RESET = np.zeros((BATCH, T), bool)
RESET[0, [4, 5]] = True
RESET[1, [0, 8]] = True


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _layer_norm(x, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)


def _blocks(x, w):
    """Block-diagonal product, block by block."""
    n, bi, _ = w.shape
    return np.concatenate([x[:, j * bi:(j + 1) * bi] @ w[j] for j in range(n)], axis=-1)


def _cell(pre, h, c, n, m, forget_gate):
    """The sLSTM update of PAPERS.md §1.6, channel by channel, with xlstm's start m = ĩ when n = 0."""
    i_pre, f_pre, z_pre, o_pre = pre
    log_f = -np.logaddexp(0.0, -f_pre) if forget_gate == "sigmoid" else f_pre
    m_new = np.where(n == 0, i_pre, np.maximum(log_f + m, i_pre))
    i_act, f_act = np.exp(i_pre - m_new), np.exp(log_f + m - m_new)
    c = f_act * c + i_act * np.tanh(z_pre)
    n = f_act * n + i_act
    return _sigmoid(o_pre) * c / n, c, n, m_new


def _numpy_step(p, cfg, state, x_t):
    """One token in float64; state = ([window,] h, c, n, m) as xlstm keeps them."""
    d, heads = cfg.d_model, cfg.n_heads
    dh = d // heads
    window, (h, c, n, m) = (state[0], state[1:]) if cfg.d_conv else (None, state)
    u = x_t @ p["w_in"] if "w_in" in p else x_t
    x = _layer_norm(u, cfg.norm_eps) * p["norm_scale"] if cfg.block else u
    x_conv = x
    if cfg.d_conv:
        taps = np.concatenate([window, x[:, None]], axis=1)                 # oldest first
        x_conv = np.einsum("bkc,kc->bc", taps, p["conv_kernel"]) + p["conv_bias"]
        x_conv = x_conv * _sigmoid(x_conv)
        window = taps[:, 1:]
    # Memory mixing: head k's h channels feed only head k's gate channels.
    recurrent = np.zeros((4, x_t.shape[0], d))
    for k in range(heads):
        cols = slice(k * dh, (k + 1) * dh)
        for g in range(4):
            recurrent[g][:, cols] = h[:, cols] @ p["r"][k, :, g, :]
    pre = [_blocks(x_conv, p["w_i"]), _blocks(x_conv, p["w_f"]), _blocks(x, p["w_z"]), _blocks(x, p["w_o"])]
    pre = [pre[g] + recurrent[g] + p["bias"][g] for g in range(4)]
    h, c, n, m = _cell(pre, h, c, n, m, cfg.forget_gate)
    y = np.concatenate([_layer_norm(h[:, k * dh:(k + 1) * dh], cfg.norm_eps) for k in range(heads)], -1)
    y = y * p["out_norm_scale"]
    if cfg.block:
        y = u + y
        if cfg.d_ffn:
            g_p = (_layer_norm(y, cfg.norm_eps) * p["ffn_norm_scale"]) @ p["w_up"]
            gate, up = g_p[:, :cfg.d_ffn], g_p[:, cfg.d_ffn:]
            y = y + (0.5 * gate * (1 + erf(gate / np.sqrt(2))) * up) @ p["w_down"]     # exact GELU
    memory = (h, c, n, m)
    return ((window, *memory) if cfg.d_conv else memory), y


def _numpy_block(params, cfg, xs, state, reset, reverse):
    return numpy_block_loop(_numpy_step, params, cfg, xs, state, reset, reverse)


def _random_state(key, state, with_window):
    """window and h, c ~ U(-0.5, 0.5); n ~ U(0.5, 1.5) (a normaliser is positive); m ~ U(-1, 1)."""
    keys = jax.random.split(key, len(state))
    ranges = ([(-0.5, 0.5)] if with_window else []) + [(-0.5, 0.5), (-0.5, 0.5), (0.5, 1.5), (-1.0, 1.0)]
    return tuple(jax.random.uniform(k, s.shape, jnp.float32, lo, hi)
                 for s, k, (lo, hi) in zip(state, keys, ranges, strict=True))


def _setup_for(config):
    def setup(seed=0, d_in=D_IN):
        rec = zoo.get("slstm", **config)
        keys = jax.random.split(jax.random.key(seed), 4)
        params = rec.init(keys[0], d_in)
        # Every parameter random, so that each one is tested (the scales start at one, the biases
        # at fixed values).
        names = sorted(params)
        draws = jax.random.split(keys[1], len(names))
        params = {name: params[name] + 0.4 * jax.random.normal(k, params[name].shape)
                  for name, k in zip(names, draws, strict=True)}
        xs = jax.random.normal(keys[2], (BATCH, T, d_in), jnp.float32)
        state = _random_state(keys[3], rec.initial_state(params, BATCH), config.get("d_conv", 4) > 0)
        return rec, params, xs, state, SLSTMConfig(**config)

    return setup


CASES = {"block": (BLOCK, ("conv window", "h", "c", "n", "m")), "layer": (LAYER, ("h", "c", "n", "m"))}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_apply_matches_a_float64_loop(case, reverse):
    config, names = CASES[case]
    check_apply_against_loop(_setup_for(config), _numpy_block, names, RESET, "sequential", reverse)


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_matches_a_float64_loop_without_input_projection(case):
    config, names = CASES[case]
    check_step_against_loop(_setup_for(config), _numpy_step, names, config["d_model"])


def _unstabilised_layer(pre, r, heads, forget_gate):
    """ĩ, f̃, z̃, õ [T, B, 4, D] (input part) -> h [T, B, D] by the paper's equations without a
    stabiliser (c̄ = Σ f·…·i z, n̄ likewise), from the zero state, in float64."""
    time, batch, _, d = pre.shape
    dh = d // heads
    h, c, n = np.zeros((batch, d)), np.zeros((batch, d)), np.zeros((batch, d))
    out = []
    for t in range(time):
        heads_mixed = [np.einsum("ba,agc->bgc", h[:, k * dh:(k + 1) * dh], r[k]) for k in range(heads)]
        mixed = np.concatenate(heads_mixed, axis=-1)
        i_pre, f_pre, z_pre, o_pre = np.moveaxis(pre[t] + mixed, 1, 0)
        f = _sigmoid(f_pre) if forget_gate == "sigmoid" else np.exp(f_pre)
        c = f * c + np.exp(i_pre) * np.tanh(z_pre)
        n = f * n + np.exp(i_pre)
        h = _sigmoid(o_pre) * c / n
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_stabiliser_keeps_large_gate_preactivations_finite(forget_gate):
    """ĩ ~ 400 (sigmoid forget gate) or ĩ ~ 200 and f̃ ~ 40 (exp forget gate): exp(ĩ) overflows float32
    at once (and the exp gate's running product exp(Σ f̃) within three steps), yet the stabilised cell
    returns the unstabilised float64 values (which stay below float64's exp(709)): the layer's
    outputs (the reference's h through the same per-head GroupNorm) and the final h itself."""
    heads, d, batch, time = 2, 4, 2, 9
    rec = zoo.get("slstm", d_model=d, n_heads=heads, d_conv=0, forget_gate=forget_gate, block=False)
    keys = jax.random.split(jax.random.key(7), 4)
    params = rec.init(keys[0], d)
    big_i, big_f = (200.0, 40.0) if forget_gate == "exp" else (400.0, 0.0)
    bias = jnp.stack([big_i + 20 * jax.random.uniform(keys[1], (d,)),
                      big_f + jax.random.normal(keys[2], (d,)), jnp.zeros(d), jnp.zeros(d)])
    params = dict(params, bias=bias, r=0.5 * params["r"])
    xs = jax.random.normal(keys[3], (batch, time, d), jnp.float32)
    hs, state = rec.apply(params, xs)
    assert all(bool(jnp.all(jnp.isfinite(s))) for s in (hs, *state))
    assert float(jnp.max(state[3])) > 88          # m ~ log of what c̄, n̄ hold: beyond float32's exp range
    # The reference: the layer's pre-activations computed here in float64, then the raw equations.
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(xs, np.float64).swapaxes(0, 1)                               # [T, B, D]
    pre = np.stack([np.stack([_blocks(x[t], p[f"w_{g}"]) for g in "ifzo"], 1) + p["bias"]
                    for t in range(time)])
    with np.errstate(over="raise"):
        want_h = _unstabilised_layer(pre, p["r"], heads, forget_gate)
    dh = d // heads
    want = np.concatenate([_layer_norm(want_h[..., k * dh:(k + 1) * dh], EPS) for k in range(heads)], -1)
    want = (want * p["out_norm_scale"]).swapaxes(0, 1)
    np.testing.assert_allclose(np.asarray(hs, np.float64), want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(state[0], np.float64), want_h[-1], rtol=1e-4, atol=1e-6)
    # The gradients are finite too (the stabiliser is differentiated through, not around).
    grads = jax.grad(lambda q: jnp.sum(rec.apply(q, xs)[0] ** 2))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("overrides, match", [
    ({"d_model": 0}, "d_model"),
    ({"d_model": 10, "n_heads": 4}, "multiple of n_heads"),
    ({"n_heads": 2.0}, "n_heads"),
    ({"d_conv": -1}, "d_conv"),
    ({"forget_gate": "tanh"}, "forget_gate"),
    ({"block": 1}, "block"),
    ({"ffn_proj_factor": -1.0}, "ffn_proj_factor"),
    ({"ffn_act": "tanh"}, "ffn_act"),
    ({"norm_eps": 0.0}, "norm_eps"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("slstm", **overrides)


def test_defaults_are_the_tiny_block():
    c = SLSTMConfig()
    assert (c.d_model, c.n_heads, c.d_head, c.d_conv, c.block) == (16, 2, 8, 4, True)
    assert dataclasses.replace(c, block=False).d_ffn == 0
    params = zoo.get("slstm").init(jax.random.key(0))
    # xlstm's forget-bias start for one block: 5 − 12 (a / (d − 1))^0.3 over each head's channels.
    ramp = np.linspace(0, 1, 8)
    bias = np.asarray(params["bias"])
    np.testing.assert_allclose(bias[1], np.tile(5 - 12 * ramp**0.3, 2), rtol=1e-6)
    np.testing.assert_array_equal(bias[[0, 2, 3]], 0.0)
