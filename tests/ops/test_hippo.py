"""zoo.ops.hippo: the HiPPO matrices against their closed forms, their NPLR decompositions
reconstructed in float64, and the operators' meaning: integrating dc/dt = A c + B f tracks the
projection of f onto the basis over the measure's window.

Tolerances: the matrices are exact float64 formulas (1e-12). NPLR reconstruction goes through one
Hermitian eigendecomposition (1e-12 relative to the matrix scale). The memory tests integrate the
ODE with RK4 (step 5e-4, error ~1e-10) from the exact projection at the start, for inputs the basis
represents exactly (polynomials for Legendre, trigonometric polynomials for Fourier), so the
projection is tracked to 1e-8.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.polynomial import legendre

from zoo.ops import hippo

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

# --------------------------------------------------------------------------------------------
# Closed forms, element by element.


def legs_closed(n):
    a, b = np.zeros((n, n)), np.zeros(n)
    for i in range(n):
        b[i] = math.sqrt(2 * i + 1)
        for k in range(n):
            if i > k:
                a[i, k] = -math.sqrt(2 * i + 1) * math.sqrt(2 * k + 1)
            elif i == k:
                a[i, k] = -(i + 1)
    return a, b


def legt_closed(n, theta):
    """The LMU / HiPPO-LegT operator (A_ik = (2i+1)/θ · (−1 if i < k else (−1)^(i−k+1)),
    B_i = (2i+1)(−1)^i/θ) moved to the basis √(2i+1)(−1)^i P_i: A' = S A S⁻¹, S = diag((−1)^i/√(2i+1))."""
    a = np.zeros((n, n))
    b = np.zeros(n)
    for i in range(n):
        b[i] = (2 * i + 1) * (-1) ** i / theta
        for k in range(n):
            a[i, k] = (2 * i + 1) / theta * (-1.0 if i < k else (-1.0) ** (i - k + 1))
    s = np.diag([(-1) ** i / math.sqrt(2 * i + 1) for i in range(n)])
    return s @ a @ np.linalg.inv(s), s @ b


def lagt_closed(n, beta):
    return np.array([[-1.0 if i >= k else 0.0 for k in range(n)] for i in range(n)]), np.full(n, beta)


def fout_closed(n, theta):
    g = np.array([1.0] + [math.sqrt(2) if i % 2 else 0.0 for i in range(1, n)])
    a = -2 * np.outer(g, g)
    for k in range(1, (n - 1) // 2 + 1):
        a[2 * k - 1, 2 * k] += 2 * math.pi * k
        a[2 * k, 2 * k - 1] -= 2 * math.pi * k
    return a / theta, 2 * g / theta


@pytest.mark.parametrize("n", [1, 4, 7])
def test_transition_matrices_match_their_closed_forms(n):
    pairs = {
        "legs": (hippo.transition("legs", n), legs_closed(n)),
        "legt": (hippo.transition("legt", n, theta=1.7), legt_closed(n, 1.7)),
        "lagt": (hippo.transition("lagt", n, beta=0.6), lagt_closed(n, 0.6)),
        "fout": (hippo.transition("fout", n, theta=2.5), fout_closed(n, 2.5)),
    }
    for name, ((a, b), (a_ref, b_ref)) in pairs.items():
        np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("n", [4, 7, 8])
def test_rank_correction_makes_the_matrix_normal(measure, n):
    a, _ = hippo.transition(measure, n)
    p = hippo.rank_correction(measure, n)
    normal = a + p.T @ p
    np.testing.assert_allclose(normal @ normal.T, normal.T @ normal, atol=1e-9 * np.abs(normal).max() ** 2)
    skew = normal - np.mean(np.diag(normal)) * np.eye(n)
    np.testing.assert_allclose(skew, -skew.T, atol=1e-12)


def _full(r: hippo.NPLR, half: bool):
    if not half:
        return r
    cat = lambda x: np.concatenate([x, x.conj()], axis=-1)
    return hippo.NPLR(cat(r.lam), cat(r.p), cat(r.b), cat(r.v))


@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("n,half", [(4, True), (8, True), (7, False), (8, False)])
def test_nplr_reconstructs_the_matrix_in_float64(measure, n, half):
    r = hippo.nplr(measure, n, half=half)
    if half:
        assert r.lam.shape == (n // 2,) and np.all(r.lam.imag >= 0)
    f = _full(r, half)
    a, b = hippo.transition(measure, n)
    np.testing.assert_allclose(f.v.conj().T @ f.v, np.eye(n), atol=1e-12)
    rebuilt = f.v @ (np.diag(f.lam) - f.p.T @ f.p.conj()) @ f.v.conj().T
    np.testing.assert_allclose(rebuilt, a, atol=1e-12 * max(1.0, np.abs(a).max()))
    np.testing.assert_allclose(f.v @ f.b, b, atol=1e-12 * max(1.0, np.abs(b).max()))


def test_half_nplr_needs_an_even_zero_eigenspace():
    with pytest.raises(ValueError, match="even"):
        hippo.nplr("legs", 7, half=True)
    with pytest.raises(ValueError, match="measure"):
        hippo.transition("legx", 4)
    with pytest.raises(ValueError, match="n"):
        hippo.transition("legs", 0)


def test_diagonal_initialisers_match_the_s4d_formulas():
    m = 5
    np.testing.assert_allclose(hippo.s4d_lin(m), [-0.5 + 1j * math.pi * k for k in range(m)])
    big_n = 2 * m
    np.testing.assert_allclose(hippo.s4d_inv(m),
                               [-0.5 + 1j * big_n / math.pi * (big_n / (2 * k + 1) - 1) for k in range(m)])
    # HiPPO-N: the eigenvalues of LegS's normal part with Im >= 0, computed here by a general eig.
    a, _ = hippo.transition("legs", 2 * m)
    p = hippo.rank_correction("legs", 2 * m)
    eig = np.linalg.eigvals(a + p.T @ p)
    by_imag = lambda z: z[np.argsort(z.imag)]
    np.testing.assert_allclose(by_imag(hippo.hippo_n(2 * m)), by_imag(eig[eig.imag > 0]), rtol=1e-10)
    assert np.allclose(hippo.hippo_n(2 * m).real, -0.5)


# --------------------------------------------------------------------------------------------
# What the operators mean: online projection onto a basis.


def _rk4(rhs, c, t0, t1, steps):
    h, t = (t1 - t0) / steps, t0
    for _ in range(steps):
        k1 = rhs(t, c)
        k2 = rhs(t + h / 2, c + h / 2 * k1)
        k3 = rhs(t + h / 2, c + h / 2 * k2)
        k4 = rhs(t + h, c + h * k3)
        c, t = c + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
    return c


def _projection(f, basis, n, lo, hi):
    """c_k = (1/(hi−lo)) ∫_lo^hi f(s) g_k((s−lo)/(hi−lo)) ds, by the midpoint rule on 2e5 cells."""
    x = (np.arange(200_000) + 0.5) / 200_000
    vals = f(lo + (hi - lo) * x)
    return np.array([np.mean(vals * basis(k, x)) for k in range(n)])


def _legendre(k, x):
    return math.sqrt(2 * k + 1) * legendre.legval(2 * x - 1, [0] * k + [1])


def _fourier(k, x):
    if k == 0:
        return np.ones_like(x)
    freq = 2 * math.pi * ((k + 1) // 2) * x
    return math.sqrt(2) * (np.cos(freq) if k % 2 else np.sin(freq))


def _cubic(t):
    return 0.3 + 1.2 * t - 0.7 * t**2 + 0.4 * t**3


def test_legs_tracks_the_projection_of_the_whole_history():
    n = 6
    a, b = hippo.transition("legs", n)
    c0 = _projection(_cubic, _legendre, n, 0, 1)
    c = _rk4(lambda t, c: (a @ c + b * _cubic(t)) / t, c0, 1.0, 2.0, 2000)
    np.testing.assert_allclose(c, _projection(_cubic, _legendre, n, 0, 2), atol=1e-8)


def test_legt_tracks_the_projection_of_a_sliding_window():
    n, theta = 6, 1.3
    a, b = hippo.transition("legt", n, theta=theta)
    c0 = _projection(_cubic, _legendre, n, -theta, 0)
    c = _rk4(lambda t, c: a @ c + b * _cubic(t), c0, 0.0, 1.5, 3000)
    np.testing.assert_allclose(c, _projection(_cubic, _legendre, n, 1.5 - theta, 1.5), atol=1e-8)


def test_fout_tracks_the_projection_of_a_sliding_window():
    n, theta = 5, 1.0
    f = lambda t: 0.5 + np.sin(2 * math.pi * t + 0.3) + 0.3 * np.cos(4 * math.pi * t)
    a, b = hippo.transition("fout", n, theta=theta)
    c0 = _projection(f, _fourier, n, -theta, 0)
    c = _rk4(lambda t, c: a @ c + b * f(t), c0, 0.0, 1.37, 2740)
    want = _projection(f, _fourier, n, 1.37 - theta, 1.37)
    assert np.abs(want).max() > 0.3
    np.testing.assert_allclose(c, want, atol=1e-8)


@pytest.mark.parametrize("measure", ["legt", "lagt", "fout"])
def test_translated_measures_hold_a_constant_input_in_the_first_coefficient(measure):
    a, b = hippo.transition(measure, 7)
    np.testing.assert_allclose(-np.linalg.solve(a, b), np.eye(7)[0], atol=1e-12)
