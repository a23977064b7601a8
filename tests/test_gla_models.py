"""gla, hgrn2, gateloop: each block against a float64 numpy loop of its equations written here.

The loops restate each layer from its paper and FLA's layer code (see the model docstrings): the
projections, the gates, the recurrence ``S_t = Diag(a_t) S_{t-1} + k_t v_tᵀ`` step by step (complex
for GateLoop), the readout and the output stage. They call nothing from zoo. The models run in
float32 from the same float32 weights and inputs, so the difference is float32 rounding: compared
at rtol 1e-4 and atol 1e-5 of each array's scale. Every mode runs with a random non-zero initial
state, segment resets and T not a multiple of the chunk. The harness (tests/test_harness.py) covers
step == apply, pieces, reverse, vmap, bfloat16 and malformed input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_loop_checks import short_conv

import zoo
from zoo.models import gateloop, gla, hgrn2

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")


# The harness checks every mode against the step loop; the loop of the paper's equations runs here in
# the sequential mode, and in the other modes with -m slow.
def _sequential_then_slow(modes):
    return [pytest.param(m, marks=() if m == "sequential" else pytest.mark.slow) for m in modes]


BATCH, T, D_IN = 2, 11, 6
MODES = ("chunked", "parallel", "sequential")       # "auto" is "chunked" (the harness runs it)

RESET = np.zeros((BATCH, T), bool)
RESET[0, 5] = True
RESET[1, [0, 8, 9]] = True


# --------------------------------------------------------------------------------------------
# float64 pieces.


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _silu(x):
    return x / (1 + np.exp(-x))


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _heads(x, h):
    return x.reshape(*x.shape[:-1], h, x.shape[-1] // h)


def _rms(x, eps):
    """RMS over the last axis, no scale."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _loop(q, k, v, log_a, S0, reset, scale):
    """o_t = scale · S_tᵀ q_t with S_t = Diag(exp(log_a_t)) S_{t-1} + k_t v_tᵀ per head; a reset zeroes
    the state before its step. q, k, log_a [B, T, H, K], v [B, T, H, V], S0 [B, H, K, V]."""
    S = S0.copy()
    o = np.zeros(v.shape, S.dtype)
    for t in range(q.shape[1]):
        S = np.where(reset[:, t, None, None, None], 0, S)
        S = np.exp(log_a[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def _close(got, want, what):
    want = np.asarray(want)
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def _data(rec, params, seed):
    k_x, k_s = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(k_x, (BATCH, T, D_IN), jnp.float32)
    leaves, tree = jax.tree.flatten(rec.initial_state(params, BATCH))
    keys = jax.random.split(k_s, len(leaves))
    noisy = [s + 0.5 * jax.random.normal(k, s.shape) for s, k in zip(leaves, keys, strict=True)]
    return xs, jax.tree.unflatten(tree, noisy)


def _randomised(params, key, names, centre):
    """Move the params that start constant (norm scales, biases) off their start, so each is tested."""
    keys = jax.random.split(key, len(names))
    return {**params, **{n: centre[n] + 0.3 * jax.random.normal(k, params[n].shape)
                         for n, k in zip(names, keys, strict=True)}}


_APPLY = {}


def _jitted_apply(rec):
    if rec not in _APPLY:
        _APPLY[rec] = jax.jit(rec.apply, static_argnames=("mode", "reverse"))
    return _APPLY[rec]


# --------------------------------------------------------------------------------------------
# gla


def _numpy_gla(p, c: gla.GLAConfig, xs, state, reset=RESET):
    h = c.n_heads
    q, k, v = (xs @ p[w] for w in ("w_q", "w_k", "w_v"))
    window, S0 = state if c.use_short_conv else (None, state)
    if c.use_short_conv:      # FLA's ShortConvolution: depthwise causal taps, then SiLU, per projection
        split = np.cumsum([q.shape[-1], k.shape[-1]])
        convolved, window = short_conv(np.concatenate([q, k, v], -1), p["conv_kernel"], p.get("conv_bias"),
                                         window, reset)
        q, k, v = np.split(_silu(convolved), split, axis=-1)
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    g = _log_sigmoid((xs @ p["w_gk1"]) @ p["w_gk2"] + p["b_gk"]) / c.gate_logit_normalizer
    if c.clamp_min is not None:
        g = np.maximum(g, c.clamp_min)
    o, S = _loop(q, k, v, _heads(g, h), S0, reset, q.shape[-1] ** -0.5)
    y = (_rms(o, c.norm_eps) * p["norm_scale"]).reshape(*xs.shape[:2], -1)
    if c.use_output_gate:
        y = y * _silu(xs @ p["w_g"])
    return y @ p["w_o"], ((window, S) if c.use_short_conv else S)


GLA_CONFIGS = {
    "clamped": dict(d_model=8, n_heads=2, expand_k=1.0, expand_v=1.0, gate_low_rank_dim=3,
                    gate_logit_normalizer=4.0, clamp_min=-0.2, chunk_size=4),
    "fla-widths-no-gate": dict(d_model=16, n_heads=4, gate_low_rank_dim=2, use_output_gate=False,
                               chunk_size=4),
    "short-conv": dict(d_model=8, n_heads=2, expand_k=1.0, gate_low_rank_dim=2, use_short_conv=True,
                       conv_size=3, conv_bias=True, chunk_size=4),
}


@pytest.mark.parametrize("mode", _sequential_then_slow(MODES))
@pytest.mark.parametrize("name", list(GLA_CONFIGS))
def test_gla_apply_matches_a_float64_loop_of_the_layer(name, mode):
    config = gla.GLAConfig(**GLA_CONFIGS[name])
    rec = zoo.get("gla", **GLA_CONFIGS[name])
    params = rec.init(jax.random.key(0), D_IN)
    params = _randomised(params, jax.random.key(1), ["norm_scale", "b_gk"],
                         {"norm_scale": 1.0, "b_gk": -1.0})
    xs, state = _data(rec, params, 2)
    ys, final = _jitted_apply(rec)(params, xs, state=state, reset=jnp.asarray(RESET), mode=mode)
    want, want_final = _numpy_gla(_f64(params), config, _f64(xs), _f64(state))
    _close(ys, want, "outputs")
    for got, expected in zip(jax.tree.leaves(final), jax.tree.leaves(want_final), strict=True):
        _close(got, expected, "final state")
    if config.clamp_min is not None:      # the floor must be active somewhere for the case to test it
        g = _log_sigmoid(_f64((xs @ params["w_gk1"]) @ params["w_gk2"] + params["b_gk"]))
        assert np.mean(g / config.gate_logit_normalizer < config.clamp_min) > 0.05


def test_gla_short_conv_step_by_step_matches_the_float64_loop():
    """The harness folds step against apply for the registered defaults (no convolution): here the
    convolution's window is carried by ``step``, token by token, from a random window and state."""
    config = gla.GLAConfig(**GLA_CONFIGS["short-conv"])
    rec = zoo.get("gla", **GLA_CONFIGS["short-conv"])
    params = rec.init(jax.random.key(3), D_IN)
    xs, state = _data(rec, params, 4)
    step = jax.jit(rec.step)
    outputs = []
    carried = state
    for t in range(T):
        carried, y_t = step(params, carried, xs[:, t])
        outputs.append(y_t)
    want, want_final = _numpy_gla(_f64(params), config, _f64(xs), _f64(state), np.zeros((BATCH, T), bool))
    _close(jnp.stack(outputs, axis=1), want, "outputs")
    for got, expected in zip(jax.tree.leaves(carried), jax.tree.leaves(want_final), strict=True):
        _close(got, expected, "final state")


# --------------------------------------------------------------------------------------------
# hgrn2


def _log_forget(f_pre, lower_bound):
    """log(γ + (1 - γ) σ(f̃)), the forget gate with its lower bound."""
    return np.log(lower_bound + (1 - lower_bound) / (1 + np.exp(-f_pre)))


def _numpy_hgrn2(p, c: hgrn2.HGRN2Config, xs, S0):
    h = c.n_heads
    q = _heads(_silu(xs @ p["w_q"]), h)
    i = _heads(xs @ p["w_i"], h)
    log_f = _heads(_log_forget(xs @ p["w_f"], c.lower_bound), h)
    o, S = _loop(q, 1 - np.exp(log_f), i, log_f, S0, RESET, c.expand_ratio ** -0.5)
    y = _rms(o.reshape(*xs.shape[:2], -1), c.norm_eps) * p["norm_scale"]      # one RMS over all heads
    return y @ p["w_o"], S


HGRN2_CONFIGS = {
    "no-bound": dict(d_model=8, n_heads=2, expand_ratio=4, chunk_size=4),
    "bound-0.6": dict(d_model=12, n_heads=3, expand_ratio=2, lower_bound=0.6, chunk_size=4),
}


@pytest.mark.parametrize("mode", _sequential_then_slow(MODES))
@pytest.mark.parametrize("name", list(HGRN2_CONFIGS))
def test_hgrn2_apply_matches_a_float64_loop_of_the_layer(name, mode):
    config = hgrn2.HGRN2Config(**HGRN2_CONFIGS[name])
    rec = zoo.get("hgrn2", **HGRN2_CONFIGS[name])
    params = rec.init(jax.random.key(3), D_IN)
    params = _randomised(params, jax.random.key(4), ["norm_scale"], {"norm_scale": 1.0})
    xs, state = _data(rec, params, 5)
    ys, final = _jitted_apply(rec)(params, xs, state=state, reset=jnp.asarray(RESET), mode=mode)
    want, want_final = _numpy_hgrn2(_f64(params), config, _f64(xs), _f64(state))
    _close(ys, want, "outputs")
    _close(final, want_final, "final state")


@pytest.mark.parametrize("lower_bound", [0.0, 0.3, 0.9])
def test_hgrn2_forget_gate_respects_its_lower_bound(lower_bound):
    """f = exp(log f) lies in [γ, 1] for preactivations of any size (here up to ±60), equals the
    closed form, and reaches γ when σ(f̃) -> 0: the bound is attained, not just respected."""
    params = {"w_f": jnp.eye(4, dtype=jnp.float32)}
    f_pre = 20.0 * jax.random.normal(jax.random.key(6), (3, 50, 4), jnp.float32)
    f_pre = f_pre.at[0, 0, 0].set(-60.0).at[0, 0, 1].set(60.0)
    f = np.exp(np.asarray(hgrn2.log_forget(params, f_pre, lower_bound), np.float64))
    assert np.all(f >= lower_bound * (1 - 1e-6)) and np.all(f <= 1.0)
    np.testing.assert_allclose(f, np.exp(_log_forget(_f64(f_pre), lower_bound)), rtol=1e-6)
    np.testing.assert_allclose(f[0, 0, 0], lower_bound, atol=1e-6)


def test_hgrn2_with_a_lower_bound_keeps_that_fraction_of_its_state_per_step():
    """Forget as hard as the gate allows and add nothing: after t steps the state is exactly γ^t S_0."""
    gamma, steps = 0.9, 5
    rec = zoo.get("hgrn2", lower_bound=gamma)
    p = rec.init(jax.random.key(7), D_IN)
    p = {**p, "w_f": -30.0 * jnp.abs(p["w_f"]), "w_i": jnp.zeros_like(p["w_i"])}
    xs = jnp.abs(jax.random.normal(jax.random.key(8), (1, steps, D_IN), jnp.float32))
    S0 = jnp.ones_like(rec.initial_state(p, 1))
    _, final = rec.apply(p, xs, state=S0, mode="sequential")
    np.testing.assert_allclose(np.asarray(final), gamma ** steps, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# gateloop


def _numpy_gateloop(p, c: gateloop.GateLoopConfig, xs, state):
    h = c.n_heads
    q, k, v = (_heads(xs @ p[w], h) for w in ("w_q", "w_k", "w_v"))
    log_a = _heads(_log_sigmoid(xs @ p["w_a"]) + 1j * (xs @ p["w_theta"]), h)
    S0 = state[0] + 1j * state[1]
    o, S = _loop(q.astype(complex), k.astype(complex), v.astype(complex), log_a, S0, RESET, 1.0)
    o = o.real
    centred = o - np.mean(o, axis=-1, keepdims=True)                             # LayerNorm per head
    y = _rms(centred, c.norm_eps).reshape(*xs.shape[:2], -1) * p["norm_scale"] + p["norm_bias"]
    return (y * _silu(xs @ p["w_g"])) @ p["w_o"], (S.real, S.imag)


GATELOOP_CONFIGS = {
    "two-heads": dict(d_model=8, n_heads=2, expand_v=0.5, chunk_size=4),
    "vector-state": dict(d_model=6, n_heads=6, chunk_size=4),     # one-dimensional heads
}


@pytest.mark.parametrize("mode", _sequential_then_slow(MODES))
@pytest.mark.parametrize("name", list(GATELOOP_CONFIGS))
def test_gateloop_apply_matches_a_float64_complex_loop_of_the_layer(name, mode):
    config = gateloop.GateLoopConfig(**GATELOOP_CONFIGS[name])
    rec = zoo.get("gateloop", **GATELOOP_CONFIGS[name])
    params = rec.init(jax.random.key(9), D_IN)
    params = _randomised(params, jax.random.key(10), ["norm_scale", "norm_bias"],
                         {"norm_scale": 1.0, "norm_bias": 0.0})
    xs, state = _data(rec, params, 11)
    ys, final = _jitted_apply(rec)(params, xs, state=state, reset=jnp.asarray(RESET), mode=mode)
    want, want_final = _numpy_gateloop(_f64(params), config, _f64(xs), _f64(state))
    _close(ys, want, "outputs")
    _close(final[0], want_final[0], "final state, real part")
    _close(final[1], want_final[1], "final state, imaginary part")
    assert np.max(np.abs(want_final[1])) > 0.1 * np.max(np.abs(want_final[0])), "the phases must matter"


# --------------------------------------------------------------------------------------------
# Configs that cannot work.


@pytest.mark.parametrize("name,bad,match", [
    ("gla", {"d_model": 10, "n_heads": 4}, "expand_k"),          # key width 5 over 4 heads
    ("gla", {"expand_v": 0.01}, "expand_v"),                     # value width int(0.16) = 0
    ("gla", {"gate_logit_normalizer": 0.0}, "gate_logit_normalizer"),
    ("gla", {"gate_low_rank_dim": 0}, "gate_low_rank_dim"),
    ("gla", {"clamp_min": 0.5}, "clamp_min"),
    ("gla", {"chunk_size": 0}, "chunk_size"),
    ("gla", {"conv_size": 0}, "conv_size"),
    ("gla", {"use_short_conv": "yes"}, "use_short_conv"),
    ("hgrn2", {"d_model": 10, "n_heads": 4}, "n_heads"),
    ("hgrn2", {"lower_bound": 1.0}, "lower_bound"),
    ("hgrn2", {"lower_bound": -0.1}, "lower_bound"),
    ("hgrn2", {"expand_ratio": 0}, "expand_ratio"),
    ("gateloop", {"n_heads": 3}, "n_heads"),
    ("gateloop", {"expand_k": -1.0}, "expand_k"),
    ("gateloop", {"norm_eps": 0.0}, "norm_eps"),
])
def test_config_that_cannot_work_raises(name, bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get(name, **bad)


# --------------------------------------------------------------------------------------------
# The decode stack: four residual gla blocks whose step carries every layer's state.


def test_four_layer_gla_stack_decodes_one_token_at_a_time_at_batch_one():
    rec = zoo.stack(*[zoo.residual(zoo.get("gla", d_model=16))] * 4)
    params = rec.init(jax.random.key(12), 16)
    xs = jax.random.normal(jax.random.key(13), (1, 7, 16), jnp.float32)
    want, final = rec.apply(params, xs, mode="chunked")
    state = rec.initial_state(params, 1)
    assert len(state) == 4 and all(s.shape == (1, 2, 4, 8) for s in state)
    step = jax.jit(rec.step)
    got = []
    for t in range(xs.shape[1]):
        state, y_t = step(params, state, xs[:, t])
        got.append(y_t)
    _close(jnp.stack(got, axis=1), np.asarray(want, np.float64), "outputs")
    for layer, (s, f) in enumerate(zip(state, final, strict=True)):
        _close(s, np.asarray(f, np.float64), f"state of layer {layer}")
