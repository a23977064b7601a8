"""zoo.ops.lti: discretisations against their closed forms, every kernel against the naive
``C Ā^l B̄``, and every mode against an independent numpy loop of the recurrence, all in float64.

Tolerances: float64 computations agree to 1e-10 relative (the algorithms differ only in rounding;
the Cauchy/Woodbury kernel and ``(I + E)^L − I`` lose a few more digits than a plain product, hence
1e-10 rather than 1e-13). The float32 tests state their own tolerances.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from zoo.ops import hippo, lti

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, H, M = 2, 9, 3, 4          # M complex entries per channel (a real state of 2M)


def _cplx(rng, *shape):
    return rng.normal(size=shape) + 1j * rng.normal(size=shape)


def _systems(seed, dt_range=(1e-2, 0.5)):
    """One random system of each kind, in float64, plus its numpy description for the loops."""
    rng = np.random.default_rng(seed)
    delta = np.exp(rng.uniform(*np.log(dt_range), H))
    lam = np.tile(hippo.hippo_n(2 * M), (H, 1)) + 0.05 * _cplx(rng, H, M)
    lam = -np.abs(lam.real) + 1j * lam.imag
    b, c, d = _cplx(rng, H, M), _cplx(rng, H, M), rng.normal(size=H)
    log_a, b_scale = lti.discretise_diagonal(jnp.asarray(lam), jnp.asarray(delta)[:, None], "zoh")
    diag = lti.DiagonalSSM(log_a, b_scale * b, jnp.asarray(c), jnp.asarray(d))
    diag_np = ("diag", np.exp(lam * delta[:, None]), (np.exp(lam * delta[:, None]) - 1) / lam * b, c, d)

    a_c, b_c = hippo.transition("legs", 2 * M)
    a_c = a_c + 0.1 * rng.normal(size=a_c.shape)
    eye = np.eye(2 * M)
    a_bar = np.stack([np.linalg.solve(eye - dt / 2 * a_c, eye + dt / 2 * a_c) for dt in delta])
    b_bar = np.stack([np.linalg.solve(np.eye(2 * M) - dt / 2 * a_c, dt * b_c) for dt in delta])
    c_r = rng.normal(size=(H, 2 * M))
    dense = lti.DenseSSM(jnp.asarray(a_bar), jnp.asarray(b_bar), jnp.asarray(c_r), jnp.asarray(d))
    dense_np = ("dense", a_bar, b_bar, c_r, d)

    nplr = hippo.nplr("legs", 2 * M)
    p = np.tile(nplr.p[0], (H, 1)) * (1 + 0.1 * rng.normal(size=(H, M)))
    lam_s4 = np.tile(nplr.lam, (H, 1))
    dplr = lti.DplrSSM(*(jnp.asarray(x) for x in (lam_s4, p, b, c, delta, d)))
    full = lambda x: np.concatenate([x, x.conj()], axis=-1)
    a_f = np.stack([np.diag(full(lam_s4[h])) - np.outer(full(p[h]), full(p[h]).conj()) for h in range(H)])
    lhs = np.eye(2 * M) - delta[:, None, None] / 2 * a_f
    a_bar_f = np.linalg.solve(lhs, np.eye(2 * M) + delta[:, None, None] / 2 * a_f)
    b_bar_f = np.linalg.solve(lhs, (delta[:, None] * full(b))[..., None])[..., 0]
    dplr_np = ("dplr", a_bar_f, b_bar_f, full(c), d)
    return [(diag, diag_np), (dense, dense_np), (dplr, dplr_np)]


def numpy_loop(desc, u, x0, reset=None, reverse=False):
    """x_t = Ā x_{t-1} + B̄ u_t, y_t = Re(C x_t) + D u_t, one step at a time (complex128 / float64).

    The DPLR system runs on the full conjugate-doubled state in its eigenbasis (its own Ā, not the
    engine's real form); the diagonal one on the complex state; the dense one on the real state.
    """
    kind, a_bar, b_bar, c, d = desc
    u = np.asarray(u, np.float64)
    if kind == "dense":
        x = np.asarray(x0, np.float64).copy()
    else:
        x = np.asarray(x0[0], np.float64) + 1j * np.asarray(x0[1], np.float64)
        if kind == "dplr":
            x = np.concatenate([x, x.conj()], axis=-1)
    time = u.shape[1]
    ys = np.zeros(u.shape)
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        if reset is not None:
            flag = (reset[:, t + 1] if t + 1 < time else np.zeros(len(x), bool)) if reverse else reset[:, t]
            x = np.where(np.asarray(flag)[:, None, None], 0.0, x)
        if kind == "diag":
            x = a_bar * x + b_bar * u[:, t, :, None]
        else:
            x = np.einsum("hnm,bhm->bhn", a_bar, x) + b_bar * u[:, t, :, None]
        ys[:, t] = np.real(np.einsum("hn,bhn->bh", c, x)) + d * u[:, t]
    m = x.shape[-1] // 2
    if kind == "dplr":
        x = x[..., :m]
    final = x if kind == "dense" else (x.real, x.imag)
    return ys, final


def _random_inputs(seed, system):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(B, T, H))
    x0 = jax.tree.map(lambda z: rng.normal(size=z.shape), lti.zero_state(system, B))
    reset = rng.random((B, T)) < 0.25
    reset[0, 4] = True
    return u, x0, reset


def _close(got, want, rtol, atol=0.0):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol + rtol * np.abs(w).max())


# --------------------------------------------------------------------------------------------
# Discretisation.


def test_discretisations_match_their_closed_forms():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        n, delta = 5, 0.37
        a = rng.normal(size=(n, n)) - 2 * np.eye(n)
        b = rng.normal(size=n)
        a_bar, b_bar = lti.discretise_dense(jnp.asarray(a), jnp.asarray(b), delta, "zoh")
        np.testing.assert_allclose(a_bar, scipy.linalg.expm(delta * a), rtol=1e-12)
        np.testing.assert_allclose(b_bar, np.linalg.solve(a, (scipy.linalg.expm(delta * a) - np.eye(n)) @ b),
                                   rtol=1e-10)
        a_bar, b_bar = lti.discretise_dense(jnp.asarray(a), jnp.asarray(b), delta, "bilinear")
        lhs = np.linalg.inv(np.eye(n) - delta / 2 * a)
        np.testing.assert_allclose(a_bar, lhs @ (np.eye(n) + delta / 2 * a), rtol=1e-12)
        np.testing.assert_allclose(b_bar, lhs @ (delta * b), rtol=1e-12)

        lam = -rng.uniform(0.1, 1, n) + 1j * rng.normal(size=n)
        log_a, b_scale = lti.discretise_diagonal(jnp.asarray(lam), delta, "zoh")
        np.testing.assert_allclose(np.exp(log_a), np.exp(delta * lam), rtol=1e-13)
        np.testing.assert_allclose(b_scale, (np.exp(delta * lam) - 1) / lam, rtol=1e-13)
        log_a, b_scale = lti.discretise_diagonal(jnp.asarray(lam), delta, "bilinear")
        np.testing.assert_allclose(np.exp(log_a), (1 + delta / 2 * lam) / (1 - delta / 2 * lam), rtol=1e-13)
        np.testing.assert_allclose(b_scale, delta / (1 - delta / 2 * lam), rtol=1e-13)
        with pytest.raises(ValueError, match="discretisation"):
            lti.discretise_diagonal(jnp.asarray(lam), delta, "euler")


# --------------------------------------------------------------------------------------------
# Kernels and the convolution.


def _naive_kernel(desc, length):
    kind, a_bar, b_bar, c, _ = desc
    out = np.zeros((H, length))
    for h in range(H):
        a_h = np.diag(a_bar[h]) if kind == "diag" else a_bar[h]
        x = b_bar[h]
        for l in range(length):
            out[h, l] = np.real(c[h] @ x)
            x = a_h @ x
    return out


@pytest.mark.parametrize("length", [1, 8, 9, 64])
def test_kernels_equal_the_naive_powers_in_float64(length):
    with jax.enable_x64(True):
        for system, desc in _systems(1):
            _close(lti.kernel(system, length), _naive_kernel(desc, length), 1e-10, 1e-12)


def test_fft_convolution_equals_the_direct_sum():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        u, k = rng.normal(size=(B, 13, H)), rng.normal(size=(H, 13))
        direct = np.zeros_like(u)
        for t in range(13):
            for s in range(t + 1):
                direct[:, t] += k[:, t - s] * u[:, s]
        _close(lti.causal_conv(jnp.asarray(u), jnp.asarray(k)), direct, 1e-12)


# --------------------------------------------------------------------------------------------
# Every mode equals the numpy loop; gradients equal the step loop's.


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["no_reset", "reset"])
def test_every_mode_equals_the_numpy_loop_in_float64(reverse, with_reset):
    with jax.enable_x64(True):
        for system, desc in _systems(3):
            u, x0, reset = _random_inputs(4, system)
            reset = reset if with_reset else None
            want = numpy_loop(desc, u, x0, reset, reverse)
            for mode in lti.modes_of(system):
                got = lti.apply(system, jnp.asarray(u), initial_state=x0, reset=reset, reverse=reverse,
                                mode=mode)
                _close(got, want, 1e-10, 1e-12)
            _close(lti.reference(system, jnp.asarray(u), initial_state=x0, reset=reset, reverse=reverse),
                   want, 1e-10, 1e-12)


# About a minute on 2 cores (running, not compiling): the harness checks every LTI model's gradients
# in every mode and direction against its step loop in float32; `pytest -m slow` runs this float64
# check (reverse repeats forward on flipped inputs).
@pytest.mark.slow
@pytest.mark.parametrize("reverse", [pytest.param(False, id="forward"), pytest.param(True, id="reverse")])
def test_every_mode_has_the_step_loops_gradients_in_float64(reverse):
    with jax.enable_x64(True):
        for system, _ in _systems(5):
            u, x0, _ = _random_inputs(6, system)
            rng = np.random.default_rng(7)
            w_y = rng.normal(size=u.shape)
            w_x = jax.tree.map(lambda z, rng=rng: rng.normal(size=z.shape), x0)

            def loss(system, u, x0, fn, w_y=w_y, w_x=w_x):
                y, final = fn(system, u, initial_state=x0, reverse=reverse)
                pairs = zip(jax.tree.leaves(final), jax.tree.leaves(w_x), strict=True)
                return jnp.sum(y * w_y) + sum(jnp.sum(f * w) for f, w in pairs)

            grad = lambda fn: jax.grad(functools.partial(loss, fn=fn), argnums=(0, 1, 2))
            want = grad(lti.reference)(system, jnp.asarray(u), x0)
            for mode in lti.modes_of(system):
                got = grad(functools.partial(lti.apply, mode=mode))(system, jnp.asarray(u), x0)
                _close(got, want, 1e-9, 1e-12)


def test_dplr_conv_in_float32_keeps_small_steps_accurate_over_long_kernels():
    """Δ = 1e-3 makes Ā ≈ I; C̃ = C(I − Ā^L) from a rounded Ā would lose ~3 digits. In float32 the
    kernel stays within 2e-5 of the float64 naive powers relative to its largest entry."""
    systems = _systems(8, dt_range=(1e-3, 2e-3))
    system, desc = systems[2]
    system32 = jax.tree.map(lambda x: x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32), system)
    for length in (9, 256):
        _close(lti.kernel(system32, length), _naive_kernel(desc, length), 2e-5)


def test_malformed_inputs_raise_errors_naming_the_argument():
    system, _ = _systems(9)[0]
    u = jnp.zeros((B, T, H))
    with pytest.raises(ValueError, match="u has shape"):
        lti.apply(system, jnp.zeros((B, T, H + 1)))
    with pytest.raises(ValueError, match="state"):
        lti.apply(system, u, initial_state=(jnp.zeros((B, H, M + 1)),) * 2)
    with pytest.raises(ValueError, match="mode"):
        lti.apply(system, u, mode="recurrent")
    with pytest.raises(ValueError, match="reset"):
        lti.apply(system, u, reset=jnp.zeros((B, T - 1), bool))
    with pytest.raises(ValueError, match="float"):
        lti.apply(system, u.astype(jnp.int32))
