"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) forms, and diagonal initialisers.

Papers:

* A. Gu, T. Dao, S. Ermon, A. Rudra, C. Ré, "HiPPO: Recurrent Memory with Optimal Polynomial
  Projections" (NeurIPS 2020): the LegS, LegT and LagT operators.
* A. Gu, K. Goel, C. Ré, "Efficiently Modeling Long Sequences with Structured State Spaces"
  (ICLR 2022): every HiPPO matrix is normal plus low rank, ``A = V (Λ − P̃ P̃*) V*`` (Theorem 1).
* A. Gu, I. Johnson, A. Timalsina, A. Rudra, C. Ré, "How to Train Your HiPPO: State Space Models
  with Generalized Orthogonal Basis Projections" (ICLR 2023): the translated Fourier operator FouT.
* A. Gu, K. Goel, A. Gupta, C. Ré, "On the Parameterization and Initialization of Diagonal State
  Space Models" (NeurIPS 2022): the S4D-Lin and S4D-Inv eigenvalues, and the diagonal part of the
  LegS NPLR form ("HiPPO-N", also the initialiser of DSS and S5).

Every matrix here is written for ``dx/dt = A x + B u`` (the sign of A already included, so the
stable matrices have eigenvalues in the left half plane) in float64 numpy: they are initialisers,
computed once from ``N`` before any tracing. Their closed forms (n, k = 0 … N−1)::

    legs  A_nk = −√(2n+1)√(2k+1) (n > k),  −(n+1) (n = k),  0 (n < k);    B_n = √(2n+1)
    legt  A_nk = −√(2n+1)√(2k+1)/θ · (1 if n ≥ k else (−1)^(n−k));          B_n = √(2n+1)/θ
    lagt  A_nk = −1 (n ≥ k), 0 (n < k);                                      B_n = β
    fout  A = (J − 2 g gᵀ)/θ,   B = 2 g/θ,   basis 1, √2 cos(2πkx/θ), √2 sin(2πkx/θ) at indices
          0, 2k−1, 2k;  g = (1, √2, 0, √2, 0, …) (the basis at the window's end);
          J_{2k−1,2k} = 2πk, J_{2k,2k−1} = −2πk

Low-rank corrections ``P`` [r, N] such that ``A + Pᵀ P`` (sum over the rank) is normal, namely a
multiple of the identity plus a skew-symmetric matrix::

    legs  P = √(n + 1/2)                    A + PPᵀ = −I/2 + skew
    legt  P = (√(2n+1)/√θ on even n, 0 on odd n), (0 on even n, √(2n+1)/√θ on odd n)   A + PPᵀ = skew
    lagt  P = 1/√2                          A + PPᵀ = −I/2 + skew
    fout  P = √(2/θ) g                      A + PPᵀ = J/θ (skew)

What differs from the papers' and the S4 repository's conventions, and why:

* LegT is the HiPPO paper's (the Legendre Memory Unit's) operator in the orthonormal basis: the
  basis scaled by ``√(2n+1)`` and signed by ``(−1)^n``, which makes B positive and the NPLR form
  exact. The state-spaces/s4 repository halves it, which is this matrix at ``θ = 2``.
* LagT is the HiPPO paper's (A = −tril(1)). The S4 repository's ``lagt`` adds ``I/2`` (a tilted
  measure); both have the same ``P`` and the same skew part.
* FouT is derived for a window of length θ with the orthonormal basis above; the state-spaces/s4
  repository's ``fout`` uses another layout (a zero sine of frequency 0 at index 1) and half the
  frequencies (the window θ = 2, as for its LegT).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MEASURES = ("legs", "legt", "lagt", "fout")


def _check(measure: str, n: int) -> None:
    if measure not in MEASURES:
        raise ValueError(f"hippo: measure={measure!r}; choose one of {MEASURES}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"hippo: n (the state size) must be a positive int, got {n!r}")


def _fourier_boundary(n: int) -> np.ndarray:
    """g: the FouT basis functions evaluated at the ends of the window (sines vanish there)."""
    g = np.zeros(n)
    g[0] = 1.0
    g[1::2] = np.sqrt(2.0)
    return g


def _fourier_skew(n: int) -> np.ndarray:
    j = np.zeros((n, n))
    for k in range(1, (n - 1) // 2 + 1):
        j[2 * k - 1, 2 * k] = 2 * np.pi * k
        j[2 * k, 2 * k - 1] = -2 * np.pi * k
    return j


def transition(measure: str, n: int, *, theta: float = 1.0, beta: float = 1.0):
    """(A [n, n], B [n]) of the HiPPO operator ``measure`` for ``dx/dt = A x + B u`` (float64).

    ``theta`` is the window length of the translated measures (legt, fout); ``beta`` scales the
    input of lagt. See the module docstring for the closed forms.
    """
    _check(measure, n)
    q = np.arange(n, dtype=np.float64)
    r = np.sqrt(2 * q + 1)
    row, col = q[:, None], q[None, :]
    if measure == "legs":
        a = -np.where(row > col, r[:, None] * r[None, :], 0.0) - np.diag(q + 1)
        b = r.copy()
    elif measure == "legt":
        sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
        a = -r[:, None] * r[None, :] * sign / theta
        b = r / theta
    elif measure == "lagt":
        a = -np.tril(np.ones((n, n)))
        b = beta * np.ones(n)
    else:
        g = _fourier_boundary(n)
        a = (_fourier_skew(n) - 2 * np.outer(g, g)) / theta
        b = 2 * g / theta
    return a, b


def rank_correction(measure: str, n: int, *, theta: float = 1.0) -> np.ndarray:
    """P [r, n] (r = 2 for legt, else 1) such that ``A + Pᵀ P`` is normal (float64)."""
    _check(measure, n)
    q = np.arange(n, dtype=np.float64)
    if measure == "legs":
        return np.sqrt(q + 0.5)[None]
    if measure == "legt":
        r = np.sqrt((2 * q + 1) / theta)
        even = (np.arange(n) % 2) == 0
        return np.stack([np.where(even, r, 0.0), np.where(even, 0.0, r)])
    if measure == "lagt":
        return np.full((1, n), np.sqrt(0.5))
    return np.sqrt(2.0 / theta) * _fourier_boundary(n)[None]


class NPLR(NamedTuple):
    """``A = V (diag(lam) − p̃ᵀ p̃*) V*`` and ``V* B = b`` with V unitary (all complex128).

    With ``half=True`` only one eigenvalue of each conjugate pair is kept (the one with
    Im λ ≥ 0): the full forms are ``lam_f = [lam, conj(lam)]``, ``V_f = [v, conj(v)]`` and
    likewise for ``p`` and ``b``, because A, B and P are real.
    """

    lam: np.ndarray   # [M]      eigenvalues of the normal part A + PᵀP
    p: np.ndarray     # [r, M]   V* P (the low-rank term in the eigenbasis)
    b: np.ndarray     # [M]      V* B
    v: np.ndarray     # [n, M]   eigenvectors (columns)


def _paired_kernel_basis(k: np.ndarray, tol: float) -> np.ndarray:
    """Complex eigenvectors for the zero eigenvalues of skew k, as (u + i w)/√2 from a real basis.

    A real skew matrix may have a zero eigenspace of any dimension (FouT's constant term, LegS at
    odd n); the conjugate-pair form needs it spanned by pairs of conjugate vectors, so a real
    orthonormal basis of it is paired up. The dimension must be even.
    """
    _, s, vt = np.linalg.svd(k)
    null = vt[s < tol].T
    if null.shape[1] % 2:
        raise ValueError(f"hippo.nplr: half=True needs the zero eigenspace of the skew part to have even "
                         f"dimension, got {null.shape[1]} for n = {k.shape[0]}; use another n or half=False")
    return (null[:, 0::2] + 1j * null[:, 1::2]) / np.sqrt(2.0)


def nplr(measure: str, n: int, *, half: bool = True, theta: float = 1.0) -> NPLR:
    """The normal-plus-low-rank form of the HiPPO matrix ``measure`` (S4, Theorem 1).

    ``A + Pᵀ P = c I + K`` with K real skew-symmetric, so ``−iK`` is Hermitian: its ``eigh`` gives
    the unitary V and the imaginary parts of the eigenvalues (exactly, in float64), and the real part
    is the constant c. Then ``A = V (Λ − (V*Pᵀ)(V*Pᵀ)*) V*``.
    """
    a, b = transition(measure, n, theta=theta)
    p = rank_correction(measure, n, theta=theta)
    normal = a + p.T @ p
    c = float(np.mean(np.diag(normal)))
    skew = normal - c * np.eye(n)
    if not np.allclose(skew, -skew.T, atol=1e-9 * max(1.0, np.abs(skew).max())):
        raise AssertionError(f"hippo.nplr: {measure} plus its rank correction is not normal")
    omega, v = np.linalg.eigh(-1j * skew)                  # skew v = i ω v
    if half:
        scale = max(1.0, float(np.abs(omega).max()))
        tol = 1e-9 * scale
        v = np.concatenate([v[:, omega > tol], _paired_kernel_basis(skew, tol)], axis=1)
        omega = np.concatenate([omega[omega > tol], np.zeros(v.shape[1] - int(np.sum(omega > tol)))])
        if v.shape[1] * 2 != n:
            raise ValueError(f"hippo.nplr: found {v.shape[1]} eigenvalues with Im λ ≥ 0 for n = {n}; "
                             f"half=True needs n/2 (use an even n, or half=False)")
    lam = c + 1j * omega
    vh = v.conj().T
    return NPLR(lam=lam, p=(vh @ p.T).T, b=vh @ b, v=v)


def hippo_n(n: int) -> np.ndarray:
    """HiPPO-N eigenvalues [n // 2]: the diagonal of LegS's NPLR form (one per conjugate pair).

    These are ``−1/2 + iω`` (DSS's and S5's initialisation; S4D's "S4D-LegS"). n must be even.
    """
    if n % 2:
        raise ValueError(f"hippo.hippo_n: n must be even (conjugate pairs), got {n}")
    return nplr("legs", n, half=True).lam


def s4d_lin(m: int) -> np.ndarray:
    """S4D-Lin eigenvalues [m]: ``λ_k = −1/2 + iπk`` (k = 0 … m−1), for a real state of size 2m."""
    return -0.5 + 1j * np.pi * np.arange(m)


def s4d_inv(m: int) -> np.ndarray:
    """S4D-Inv eigenvalues [m]: ``λ_k = −1/2 + i (N/π)(N/(2k+1) − 1)`` with N = 2m the real state size."""
    big_n = 2 * m
    return -0.5 + 1j * (big_n / np.pi) * (big_n / (2 * np.arange(m) + 1) - 1)


DIAGONAL_INITS = ("lin", "inv", "legs")


def diagonal_init(kind: str, m: int) -> np.ndarray:
    """m eigenvalues (one per conjugate pair) by name: "lin", "inv" or "legs" (HiPPO-N)."""
    if kind == "lin":
        return s4d_lin(m)
    if kind == "inv":
        return s4d_inv(m)
    if kind == "legs":
        return hippo_n(2 * m)
    raise ValueError(f"hippo.diagonal_init: kind={kind!r}; choose one of {DIAGONAL_INITS}")
