"""The diagonal scan in Pallas on the Triton backend: grid (batch, feature tiles), each program walks
the whole sequence in a ``fori_loop`` with its [Dt] float32 state in registers (programs of one
Triton grid cannot hand a carry to each other, so time is not a grid axis here). The loop body
handles UNROLL steps and issues their loads before the dependent updates.

Layout (prepared here, in XLA): ``[B, T, Dp]`` with Dp the feature width padded to a multiple of the
power-of-two feature tile Dt (Triton needs power-of-two arrays inside the kernel; the [T, Dt] block
is only addressed one row at a time, so T itself needs no padding). Padded features have a = 1,
b = 0 and a zero state: they stay zero and are sliced off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
MAX_FEATURE_TILE = 128      # 4 warps x 32 threads: one feature per thread
UNROLL = 8                  # time steps whose loads are issued together


def feature_tile(d: int) -> int:
    """Power of two >= 16 covering d, at most MAX_FEATURE_TILE."""
    return min(MAX_FEATURE_TILE, max(16, 1 << (int(d) - 1).bit_length()))


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _pad_features(x, width: int, fill: float):
    extra = width - x.shape[-1]
    if not extra:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=fill)


def _layout(d: int):
    dt = feature_tile(d)
    return dt, -(-d // dt) * dt


def _walk(steps: int, load, update, carry):
    """``carry = update(load(s), carry)`` for s = 0 .. steps-1, UNROLL steps per loop iteration with
    their loads issued first: the loads do not depend on the carry, so one memory latency is paid per
    UNROLL steps instead of per step (Pallas Triton cannot lower ``fori_loop(unroll=...)``)."""
    def block(k, carry):
        rows = [load(k * UNROLL + u) for u in range(UNROLL)]
        for row in rows:
            carry = update(row, carry)
        return carry

    whole = steps // UNROLL
    carry = lax.fori_loop(0, whole, block, carry)
    for s in range(whole * UNROLL, steps):          # the remainder, fewer than UNROLL steps
        carry = update(load(s), carry)
    return carry


def forward(a, b, h0, *, reverse: bool, interpret: bool = False):
    """a, b [B, T, D] (float32/bfloat16), h0 [B, D] f32 -> (h [B, T, D] in b's dtype, final [B, D] f32)."""
    batch, time, d = b.shape
    dt, dp = _layout(d)
    a_p, b_p, h0_p = _pad_features(a, dp, 1.0), _pad_features(b, dp, 0.0), _pad_features(h0, dp, 0.0)

    def kernel(a_ref, b_ref, h0_ref, h_ref, hf_ref):
        index = (lambda s: time - 1 - s) if reverse else (lambda s: s)

        def load(s):
            t = index(s)
            return t, a_ref[t, :].astype(F32), b_ref[t, :].astype(F32)

        def update(row, h):
            t, a_t, b_t = row
            h = a_t * h + b_t
            h_ref[t, :] = h.astype(h_ref.dtype)
            return h

        hf_ref[...] = _walk(time, load, update, h0_ref[...])

    seq = pl.BlockSpec((None, time, dt), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dt), lambda i, j: (i, j))
    h, final = pl.pallas_call(
        kernel,
        grid=(batch, dp // dt),
        in_specs=[seq, seq, state],
        out_specs=[seq, state],
        out_shape=[jax.ShapeDtypeStruct((batch, time, dp), b.dtype), jax.ShapeDtypeStruct((batch, dp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="diagonal_scan_fwd",
    )(a_p, b_p, h0_p)
    return h[..., :d], final[:, :d]


def backward(a, h, h0, dh, d_final, *, reverse: bool, interpret: bool = False):
    """The adjoint recurrence, run against the forward direction: g_t = dh_t + a_next g_next, started
    from d_final; db = g, da = g h_prev, d h0 = a_first g_first. Returns (da, db, d h0)."""
    batch, time, d = h.shape
    dt, dp = _layout(d)
    a_p, h_p, dh_p = _pad_features(a, dp, 1.0), _pad_features(h, dp, 0.0), _pad_features(dh, dp, 0.0)
    h0_p, df_p = _pad_features(h0, dp, 0.0), _pad_features(d_final, dp, 0.0)

    def kernel(a_ref, h_ref, h0_ref, dh_ref, df_ref, da_ref, db_ref, dh0_ref):
        index = (lambda s: s) if reverse else (lambda s: time - 1 - s)

        def load(s, prev=None):
            # Every step but the first one processed forwards finds h_prev in h.
            t = index(s)
            if prev is None:
                prev = h_ref[t + 1 if reverse else t - 1, :].astype(F32)
            return t, a_ref[t, :].astype(F32), dh_ref[t, :].astype(F32), prev

        def update(row, carry):
            # carry = a_next g_next: what flows into step t from the step processed after it.
            t, a_t, dh_t, prev = row
            g = dh_t + carry
            db_ref[t, :] = g.astype(db_ref.dtype)
            da_ref[t, :] = (g * prev).astype(da_ref.dtype)
            return a_t * g

        carry = _walk(time - 1, load, update, df_ref[...])
        dh0_ref[...] = update(load(time - 1, h0_ref[...]), carry)

    seq = pl.BlockSpec((None, time, dt), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dt), lambda i, j: (i, j))
    da, db, dh0 = pl.pallas_call(
        kernel,
        grid=(batch, dp // dt),
        in_specs=[seq, seq, state, seq, state],
        out_specs=[seq, seq, state],
        out_shape=[jax.ShapeDtypeStruct((batch, time, dp), a.dtype),
                   jax.ShapeDtypeStruct((batch, time, dp), dh.dtype), jax.ShapeDtypeStruct((batch, dp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="diagonal_scan_bwd",
    )(a_p, h_p, h0_p, dh_p, df_p)
    return da[..., :d], db[..., :d], dh0[:, :d]
