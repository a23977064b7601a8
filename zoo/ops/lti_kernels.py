"""The pieces of the ``lti`` engine: discretisation, convolution kernels and the FFT convolution.

Letters: H channels (independent SISO systems), N state size per channel, L kernel length, B batch,
T time. Complex arrays here are jnp complex64 (complex128 under x64): they live only inside the
engine; states that leave it are (real, imag) float32 pairs.

Discretisation of ``dx/dt = A x + B u`` with step Δ (zoh: zero-order hold; bilinear: Tustin)::

    zoh       Ā = exp(ΔA)                    B̄ = A⁻¹ (exp(ΔA) − I) B
    bilinear  Ā = (I − Δ/2 A)⁻¹ (I + Δ/2 A)  B̄ = (I − Δ/2 A)⁻¹ Δ B

Kernels ``K_l = C Ā^l B̄`` (l = 0 … L−1):

* ``vandermonde_kernel``: diagonal Ā = diag(exp(log_a)), ``K_l = Re Σ_n w_n exp(l log_a_n)`` with
  ``w = C ⊙ B̄``: one [H, N, L] Vandermonde product (S4D, DSS).
* ``dplr_kernel``: A = Λ − p p* (diagonal plus rank one, S4) with the bilinear Ā. The truncated
  generating function ``K̂(z) = Σ_{l<L} K_l z^l = C̃ (I − Ā z)⁻¹ B̄`` with ``C̃ = C (I − Ā^L)`` is
  evaluated at the roots of unity ``z_k = exp(−2πik/L)`` (where ``z^L = 1`` removes the truncation),
  and for the bilinear Ā it equals ``(2/(1+z)) C̃ (g(z) I − A)⁻¹ B`` with ``g = (2/Δ)(1−z)/(1+z)``.
  Woodbury turns the inverse of ``gI − Λ + p p*`` into four Cauchy sums ``Σ_n a_n b_n / (g − λ_n)``,
  and an inverse real FFT gives K (S4, Section 3.3 and Algorithm 1).
* ``krylov``: ``Ā^l v`` for l < L by doubling (``[V, Ā^{2^j} V]``), log₂ L matrix products, for
  dense Ā (LSSL) and for the states that conv mode must return.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISCRETISATIONS = ("zoh", "bilinear")


def check_method(who: str, method: str) -> None:
    if method not in DISCRETISATIONS:
        raise ValueError(f"{who}: discretisation={method!r}; choose one of {DISCRETISATIONS}")


def complex_dtype(real_dtype):
    return jnp.complex128 if real_dtype == jnp.float64 else jnp.complex64


# --------------------------------------------------------------------------------------------
# Discretisation.


def discretise_diagonal(lam, delta, method: str = "zoh"):
    """Diagonal A = diag(λ): returns ``(log_a, b_scale)`` with ``Ā = exp(log_a)``, ``B̄ = b_scale ⊙ B``.

    ``lam`` [..., N] complex, ``delta`` broadcastable to it (e.g. [..., 1]). ``log Ā`` is returned
    rather than Ā so that kernels take powers as ``exp(l log Ā)`` without repeated products.
    """
    check_method("lti.discretise_diagonal", method)
    z = delta * lam
    if method == "zoh":
        return z, jnp.expm1(z) / lam
    half = z / 2
    return jnp.log((1 + half) / (1 - half)), delta / (1 - half)


def discretise_dense(a, b, delta, method: str = "bilinear"):
    """Dense A [..., N, N], B [..., N], Δ [...]: returns ``(Ā [..., N, N], B̄ [..., N])``.

    ZOH uses the exponential of the block matrix ``Δ [[A, B], [0, 0]]``, whose top row is
    ``[Ā, B̄]`` (exact even for singular A).
    """
    check_method("lti.discretise_dense", method)
    n = a.shape[-1]
    delta = jnp.asarray(delta)[..., None, None]
    if method == "bilinear":
        eye = jnp.eye(n, dtype=a.dtype)
        lhs = eye - delta / 2 * a
        a_bar = jnp.linalg.solve(lhs, eye + delta / 2 * a)
        b_bar = jnp.linalg.solve(lhs, (delta[..., 0] * b)[..., None])[..., 0]
        return a_bar, b_bar
    block = jnp.concatenate([a, b[..., None]], axis=-1)                  # [..., N, N+1]
    block = jnp.concatenate([block, jnp.zeros_like(block[..., :1, :])], axis=-2) * delta
    expd = jax.scipy.linalg.expm(block) if block.ndim == 2 else jax.vmap(jax.scipy.linalg.expm)(
        block.reshape(-1, n + 1, n + 1)).reshape(block.shape)
    return expd[..., :n, :n], expd[..., :n, n]


# --------------------------------------------------------------------------------------------
# Kernels.


def vandermonde(log_a, length: int):
    """``exp(l log_a)`` for l = 0 … length−1: [..., N, length] complex."""
    steps = jnp.arange(length, dtype=jnp.real(log_a).dtype)
    return jnp.exp(log_a[..., None] * steps)


def vandermonde_kernel(log_a, w, length: int):
    """``K_l = Re Σ_n w_n exp(l log_a_n)``: log_a, w [H, N] complex -> K [H, length] real."""
    return jnp.real(jnp.einsum("hn,hnl->hl", w, vandermonde(log_a, length)))


def matrix_power(a, power: int):
    """``a^power`` for a static int power >= 0 by repeated squaring (a [..., N, N])."""
    result = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    base = a
    while power:
        if power & 1:
            result = base @ result
        power >>= 1
        if power:
            base = base @ base
    return result


def power_minus_identity(e, power: int):
    """``(I + e)^power − I`` for a static int power, without forming I + e.

    When Ā = I + E is close to the identity (a small step Δ), ``Ā^L − I`` computed from a rounded Ā
    loses most of its digits to cancellation; the recursions ``(I+R)(I+E) − I = RE + R + E`` and
    ``(I+E)² − I = E² + 2E`` keep them.
    """
    result = jnp.zeros_like(e)
    base = e
    while power:
        if power & 1:
            result = result @ base + result + base
        power >>= 1
        if power:
            base = base @ base + 2 * base
    return result


def krylov(a, v, length: int):
    """``Ā^l v`` for l = 0 … length−1 by doubling: a [H, N, N], v [H, N, J] -> [H, length, N, J]."""
    out = v[:, None]
    power = a
    while out.shape[1] < length:
        out = jnp.concatenate([out, jnp.einsum("hnm,hlmj->hlnj", power, out)], axis=1)
        if out.shape[1] < length:
            power = power @ power
    return out[:, :length]


def _one_minus_and_plus(length: int, dtype):
    """``(1 − z, 1 + z)`` at the roots of unity ``z_k = exp(−2πik/L)``, k = 0 … L//2 (the half
    spectrum an inverse real FFT needs), in half-angle form: no cancellation near z = 1 (long
    kernels) or z = −1."""
    real = jnp.finfo(dtype).dtype
    theta = jnp.pi * jnp.arange(length // 2 + 1, dtype=real) / length
    s, c = jnp.sin(theta), jnp.cos(theta)
    sin_full = 2 * s * c
    return (2 * s * s + 1j * sin_full).astype(dtype), (2 * c * c - 1j * sin_full).astype(dtype)


def dplr_generating(lam, p, c_tilde, w, delta, length: int):
    """``(2/(1+z)) C̃ (g(z) I − A)⁻¹ w`` at the roots of unity, for A = diag(λ) − p p*.

    lam, p, c_tilde [H, N] complex; w [..., H, N] complex (the input vector: B for the kernel);
    delta [H]. Returns [..., H, L//2+1] complex. With ``R = (gI − Λ)⁻¹``, Woodbury gives
    ``C̃Rw − (C̃Rp)(p*Rw) / (1 + p*Rp)``. Every sum is written with ``d_n = (2/Δ)(1−z) − (1+z)λ_n``
    (``(1+z)/(g − λ_n) = (1+z)/d_n · …``) so that nothing divides by ``1 + z``, which is 0 at
    z = −1 for even L.
    """
    one_minus, one_plus = _one_minus_and_plus(length, lam.dtype)      # [K]
    denom = (2 / delta)[:, None, None] * one_minus - one_plus * lam[..., None]   # [H, N, K]
    # 1/denom in real arithmetic: XLA's complex division guards against overflow at several times
    # the cost, and |denom| >= |Re λ| > 0 here, far from overflow.
    inv = jnp.conj(denom) / (jnp.real(denom) ** 2 + jnp.imag(denom) ** 2)
    p_conj = jnp.conj(p)
    k_cw, k_pw = jnp.moveaxis(jnp.einsum("...jhn,hnk->...jhk", jnp.stack([c_tilde * w, p_conj * w], -3), inv),
                              -3, 0)
    k_cp, k_pp = jnp.einsum("jhn,hnk->jhk", jnp.stack([c_tilde * p, p_conj * p]), inv)
    k_cw, k_cp = 2 * k_cw, 2 * k_cp
    k_pw, k_pp = one_plus * k_pw, one_plus * k_pp
    return k_cw - k_cp * k_pw / (1 + k_pp)


def from_spectrum(spectrum, length: int):
    """The real sequence of length L whose DFT is ``spectrum`` [..., L//2+1] (moved to the last axis)."""
    return jnp.fft.irfft(spectrum, n=length, axis=-1)


# --------------------------------------------------------------------------------------------
# Convolution.


def causal_conv(u, k):
    """``y_t = Σ_{s ≤ t} k_{t−s} u_s`` per channel by FFT: u [B, T, H], k [H, T] -> [B, T, H].

    Both are zero-padded to 2T so that the circular convolution has no wrap-around.
    """
    time = u.shape[1]
    n = 2 * time
    u_f = jnp.fft.rfft(u, n=n, axis=1)
    k_f = jnp.fft.rfft(k.T, n=n, axis=0)
    return jnp.fft.irfft(u_f * k_f, n=n, axis=1)[:, :time]
