"""The chunk loops behind ``zoo.ops.selective.selective_scan``: forward keeping only chunk-boundary states.

The selective scan's states ``h`` are [B, L, D, N], N times the size of its inputs (2.1 GB in
float32 at B=1, L=65536, D=512, N=16). Nothing here ever holds them for the whole sequence:

* forward: a loop over chunks of ``chunk`` steps carries ``h`` [B, D, N]. Each chunk builds its own
  decays and drives [B, K, D, N] (K = chunk), runs the diagonal engine over them from the carried
  state, reads ``y`` out, and writes it into a preallocated [B, D, L] output. The state entering each
  chunk is stored: [n_chunks, B, D, N] (L/K times less than all states).
* backward (``custom_vjp``): the same loop in reverse order. Each chunk is recomputed from its stored
  state and differentiated on its own (``jax.vjp`` of the chunk function, whose recurrence has the
  diagonal engine's own adjoint scan), with the cotangent of the state leaving the chunk carried from
  the chunk after it. Chunk gradients of the [B, D, L] inputs are written into preallocated buffers,
  and those of A, D and delta_bias are summed in the loop's carry.

Peak memory is therefore O(inputs + L/K · D·N + K · D·N) rather than O(L · D·N). The inputs are read
in their batch-major, time-last layout with dynamic slices, never transposed as a whole, so no extra
[B, D, L] copy is made either. L not a multiple of K leaves a shorter last chunk, run once after the
loop (no padding, which would copy every input).

Normalised inputs (``selective.py`` prepares them)::

    u, delta, z   [B, D, L]           caller's dtypes (z may be None)
    A             [D, N]              accumulation dtype; a (real, imag) pair when complex
    Bm, Cm        [Bb, G, N, Lb]      Bb ∈ {1, B}, Lb ∈ {1, L} (size 1: shared); pairs when complex
    skip, bias    [D] or None         the D skip and delta_bias, accumulation dtype
    h0            [B, D, N]           accumulation dtype; a pair when complex
    drop          bool [B, L] or None True where step t must not see the carried state
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from zoo.ops import diagonal
from zoo.ops.diagonal_pairs import fmap


class Static(NamedTuple):
    """The hashable, trace-time part of a problem."""

    softplus: bool     # delta_softplus
    inner: str         # the diagonal engine's mode inside a chunk: "sequential" or "associative"
    chunk: int         # steps per chunk (stored states every ``chunk`` steps)
    out_dtype: Any     # dtype of the output (u's dtype)


# --------------------------------------------------------------------------------------------
# One chunk: discretise, scan, read out.


def _per_channel(x, d: int):
    """[Bb, G, N, Kb] -> [Bb, Kb, D, N]: each group's row repeated for its D/G channels."""
    return fmap(lambda v: jnp.repeat(jnp.moveaxis(v, 3, 1), d // v.shape[1], axis=2), x)


def discretise(delta, u, A, Bm, softplus: bool, bias):
    """``(exp(Δ A), Δ u B)`` as [B, K, D, N] (pairs when complex), Δ = softplus(delta + bias).

    Everything is in the accumulation dtype (A's): decays of a bfloat16 ``delta`` are never rounded.
    """
    acc = (A[0] if isinstance(A, tuple) else A).dtype
    dt = delta.astype(acc)
    if bias is not None:
        dt = dt + bias[:, None]
    if softplus:
        dt = jax.nn.softplus(dt)
    dt = jnp.swapaxes(dt, 1, 2)[..., None]                      # [B, K, D, 1]
    drive = dt * jnp.swapaxes(u.astype(acc), 1, 2)[..., None]   # Δ u, [B, K, D, 1]
    b_d = _per_channel(Bm, u.shape[1])
    if isinstance(A, tuple):
        magnitude = jnp.exp(dt * A[0])
        angle = dt * A[1]
        decay = (magnitude * jnp.cos(angle), magnitude * jnp.sin(angle))
        return decay, (drive * b_d[0], drive * b_d[1])
    return jnp.exp(dt * A), drive * b_d


def readout(h, Cm):
    """``y[b, d, k] = Σ_n C h`` (complex: ``2 Re Σ_n C h``, mamba's convention) as [B, D, K]."""
    c_d = _per_channel(Cm, real_shape(h)[2])
    if isinstance(h, tuple):
        y = 2.0 * jnp.sum(h[0] * c_d[0] - h[1] * c_d[1], axis=-1)
    else:
        y = jnp.sum(h * c_d, axis=-1)
    return jnp.swapaxes(y, 1, 2)


def real_shape(x) -> tuple[int, ...]:
    return tuple((x[0] if isinstance(x, tuple) else x).shape)


def gate(y, u, z, skip):
    """``(y + D u) · SiLU(z)`` in the accumulation dtype (the skip and gate of selective_scan_ref)."""
    if skip is not None:
        y = y + skip[:, None] * u.astype(y.dtype)
    if z is not None:
        y = y * jax.nn.silu(z.astype(y.dtype))
    return y


def chunk_forward(static: Static, h_in, u, delta, z, A, Bm, Cm, skip, bias, drop):
    """One chunk from the state ``h_in``: ``(out [B, D, K] in out_dtype, h_out [B, D, N])``."""
    decay, drive = discretise(delta, u, A, Bm, static.softplus, bias)
    h, h_out = diagonal.apply(decay, drive, initial_state=h_in, reset=drop, mode=static.inner)
    out = gate(readout(h, Cm), u, z, skip)
    return out.astype(static.out_dtype), h_out


# --------------------------------------------------------------------------------------------
# Slicing the time axis of the normalised inputs.


class _Seq(NamedTuple):
    """The inputs that have a time axis, for one chunk or the whole sequence."""

    u: Any
    delta: Any
    z: Any
    Bm: Any
    Cm: Any
    drop: Any


_TIME_AXIS = _Seq(u=2, delta=2, z=2, Bm=3, Cm=3, drop=1)


def _take(seq: _Seq, start, size: int) -> _Seq:
    """Steps [start, start + size) of every leaf; a size-1 (shared) time axis is taken whole."""
    def cut(x, axis):
        def one(v):
            if v.shape[axis] == 1:
                return v
            return lax.dynamic_slice_in_dim(v, start, size, axis=axis)
        return None if x is None else fmap(one, x)

    return _Seq(*(cut(x, axis) for x, axis in zip(seq, _TIME_AXIS, strict=True)))


def _put(buffer, value, start, axis: int):
    """Write a chunk's slice into a [.., L, ..] buffer, or add into a shared (size-1) axis."""
    def one(buf, v):
        if buf.shape[axis] == 1:
            return buf + v.astype(buf.dtype)
        return lax.dynamic_update_slice_in_dim(buf, v.astype(buf.dtype), start, axis=axis)

    return None if buffer is None else fmap(one, buffer, value)


def _chunks(time: int, chunk: int) -> tuple[int, int]:
    """(number of full chunks, length of the shorter last chunk or 0)."""
    return time // chunk, time % chunk


# --------------------------------------------------------------------------------------------
# The loops.


def _forward(static: Static, seq: _Seq, A, skip, bias, h0):
    """``(out [B, D, L], final state, stored states [n_chunks, B, D, N])``."""
    time = seq.u.shape[2]
    n_full, tail = _chunks(time, static.chunk)
    n_stored = n_full + (tail > 0)
    out = jnp.zeros(seq.u.shape, static.out_dtype)
    stored = fmap(lambda v: jnp.zeros((n_stored, *v.shape), v.dtype), h0)

    def run(start, size, index, h, out, stored):
        stored = fmap(lambda s, v: lax.dynamic_update_index_in_dim(s, v, index, axis=0), stored, h)
        c = _take(seq, start, size)
        y, h = chunk_forward(static, h, c.u, c.delta, c.z, A, c.Bm, c.Cm, skip, bias, c.drop)
        return h, lax.dynamic_update_slice_in_dim(out, y, start, axis=2), stored

    def body(i, carry):
        return run(i * static.chunk, static.chunk, i, *carry)

    h, out, stored = lax.fori_loop(0, n_full, body, (h0, out, stored)) if n_full else (h0, out, stored)
    if tail:
        h, out, stored = run(n_full * static.chunk, tail, n_full, h, out, stored)
    return out, h, stored


def _zeros_like(x):
    return None if x is None else fmap(jnp.zeros_like, x)


def _add(total, part):
    return None if total is None else fmap(lambda t, p: t + p, total, part)


def _backward(static: Static, residuals, cotangents):
    """Gradients wrt (seq, A, skip, bias, h0), one chunk at a time from the last."""
    seq, A, skip, bias, stored = residuals
    d_out, d_final = cotangents
    time = seq.u.shape[2]
    n_full, tail = _chunks(time, static.chunk)
    grads_seq = _Seq(*(_zeros_like(x) for x in seq[:5]), drop=None)
    grads_fixed = (_zeros_like(A), _zeros_like(skip), _zeros_like(bias))

    def run(start, size, index, g_h, grads_seq, grads_fixed):
        c = _take(seq, start, size)
        h_in = fmap(lambda s: lax.dynamic_index_in_dim(s, index, axis=0, keepdims=False), stored)

        def chunk(h_in, u, delta, z, Bm, Cm, A, skip, bias):
            return chunk_forward(static, h_in, u, delta, z, A, Bm, Cm, skip, bias, c.drop)

        _, vjp = jax.vjp(chunk, h_in, c.u, c.delta, c.z, c.Bm, c.Cm, A, skip, bias)
        g_out = lax.dynamic_slice_in_dim(d_out, start, size, axis=2)
        g_h, *g_seq, g_a, g_skip, g_bias = vjp((g_out, g_h))
        grads_seq = _Seq(*(_put(buf, g, start, axis) for buf, g, axis
                           in zip(grads_seq[:5], g_seq, _TIME_AXIS[:5], strict=True)), drop=None)
        grads_fixed = tuple(_add(t, p) for t, p in zip(grads_fixed, (g_a, g_skip, g_bias), strict=True))
        return g_h, grads_seq, grads_fixed

    carry = (d_final, grads_seq, grads_fixed)
    if tail:
        carry = run(n_full * static.chunk, tail, n_full, *carry)

    def body(j, carry):
        i = n_full - 1 - j
        return run(i * static.chunk, static.chunk, i, *carry)

    if n_full:
        carry = lax.fori_loop(0, n_full, body, carry)
    d_h0, grads_seq, (d_a, d_skip, d_bias) = carry
    return grads_seq, d_a, d_skip, d_bias, d_h0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static: Static, seq: _Seq, A, skip, bias, h0):
    out, final, _ = _forward(static, seq, A, skip, bias, h0)
    return out, final


def _scan_fwd(static, seq, A, skip, bias, h0):
    out, final, stored = _forward(static, seq, A, skip, bias, h0)
    return (out, final), (seq, A, skip, bias, stored)


_scan.defvjp(_scan_fwd, _backward)


@functools.partial(jax.jit, static_argnums=(0,))
def scan_in_chunks(static: Static, u, delta, z, A, Bm, Cm, skip, bias, h0, drop):
    """``(out [B, D, L], final_state [B, D, N])`` for the normalised inputs (see the module docstring).

    Jitted (and cached per shape) so that eager callers do not dispatch the loops op by op.
    """
    return _scan(static, _Seq(u, delta, z, Bm, Cm, drop), A, skip, bias, h0)
