"""s4, s4d, dss, lssl, s5, gss: each layer against a float64/complex128 numpy computation of its
paper's equations from the same params, plus initialisation and config checks.

Every reference below is written from the docstring equations with numpy only (a step loop or a
direct convolution sum); nothing is shared with zoo.ops.lti. Tolerance: the float32 model against
the float64 reference over T = 12 steps of O(1) values, rtol = atol = 2e-5 relative to the output
scale (float32 kernels, FFT and projections; the harness separately checks every mode against the
model's own step loop at 1e-5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.ops import hippo

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN = 2, 12, 5
RTOL = 2e-5


def _np(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _gelu(x):
    """GELU with the tanh approximation, as jax.nn.gelu computes by default."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _layer(p, x, ssm):
    """S4's layer: u = x W_in, y = SSM(u), out = GELU(y) W_out + b_out."""
    u = x @ p["w_in"] if "w_in" in p else x
    return _gelu(ssm(u)) @ p["w_out"] + p["b_out"]


def _direct_conv(u, k):
    """y[b, t, h] = Σ_{s<=t} k[h, t−s] u[b, s, h] as a plain double loop."""
    y = np.zeros_like(u)
    for t in range(u.shape[1]):
        for s in range(t + 1):
            y[:, t] += k[:, t - s] * u[:, s]
    return y


def _assert_close(got, want, what):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL,
                               atol=RTOL * np.abs(want).max(), err_msg=what)


def _inputs(seed, d_in=D_IN, t=T):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, t, d_in)), jnp.float32)


def _all_modes(rec, params, xs, want, what):
    for mode in rec.modes:
        ys, _ = rec.apply(params, xs, mode=mode)
        _assert_close(ys, want, f"{what} mode={mode}")


# --------------------------------------------------------------------------------------------
# S4D and DSS: the Vandermonde kernels written out.


@pytest.mark.parametrize("init", ["inv", "lin", "legs"])
@pytest.mark.parametrize("discretisation", ["zoh", "bilinear"])
def test_s4d_equals_its_kernel_convolution(init, discretisation):
    rec = zoo.get("s4d", init=init, discretisation=discretisation)
    params = rec.init(jax.random.key(0), D_IN)
    p = _np(params)
    lam = -np.exp(p["a_re_log"]) + 1j * p["a_im"]
    np.testing.assert_allclose(lam[0], hippo.diagonal_init(init, 4), rtol=1e-6)
    dt = np.exp(p["log_dt"])[:, None]
    if discretisation == "zoh":
        lam_bar, b_bar = np.exp(dt * lam), (np.exp(dt * lam) - 1) / lam
    else:
        lam_bar, b_bar = (1 + dt * lam / 2) / (1 - dt * lam / 2), dt / (1 - dt * lam / 2)
    w = (p["c_re"] + 1j * p["c_im"]) * b_bar * (p["b_re"] + 1j * p["b_im"])
    k = np.stack([2 * np.real(np.sum(w * lam_bar**l, axis=-1)) for l in range(T)], axis=-1)
    xs = _inputs(1)
    want = _layer(p, np.asarray(xs, np.float64), lambda u: _direct_conv(u, k) + p["d"] * u)
    _all_modes(rec, params, xs, want, f"s4d {init} {discretisation}")


def test_dss_equals_the_dss_exp_kernel():
    rec = zoo.get("dss")
    params = rec.init(jax.random.key(2), D_IN)
    p = _np(params)
    lam = -np.exp(p["a_re_log"]) + 1j * p["a_im"]
    np.testing.assert_allclose(lam, hippo.hippo_n(8), rtol=1e-6)
    dt = np.exp(p["log_dt"])[:, None]
    w_tilde = (p["w_re"] + 1j * p["w_im"]) * (np.exp(lam * dt) - 1) / lam
    k = np.stack([np.real(np.sum(w_tilde * np.exp(lam * dt * l), axis=-1)) for l in range(T)], axis=-1)
    xs = _inputs(3)
    want = _layer(p, np.asarray(xs, np.float64), lambda u: _direct_conv(u, k) + p["d"] * u)
    _all_modes(rec, params, xs, want, "dss")


# --------------------------------------------------------------------------------------------
# S4 and LSSL: the dense discretised recurrences, stepped in complex128 / float64.


def _dense_loop(a_bar, b_bar, c, d, u):
    """x_t = Ā x_{t−1} + B̄ u_t, y_t = Re(C x_t) + D u_t per channel, from x = 0."""
    x = np.zeros((u.shape[0], *b_bar.shape), a_bar.dtype)
    ys = np.zeros_like(u)
    for t in range(u.shape[1]):
        x = np.einsum("hnm,bhm->bhn", a_bar, x) + b_bar * u[:, t, :, None]
        ys[:, t] = np.real(np.einsum("hn,bhn->bh", c, x)) + d * u[:, t]
    return ys


def _bilinear(a, b, dt):
    lhs = np.eye(a.shape[-1]) - dt[:, None, None] / 2 * a
    return (np.linalg.solve(lhs, np.eye(a.shape[-1]) + dt[:, None, None] / 2 * a),
            np.linalg.solve(lhs, (dt[:, None] * b)[..., None])[..., 0])


def test_s4_equals_the_bilinear_dplr_recurrence_and_starts_at_hippo_legs():
    rec = zoo.get("s4")
    params = rec.init(jax.random.key(4), D_IN)
    p = _np(params)
    full = lambda x: np.concatenate([x, x.conj()], axis=-1)
    lam = full(-np.exp(p["lam_re_log"]) + 1j * p["lam_im"])
    pp, b, c = (full(p[f"{k}_re"] + 1j * p[f"{k}_im"]) for k in ("p", "b", "c"))
    a = np.stack([np.diag(lam[h]) - np.outer(pp[h], pp[h].conj()) for h in range(lam.shape[0])])
    # In the original basis the initial A and B are HiPPO-LegS: V A V* = A_LegS.
    v = full(hippo.nplr("legs", 8).v)
    a_legs, b_legs = hippo.transition("legs", 8)
    np.testing.assert_allclose(v @ a[0] @ v.conj().T, a_legs, atol=1e-5)
    np.testing.assert_allclose(v @ b[0], b_legs, atol=1e-5)
    a_bar, b_bar = _bilinear(a, b, np.exp(p["log_dt"]))
    xs = _inputs(5)
    want = _layer(p, np.asarray(xs, np.float64), lambda u: _dense_loop(a_bar, b_bar, c, p["d"], u))
    _all_modes(rec, params, xs, want, "s4")


def test_s4_conv_and_recurrent_agree_on_a_long_sequence():
    rec = zoo.get("s4")
    params = rec.init(jax.random.key(6), D_IN)
    xs = _inputs(7, t=300)
    y_conv, s_conv = rec.apply(params, xs, mode="conv")
    y_rec, s_rec = rec.apply(params, xs, mode="recurrent")
    _assert_close(y_conv, y_rec, "outputs")
    for a, b in zip(s_conv, s_rec, strict=True):
        _assert_close(a, b, "final state")


def test_lssl_equals_the_bilinear_dense_recurrence_and_starts_at_hippo_legs():
    rec = zoo.get("lssl")
    params = rec.init(jax.random.key(8), D_IN)
    p = _np(params)
    a_legs, b_legs = hippo.transition("legs", 8)
    np.testing.assert_allclose(p["a"], a_legs, rtol=1e-6)
    h = p["c"].shape[0]
    a_bar, b_bar = _bilinear(np.broadcast_to(p["a"], (h, 8, 8)), np.broadcast_to(p["b"], (h, 8)),
                             np.exp(p["log_dt"]))
    xs = _inputs(9)
    want = _layer(p, np.asarray(xs, np.float64), lambda u: _dense_loop(a_bar, b_bar, p["c"], p["d"], u))
    _all_modes(rec, params, xs, want, "lssl")


# --------------------------------------------------------------------------------------------
# GSS.


def test_gss_equals_its_gated_dss_equations():
    rec = zoo.get("gss")
    params = rec.init(jax.random.key(10), D_IN)
    p = _np(params)
    x = np.asarray(_inputs(11), np.float64)
    v = _gelu(x @ p["w_v"] + p["b_v"])
    u = _gelu(x @ p["w_u"] + p["b_u"])
    lam = -np.exp(p["a_re_log"]) + 1j * p["a_im"]
    dt = np.exp(p["log_dt"])[:, None]
    w_tilde = (p["w_re"] + 1j * p["w_im"]) * (np.exp(lam * dt) - 1) / lam
    k = np.stack([np.real(np.sum(w_tilde * np.exp(lam * dt * l), axis=-1)) for l in range(T)], axis=-1)
    y = _direct_conv(u, k) + p["d"] * u
    want = ((y @ p["w_y"] + p["b_y"]) * v) @ p["w_o"] + p["b_o"]
    _all_modes(rec, params, jnp.asarray(x, jnp.float32), want, "gss")


# --------------------------------------------------------------------------------------------
# S5: the MIMO complex recurrence, conjugate symmetry, step_rescale, irregular steps, bidirectional.


def s5_loop(p, x, *, conj_sym=True, step_rescale=1.0, time_input=False, reverse=False):
    """x_k = exp(ΛΔ_k) x_{k−1} + Λ⁻¹(exp(ΛΔ_k) − 1) B̃ u_k; y = (2 if conj_sym else 1) Re(C̃ x) + D u."""
    lam = -np.exp(p["lam_re_log"]) + 1j * p["lam_im"]
    b, c = p["b_re"] + 1j * p["b_im"], p["c_re"] + 1j * p["c_im"]
    dt = step_rescale * np.exp(p["log_dt"])
    u, tau = (x[..., :-1], x[..., -1]) if time_input else (x, np.ones(x.shape[:2]))
    state = np.zeros((x.shape[0], lam.shape[0]), complex)
    ys = np.zeros((*x.shape[:2], c.shape[0]))
    for t in (range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])):
        step = dt * tau[:, t, None]
        state = np.exp(lam * step) * state + (np.exp(lam * step) - 1) / lam * (u[:, t] @ b.T)
        direct = u[:, t] * p["d"] if p["d"].ndim == 1 else u[:, t] @ p["d"]
        ys[:, t] = (2 if conj_sym else 1) * np.real(state @ c.T) + direct
    return ys


@pytest.mark.parametrize("config", [
    {}, {"conj_sym": False}, {"blocks": 2, "step_rescale": 0.5}, {"discretisation": "zoh", "d_model": D_IN},
], ids=["default", "no_conj_sym", "blocks_rescaled", "square"])
def test_s5_equals_its_complex_recurrence(config):
    rec = zoo.get("s5", **config)
    params = rec.init(jax.random.key(12), D_IN)
    p = _np(params)
    keep = {k: config[k] for k in ("conj_sym", "step_rescale") if k in config}
    xs = _inputs(13)
    _all_modes(rec, params, xs, s5_loop(p, np.asarray(xs, np.float64), **keep), f"s5 {config}")
    lam = -np.exp(p["lam_re_log"]) + 1j * p["lam_im"]
    blocks = config.get("blocks", 1)
    half = config.get("conj_sym", True)
    want = np.concatenate([hippo.nplr("legs", 8 // blocks, half=half).lam] * blocks)
    np.testing.assert_allclose(lam, want, rtol=1e-5, atol=1e-5)


def test_s5_irregular_steps_read_the_time_channel():
    rec = zoo.get("s5", time_input=True)
    params = rec.init(jax.random.key(14), D_IN + 1)
    xs = np.asarray(_inputs(15, d_in=D_IN + 1), np.float64)
    xs[..., -1] = np.random.default_rng(16).uniform(0.1, 3.0, xs.shape[:2])     # elapsed times τ_k > 0
    want = s5_loop(_np(params), xs, time_input=True)
    _all_modes(rec, params, jnp.asarray(xs, jnp.float32), want, "s5 irregular")
    # τ = 1 everywhere is the regular S5 on the other channels.
    regular = zoo.get("s5")
    ones = xs.copy()
    ones[..., -1] = 1.0
    _assert_close(rec.apply(params, jnp.asarray(ones, jnp.float32))[0],
                  regular.apply(params, jnp.asarray(ones[..., :-1], jnp.float32))[0], "τ = 1")
    state, y0 = rec.step(params, rec.initial_state(params, B), jnp.asarray(xs[:, 0], jnp.float32))
    _assert_close(y0, want[:, 0], "step")


def test_bidirectional_s5_concatenates_a_forward_and_a_backward_pass():
    rec = zoo.bidirectional(zoo.get("s5"))
    params = rec.init(jax.random.key(17), D_IN)
    xs = _inputs(18)
    x64 = np.asarray(xs, np.float64)
    want = np.concatenate([s5_loop(_np(params["forward"]), x64),
                           s5_loop(_np(params["backward"]), x64, reverse=True)], axis=-1)
    for mode in rec.modes:
        _assert_close(rec.apply(params, xs, mode=mode)[0], want, f"bidirectional s5 mode={mode}")
    assert not rec.causal


# --------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("name,bad", [
    ("s4d", {"d_state": 7}), ("s4d", {"init": "random"}), ("s4d", {"discretisation": "euler"}),
    ("s4", {"d_state": 5}), ("s4", {"dt_min": 0.2, "dt_max": 0.1}), ("dss", {"d_state": 3}),
    ("lssl", {"d_model": 0}), ("gss", {"d_ssm": 0}), ("s5", {"blocks": 3}), ("s5", {"step_rescale": 0.0}),
    ("s5", {"d_state": 6, "blocks": 2}),
])
def test_bad_configs_raise_naming_the_field(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "dt_" not in next(iter(bad)) else "dt_min"):
        zoo.get(name, **bad)
