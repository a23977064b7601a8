"""LRU ("Resurrecting Recurrent Neural Networks for Long Sequences"): ring initialisation, γ
normalisation, and every mode against a complex128 numpy loop of the paper's equations.

Tolerances: float32 model against the complex128 loop over <= 12 steps with O(1) values: rtol = atol
= 1e-5. The variance test is statistical; its tolerances are set from the sample size (see there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.lru import eigenvalues

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN, D, N = 3, 12, 4, 5, 7


def loop(params, us, x0, reset=None, reverse=False):
    """x_k = λ x_{k-1} + γ (B u_k), y_k = Re(C x_k) + D u_k in complex128, one step at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    gamma = np.exp(p["gamma_log"]) if "gamma_log" in p else np.sqrt(1 - np.abs(lam) ** 2)
    b_mat = (p["b_re"] + 1j * p["b_im"]).T                         # the paper's B [N, d_in]
    c_mat = (p["c_re"] + 1j * p["c_im"]).T                         # the paper's C [D, N]
    skip = p["d_skip"]
    us = np.asarray(us, np.float64)
    x = np.asarray(x0[0], np.float64) + 1j * np.asarray(x0[1], np.float64)
    time = us.shape[1]
    ys = np.zeros(us.shape[:2] + (c_mat.shape[0],))
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        if reset is not None:
            flag = (reset[:, t + 1] if t + 1 < time else np.zeros(len(x), bool)) if reverse else reset[:, t]
            x[np.asarray(flag)] = 0.0
        u = us[:, t]
        x = lam * x + gamma * (u @ b_mat.T)
        ys[:, t] = (x @ c_mat.T).real + (u * skip if skip.ndim == 1 else u @ skip)
    return ys, x


def random_problem(seed, d_in=D_IN):
    rng = np.random.default_rng(seed)
    us = jnp.asarray(rng.normal(size=(B, T, d_in)), jnp.float32)
    x0 = tuple(jnp.asarray(rng.normal(size=(B, N)), jnp.float32) for _ in range(2))
    reset = rng.random((B, T)) < 0.2
    reset[1, 5] = True
    return us, x0, jnp.asarray(reset)


def perturbed(params, key):
    """Trained-looking params: γ off its tied value, so that learned γ is really exercised."""
    out = dict(params)
    if "gamma_log" in out:
        out["gamma_log"] = out["gamma_log"] + 0.3 * jax.random.normal(key, out["gamma_log"].shape)
    return out


@pytest.mark.parametrize("config", [
    dict(d_in=D, learn_gamma=True),
    dict(d_in=D_IN, learn_gamma=True),       # d_in != d_model: dense skip
    dict(d_in=D, learn_gamma=False, r_min=0.0, r_max=0.5, max_phase=0.3),
], ids=["paper", "other_input_width", "tied_gamma"])
def test_every_mode_matches_complex128_loop_with_reset_and_reverse(config):
    config = dict(config)
    d_in = config.pop("d_in")
    rec = zoo.get("lru", d_model=D, d_state=N, **config)
    params = perturbed(rec.init(jax.random.key(0), d_in), jax.random.key(1))
    assert ("gamma_log" in params) == config["learn_gamma"]
    us, x0, reset = random_problem(0, d_in)
    for reverse in (False, True):
        want_ys, want_x = loop(params, us, x0, np.asarray(reset), reverse)
        for mode in rec.modes:
            ys, (x_re, x_im) = rec.apply(params, us, state=x0, reset=reset, mode=mode, reverse=reverse)
            np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5, err_msg=f"{mode} {reverse}")
            np.testing.assert_allclose(x_re, want_x.real, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(x_im, want_x.imag, rtol=1e-5, atol=1e-5)
            assert x_re.dtype == x_im.dtype == jnp.float32
    x = x0
    for t in range(T):
        x, y = rec.step(params, x, us[:, t])
    want_ys, want_x = loop(params, us, x0)
    np.testing.assert_allclose(y, want_ys[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[0] + 1j * x[1], want_x, rtol=1e-5, atol=1e-5)


def test_ring_init_draws_eigenvalues_uniformly_on_the_ring():
    r_min, r_max, max_phase, n = 0.6, 0.95, 1.3, 20_000
    rec = zoo.get("lru", d_model=2, d_state=n, r_min=r_min, r_max=r_max, max_phase=max_phase)
    params = rec.init(jax.random.key(7), 2)
    lam_re, lam_im = (np.asarray(v, np.float64) for v in eigenvalues(params))
    modulus, phase = np.hypot(lam_re, lam_im), np.arctan2(lam_im, lam_re)
    # float32 rounding of nu_log/theta_log moves the edges by ~1e-6.
    assert modulus.min() >= r_min - 1e-5 and modulus.max() <= r_max + 1e-5
    assert phase.min() >= 0 and phase.max() <= max_phase + 1e-5
    # Uniform on the ring's area: |λ|² ~ U[r_min², r_max²], phase ~ U[0, max_phase]. Compare the
    # empirical CDFs with the uniform ones (Kolmogorov-Smirnov, 1.63/sqrt(n) is the 1% level).
    def ks(samples, lo, hi):
        s = np.sort((samples - lo) / (hi - lo))
        return np.max(np.abs(s - (np.arange(1, len(s) + 1) - 0.5) / len(s)))

    assert ks(modulus**2, r_min**2, r_max**2) < 1.63 / math.sqrt(n)
    assert ks(phase, 0.0, max_phase) < 1.63 / math.sqrt(n)
    gamma = np.exp(np.asarray(params["gamma_log"], np.float64))
    np.testing.assert_allclose(gamma, np.sqrt(1 - modulus**2), rtol=1e-5)


def test_gamma_normalisation_keeps_white_noise_state_variance_at_its_input_variance():
    # Closed form for unit white noise u: E|x_k,j|² = γ_j² s_j (1 - |λ_j|^{2k}) / (1 - |λ_j|²) with
    # s_j = Σ_i |B_ij|² = E|(B u)_j|². At γ_j² = 1 - |λ_j|² and k = 512, |λ|^{2k} <= 0.97^1024 ~ 3e-14,
    # so E|x|² = s_j: the state keeps the input's scale although 1/(1 - |λ|²) reaches 17.
    batch, time, d_in, n = 256, 512, 8, 32
    rec = zoo.get("lru", d_model=4, d_state=n, r_min=0.5, r_max=0.97)
    params = rec.init(jax.random.key(3), d_in)
    us = jax.random.normal(jax.random.key(4), (batch, time, d_in), jnp.float32)
    _, (x_re, x_im) = jax.jit(rec.apply)(params, us)
    power = np.mean(np.asarray(x_re, np.float64) ** 2 + np.asarray(x_im, np.float64) ** 2, axis=0)   # [N]
    s = np.sum(np.asarray(params["b_re"], np.float64) ** 2 + np.asarray(params["b_im"], np.float64) ** 2,
               axis=0)
    lam = np.hypot(*(np.asarray(v, np.float64) for v in eigenvalues(params)))
    gamma = np.exp(np.asarray(params["gamma_log"], np.float64))
    closed_form = gamma**2 * s * (1 - lam ** (2 * time)) / (1 - lam**2)
    np.testing.assert_allclose(closed_form, s, rtol=1e-4)
    # |x_j|² of a complex Gaussian is exponential: relative sd of a mean of 256 is 1/sqrt(256) = 6.25%.
    # Per channel allow 5 sd (31%); the average over the 32 channels has sd 1.1%, allow 5%.
    ratio = power / closed_form
    assert np.all(np.abs(ratio - 1) < 0.31), ratio
    assert abs(ratio.mean() - 1) < 0.05, ratio.mean()
    assert np.mean(s) == pytest.approx(1.0, abs=0.3)     # B's init gives E|B u|² = 1 on average
    assert (1 / (1 - lam**2)).max() > 10                 # without γ the variance would be this much larger


def test_bfloat16_compute_keeps_float32_state_and_eigenvalues_near_one():
    # |λ| = 0.999 would round to 1.0 in bfloat16; the decay must stay float32.
    rec = zoo.get("lru", d_model=D, d_state=N, r_min=0.998, r_max=0.999)
    params = rec.init(jax.random.key(5), D)
    us, x0, _ = random_problem(5, D)
    ys16, (x_re, x_im) = rec.apply(params, us.astype(jnp.bfloat16), state=x0)
    assert ys16.dtype == jnp.bfloat16 and x_re.dtype == x_im.dtype == jnp.float32
    want_ys, want_x = loop(params, us.astype(jnp.bfloat16).astype(jnp.float32), x0)
    np.testing.assert_allclose(np.asarray(ys16, np.float32), want_ys, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(x_re + 1j * x_im, want_x, rtol=2e-2, atol=2e-2)


def test_lru_config_rejects_a_ring_outside_the_unit_disc():
    with pytest.raises(ValueError, match="r_max"):
        zoo.get("lru", r_max=1.0)
    with pytest.raises(ValueError, match="r_min"):
        zoo.get("lru", r_min=0.95, r_max=0.9)
