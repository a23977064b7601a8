"""The lti engine: linear time-invariant state-space models, by FFT convolution or by recurrence.

Each of H channels is a single-input single-output system with its own state of size N::

    x_t = Ā x_{t-1} + B̄ u_t,      y_t = C x_t + D u_t          u_t, y_t ∈ R^H,  x_t per channel

so the whole sequence map is a causal convolution plus the initial state's free response::

    y_t = Σ_{s ≤ t} K_{t−s} u_s + D u_t + C Ā^{t+1} x_{−1},     K_l = C Ā^l B̄

Shapes: ``u`` [B, T, H] (any float dtype; the engine computes in float32, or float64 for float64
inputs), ``y`` [B, T, H] in u's dtype, states float32 (float64 under x64 inputs).

Three kinds of system (NamedTuples of arrays; build them with the discretisations in
``zoo.ops.lti_kernels``, re-exported here):

* ``DiagonalSSM(log_a, b, c, d)``: Ā = diag(exp(log_a)) complex, ``y = Re(Σ_n c_n x_n) + d u``
  (a conjugate-symmetric model keeps one of each pair and puts the factor 2 into c). State: a
  (real, imag) pair [B, H, N]. Modes: ``"conv"`` (Vandermonde kernel + FFT) and the diagonal
  engine's ``"sequential"`` and ``"associative"``. S4D, DSS, GSS.
* ``DenseSSM(a, b, c, d)``: real dense Ā [H, N, N]. State [B, H, N]. Modes ``"conv"`` (Krylov
  kernel by doubling + FFT) and ``"recurrent"`` (``lax.scan``). LSSL.
* ``DplrSSM(lam, p, b, c, delta, d)``: the continuous ``A = Λ − p p*`` (diagonal plus rank one)
  discretised with the bilinear transform and step Δ, kept as one half of conjugate pairs: the
  real system is ``Λ_f = [Λ, Λ̄]``, ``p_f = [p, p̄]``, ``B_f = [B, B̄]``, ``C_f = [C, C̄]``, so
  ``y = 2 Re(C x) + D u`` with x the half state, a (real, imag) pair [B, H, M]. Modes ``"conv"``
  (S4's Cauchy kernel + FFT) and ``"recurrent"`` (the dense real form of the same half state, Ā
  [H, 2M, 2M], by ``lax.scan``). S4.

Public API::

    y, final = apply(system, u, *, initial_state=None, reset=None, reverse=False, mode="auto")
    state, y_t = step(system, state, u_t)                  # one step; u_t [B, H]
    y, final = reference(system, u, *, initial_state=None, reset=None, reverse=False)   # a loop
    state = zero_state(system, batch)                      # zeros in the system's state form
    kernel(system, length) -> K [H, L]                     # C Ā^l B̄, by the mode's algorithm

Conv mode returns the same final state and honours ``initial_state`` exactly: the free response
``C Ā^{t+1} x0`` is a second kernel (Vandermonde for diagonal, Krylov for dense, the same Cauchy
sums with B replaced by ``(I + Δ/2 A) x0 / Δ`` for DPLR, since ``(I − Δ/2 A) Ā = I + Δ/2 A``), and
the final state ``Ā^T x0 + Σ_s Ā^{T−1−s} B̄ u_s`` is a contraction of u with the state kernel
(``Ā^l B̄`` by Krylov for dense and DPLR). XLA drops that work when the final state is unused, as in
training. ``reverse=True`` without reset flips time around the same computation. **With ``reset``
given, conv mode runs the recurrent mode instead** (``"sequential"`` for diagonal systems): a reset
makes the map time-varying, which a single convolution cannot express.

``"auto"`` is the recurrent mode on CPU and ``"conv"`` elsewhere. Measured with
``experiments/bench/s4_conv_vs_recurrent.py`` (one S4 training step, forward + backward, B = 1,
T = 16384, 2 CPU cores shared with other jobs, load average ~6): H = 16, N = 16 conv 416 ms,
recurrent 228 ms; H = 64, N = 64 conv 6.8 s, recurrent 3.1 s. On CPU the sequential scan is cheap
per step, while XLA materialises the [H, N, L/2] Cauchy matrix (and its gradient) several times
over (the paper fuses it into one kernel), so conv loses by about 2x at these sizes. On GPU/TPU a
16k-step sequential scan is latency-bound and the FFT form is the paper's reason for conv mode;
that choice is not measured here (no device).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops import diagonal
from zoo.ops._time import reset_before, reset_for_reverse
from zoo.ops.lti_kernels import (
    DISCRETISATIONS,
    causal_conv,
    complex_dtype,
    discretise_dense,
    discretise_diagonal,
    dplr_generating,
    from_spectrum,
    krylov,
    power_minus_identity,
    vandermonde,
    vandermonde_kernel,
)

__all__ = [
    "DISCRETISATIONS", "DenseSSM", "DiagonalSSM", "DplrSSM", "apply", "causal_conv", "discretise_dense",
    "discretise_diagonal", "dplr_to_dense", "kernel", "krylov", "modes_of", "reference",
    "step", "vandermonde_kernel", "zero_state",
]


class DiagonalSSM(NamedTuple):
    log_a: Any   # [H, N] complex: log Ā
    b: Any       # [H, N] complex: B̄
    c: Any       # [H, N] complex
    d: Any       # [H] real


class DenseSSM(NamedTuple):
    a: Any       # [H, N, N] real: Ā
    b: Any       # [H, N] real: B̄
    c: Any       # [H, N] real
    d: Any       # [H] real


class DplrSSM(NamedTuple):
    lam: Any     # [H, M] complex: Λ (continuous), one of each conjugate pair
    p: Any       # [H, M] complex: the rank-one term p
    b: Any       # [H, M] complex: B (continuous)
    c: Any       # [H, M] complex: C
    delta: Any   # [H] real: Δ
    d: Any       # [H] real


DIAGONAL_MODES = ("conv", "sequential", "associative")
DENSE_MODES = ("conv", "recurrent")


def modes_of(system) -> tuple[str, ...]:
    return DIAGONAL_MODES if isinstance(system, DiagonalSSM) else DENSE_MODES


# --------------------------------------------------------------------------------------------
# Forms and dtypes.


def _channels(system) -> int:
    return int(np.shape(system.d)[-1])


def _state_shape(system, batch: int) -> tuple[int, ...]:
    if isinstance(system, DenseSSM):
        return (batch, *np.shape(system.b))
    return (batch, *np.shape(system.c))


def zero_state(system, batch: int, dtype=jnp.float32):
    zeros = jnp.zeros(_state_shape(system, batch), dtype)
    return zeros if isinstance(system, DenseSSM) else (zeros, zeros)


def _cast(system, real_dtype):
    cdtype = complex_dtype(real_dtype)

    def cast(x):
        x = jnp.asarray(x)
        return x.astype(cdtype if jnp.iscomplexobj(x) else real_dtype)

    return type(system)(*(cast(x) for x in system))


def _to_complex(pair):
    return pair[0] + 1j * pair[1]


def _to_pair(x, dtype):
    return jnp.real(x).astype(dtype), jnp.imag(x).astype(dtype)


def _check(who: str, system, u, state):
    if not isinstance(system, (DiagonalSSM, DenseSSM, DplrSSM)):
        raise TypeError(f"{who}: system must be a DiagonalSSM, DenseSSM or DplrSSM, "
                        f"got {type(system).__name__}")
    dtype = getattr(u, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{who}: u must be a float array, got dtype {dtype}")
    h = _channels(system)
    if np.shape(u)[-1] != h:
        raise ValueError(f"{who}: u has shape {np.shape(u)} but the system has H = {h} channels")
    if state is not None:
        want = _state_shape(system, np.shape(u)[0])
        if isinstance(system, DenseSSM):
            leaves = [state]
        else:
            leaves = list(state) if isinstance(state, tuple) else None
        if leaves is None or len(leaves) != (1 if isinstance(system, DenseSSM) else 2) or any(
                np.shape(x) != want for x in leaves):
            got = [np.shape(x) for x in leaves] if leaves else type(state).__name__
            form = "[B, H, N]" if isinstance(system, DenseSSM) else "a (real, imag) pair of [B, H, N]"
            raise ValueError(f"{who}: state must be {form} = {want}, got {got}")


# --------------------------------------------------------------------------------------------
# DPLR: its real dense form (for the recurrence and the final state).


def _full(x):
    return jnp.concatenate([x, jnp.conj(x)], axis=-1)


def _dplr_increment(system: DplrSSM):
    """(E, B̄) of the bilinear discretisation in the real form of the half state, with Ā = I + E.

    ``E = (I − Δ/2 A)⁻¹ Δ A`` is computed directly (not as Ā − I, which a small Δ would cancel).
    The half state x (complex, M) evolves by ``x' = M₁ x + M₂ x̄ + B̄ u`` with ``[M₁, M₂]`` the top
    rows of the full matrix: a real-linear map, written on ``[Re x; Im x]`` as the real [2M, 2M]
    matrix ``[[Re(M₁+M₂), −Im(M₁−M₂)], [Im(M₁+M₂), Re(M₁−M₂)]]`` (linear in the full matrix, so
    the identity maps to the identity).
    """
    m = system.lam.shape[-1]
    lam_f, p_f, b_f = _full(system.lam), _full(system.p), _full(system.b)
    a_f = jax.vmap(jnp.diag)(lam_f) - p_f[:, :, None] * jnp.conj(p_f)[:, None, :]
    delta = system.delta[:, None]
    rhs = jnp.concatenate([delta[..., None] * a_f, (delta * b_f)[..., None]], axis=-1)
    # I − Δ/2 A = diag(q) + (Δ/2) p p* with q = 1 − Δλ/2: Sherman–Morrison solves it in O(N²)
    # (a batched LU of complex matrices costs far more on CPU).
    q_inv = 1 / (1 - delta / 2 * lam_f)
    u = delta / 2 * p_f * q_inv                                           # diag(q)⁻¹ (Δ/2) p
    y = q_inv[..., None] * rhs
    correction = jnp.einsum("hn,hnk->hk", jnp.conj(p_f), y) / (1 + jnp.sum(jnp.conj(p_f) * u, -1))[:, None]
    solved = y - u[..., None] * correction[:, None, :]
    e_f, b_bar = solved[..., :-1], solved[..., -1]
    m1, m2 = e_f[:, :m, :m], e_f[:, :m, m:]
    top = jnp.concatenate([jnp.real(m1 + m2), -jnp.imag(m1 - m2)], axis=-1)
    bottom = jnp.concatenate([jnp.imag(m1 + m2), jnp.real(m1 - m2)], axis=-1)
    e_real = jnp.concatenate([top, bottom], axis=-2)
    b_real = jnp.concatenate([jnp.real(b_bar[:, :m]), jnp.imag(b_bar[:, :m])], axis=-1)
    return e_real, b_real


def dplr_to_dense(system: DplrSSM, increment=None) -> DenseSSM:
    """The bilinear discretisation of a DPLR system as a real dense system on (Re x, Im x)."""
    e_real, b_real = _dplr_increment(system) if increment is None else increment
    a_real = e_real + jnp.eye(e_real.shape[-1], dtype=e_real.dtype)
    c_real = jnp.concatenate([2 * jnp.real(system.c), -2 * jnp.imag(system.c)], axis=-1)
    return DenseSSM(a_real, b_real, c_real, system.d)


def _pair_to_real(pair):
    return jnp.concatenate(pair, axis=-1)


def _real_to_pair(x):
    m = x.shape[-1] // 2
    return x[..., :m], x[..., m:]


def _dplr_c_tilde(e_real, dense: DenseSSM, length: int):
    """``C̃_f = C_f (I − Ā^L)`` on the full eigenbasis, from the real form's ``c (I − Ā^L)``."""
    c_tilde = -jnp.einsum("hn,hnm->hm", dense.c, power_minus_identity(e_real, length))
    r1, r2 = _real_to_pair(c_tilde)
    half = (r1 - 1j * r2) / 2
    return jnp.concatenate([half, jnp.conj(half)], axis=-1)


def _dplr_spectrum(system: DplrSSM, c_tilde, w, length: int):
    return dplr_generating(_full(system.lam), _full(system.p), c_tilde, w, system.delta, length)


def kernel(system, length: int):
    """K [H, length], ``K_l = C Ā^l B̄``, by the conv mode's algorithm for this kind of system."""
    if isinstance(system, DiagonalSSM):
        return vandermonde_kernel(system.log_a, system.c * system.b, length)
    if isinstance(system, DenseSSM):
        return jnp.einsum("hn,hln->hl", system.c, krylov(system.a, system.b[..., None], length)[..., 0])
    increment = _dplr_increment(system)
    c_tilde = _dplr_c_tilde(increment[0], dplr_to_dense(system, increment), length)
    return from_spectrum(_dplr_spectrum(system, c_tilde, _full(system.b), length), length)


# --------------------------------------------------------------------------------------------
# Conv mode (forward in time, no reset).


def _diagonal_conv(system: DiagonalSSM, u, x0):
    time = u.shape[1]
    powers = vandermonde(system.log_a, time + 1)                         # [H, N, T+1]
    k = jnp.real(jnp.einsum("hn,hnl->hl", system.c * system.b, powers[..., :time]))
    free = jnp.real(jnp.einsum("hn,bhn,hnl->blh", system.c, x0, powers[..., 1:]))
    y = causal_conv(u, k) + system.d * u + free
    state_kernel = system.b[..., None] * jnp.flip(powers[..., :time], axis=-1)   # Ā^{T−1−s} B̄
    final = powers[..., time] * x0 + jnp.einsum("bsh,hns->bhn", u.astype(powers.dtype), state_kernel)
    return y, final


def _dense_conv_states(dense: DenseSSM, u, x0):
    """(Krylov columns, final state): the state kernel Ā^l B̄ and the free response Ā^{l+1} x0."""
    time = u.shape[1]
    a_x0 = jnp.einsum("hnm,bhm->hnb", dense.a, x0)
    columns = krylov(dense.a, jnp.concatenate([dense.b[..., None], a_x0], axis=-1), time)  # [H, T, N, 1+B]
    final = (jnp.einsum("hnb->bhn", columns[:, time - 1, :, 1:])
             + jnp.einsum("bsh,hsn->bhn", u, jnp.flip(columns[..., 0], axis=1)))
    return columns, final


def _dense_conv(dense: DenseSSM, u, x0):
    columns, final = _dense_conv_states(dense, u, x0)
    k = jnp.einsum("hn,hln->hl", dense.c, columns[..., 0])
    free = jnp.einsum("hn,hlnb->blh", dense.c, columns[..., 1:])
    return causal_conv(u, k) + dense.d * u + free, final


def _dplr_conv(system: DplrSSM, u, x0):
    time = u.shape[1]
    increment = _dplr_increment(system)
    dense = dplr_to_dense(system, increment)
    c_tilde = _dplr_c_tilde(increment[0], dense, time)
    k = from_spectrum(_dplr_spectrum(system, c_tilde, _full(system.b), time), time)
    # The free response C Ā^l (Ā x0) is the kernel of the input vector w = (I + Δ/2 A) x0 / Δ.
    x0_f = _full(_to_complex(x0))
    lam_f, p_f = _full(system.lam), _full(system.p)
    a_x0 = lam_f * x0_f - p_f * jnp.einsum("hn,bhn->bh", jnp.conj(p_f), x0_f)[..., None]
    delta = system.delta[:, None]
    w = (x0_f + delta / 2 * a_x0) / delta
    free = from_spectrum(_dplr_spectrum(system, c_tilde, w, time), time)          # [B, H, T]
    y = causal_conv(u, k) + system.d * u + jnp.swapaxes(free, 1, 2)
    _, final = _dense_conv_states(dense, u, _pair_to_real(x0))
    return y, _real_to_pair(final)


def _conv(system, u, x0, reverse: bool):
    if reverse:
        u = jnp.flip(u, axis=1)
    if isinstance(system, DiagonalSSM):
        y, final = _diagonal_conv(system, u, _to_complex(x0))
        final = _to_pair(final, u.dtype)
    elif isinstance(system, DenseSSM):
        y, final = _dense_conv(system, u, x0)
    else:
        y, final = _dplr_conv(system, u, x0)
    return (jnp.flip(y, axis=1) if reverse else y), final


# --------------------------------------------------------------------------------------------
# Recurrent modes.


def _dense_scan(dense: DenseSSM, u, x0, reset, reverse: bool):
    drop = reset_for_reverse(reset) if reverse else reset           # in processing order
    if reverse:
        u = jnp.flip(u, axis=1)

    def body(x, inputs):
        u_t, drop_t = inputs
        x = jnp.where(drop_t[:, None, None], jnp.zeros((), x.dtype), x)
        x = jnp.einsum("hnm,bhm->bhn", dense.a, x) + dense.b * u_t[..., None]
        return x, jnp.einsum("hn,bhn->bh", dense.c, x) + dense.d * u_t

    if drop is None:
        drop = jnp.zeros(u.shape[:2], bool)
    final, y = lax.scan(body, x0, (jnp.swapaxes(u, 0, 1), jnp.swapaxes(drop, 0, 1)))
    y = jnp.swapaxes(y, 0, 1)
    return (jnp.flip(y, axis=1) if reverse else y), final


def _diagonal_scan(system: DiagonalSSM, u, x0, reset, reverse: bool, mode: str):
    a = jnp.exp(system.log_a)
    drive = u[..., None] * system.b                                   # [B, T, H, N]
    xs, final = diagonal.apply(_to_pair(a, u.dtype), _to_pair(drive, u.dtype), initial_state=x0,
                               reset=reset, reverse=reverse, mode=mode)
    c_re, c_im = _to_pair(system.c, u.dtype)
    y = jnp.einsum("bthn,hn->bth", xs[0], c_re) - jnp.einsum("bthn,hn->bth", xs[1], c_im)
    return y + system.d * u, final


def apply(system, u, *, initial_state=None, reset=None, reverse: bool = False, mode: str = "auto"):
    """Run the system over axis 1 of u [B, T, H]. Returns ``(y [B, T, H], final_state)``."""
    who = "lti.apply"
    _check(who, system, u, initial_state)
    modes = modes_of(system)
    if mode != "auto" and mode not in modes:
        raise ValueError(f"{who}: mode={mode!r} is not supported for {type(system).__name__}; choose one "
                         f"of {('auto', *modes)}")
    if np.ndim(u) != 3 or np.shape(u)[1] == 0:
        raise ValueError(f"{who}: u must have shape [B, T, H] with T >= 1, got {np.shape(u)}")
    if reset is not None:
        if np.shape(reset) != np.shape(u)[:2]:
            raise ValueError(f"{who}: reset must have shape [B, T] = {np.shape(u)[:2]}, "
                             f"got {np.shape(reset)}")
        reset = jnp.asarray(reset).astype(bool)
    acc = jnp.promote_types(jnp.float32, u.dtype)
    system, u32 = _cast(system, acc), u.astype(acc)
    if initial_state is None:
        x0 = zero_state(system, u.shape[0], acc)
    else:
        x0 = jax.tree.map(lambda s: jnp.asarray(s, acc), initial_state)
    if mode == "auto":
        mode = modes[1] if jax.default_backend() == "cpu" else "conv"
    if mode == "conv" and reset is not None:
        mode = modes[1]
    if mode == "conv":
        y, final = _conv(system, u32, x0, bool(reverse))
    elif isinstance(system, DiagonalSSM):
        y, final = _diagonal_scan(system, u32, x0, reset, bool(reverse), mode)
    elif isinstance(system, DenseSSM):
        y, final = _dense_scan(system, u32, x0, reset, bool(reverse))
    else:
        y, final = _dense_scan(dplr_to_dense(system), u32, _pair_to_real(x0), reset, bool(reverse))
        final = _real_to_pair(final)
    return y.astype(u.dtype), final


def step(system, state, u_t):
    """One step ``x ← Ā x + B̄ u_t``, ``y_t = C x + D u_t``: u_t [B, H]. Returns ``(state, y_t)``."""
    _check("lti.step", system, u_t, state)
    acc = jnp.promote_types(jnp.float32, u_t.dtype)
    system, u = _cast(system, acc), u_t.astype(acc)
    if isinstance(system, DiagonalSSM):
        x = _to_complex(jax.tree.map(lambda s: s.astype(acc), state))
        x = jnp.exp(system.log_a) * x + system.b * u[..., None]
        y = jnp.real(jnp.einsum("hn,bhn->bh", system.c, x)) + system.d * u
        return _to_pair(x, acc), y.astype(u_t.dtype)
    dense = system if isinstance(system, DenseSSM) else dplr_to_dense(system)
    x = state.astype(acc) if isinstance(system, DenseSSM) else _pair_to_real(state).astype(acc)
    x = jnp.einsum("hnm,bhm->bhn", dense.a, x) + dense.b * u[..., None]
    y = jnp.einsum("hn,bhn->bh", dense.c, x) + dense.d * u
    new = x if isinstance(system, DenseSSM) else _real_to_pair(x)
    return new, y.astype(u_t.dtype)


def reference(system, u, *, initial_state=None, reset=None, reverse: bool = False):
    """A plain Python loop of ``step`` (a reset zeroes the carried state): the check for every mode."""
    _check("lti.reference", system, u, initial_state)
    acc = jnp.promote_types(jnp.float32, u.dtype)
    state = zero_state(system, u.shape[0], acc) if initial_state is None else initial_state
    time = u.shape[1]
    ys = [None] * time
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        flag = reset_before(reset, t, time, reverse)
        if flag is not None:
            keep = ~jnp.asarray(flag)
            state = jax.tree.map(lambda s, k=keep: s * k.reshape((-1,) + (1,) * (s.ndim - 1)), state)
        state, ys[t] = step(system, state, u[:, t])
    return jnp.stack(ys, axis=1), state
