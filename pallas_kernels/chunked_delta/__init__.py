"""chunked_delta: the WY / UT chunked form of the (gated) delta rule, as a Pallas kernel for GPU
(Triton) and TPU (Mosaic) with a Pallas backward.

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t · scale

(S. Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
NeurIPS 2024 (DeltaNet, log_decay=None); S. Yang, J. Kautz, A. Hatamizadeh, "Gated Delta Networks:
Improving Mamba2 with Delta Rule", ICLR 2025.) Public function::

    o, final_state = chunked_delta(q, k, v, beta, log_decay=None, initial_state=None, *, reset=None,
                                   scale=None, chunk_size=64, platform=None, interpret=False)

q, k [B, T, H, K], v [B, T, H, V] (float32 or bfloat16, one dtype), beta [B, T, H] writing strengths,
log_decay None (plain delta rule) or [B, T, H] log decays g <= 0, initial_state [B, H, K, V] (cast to
float32; None: zeros), reset bool [B, T] (True: the state is dropped before step t, as in zoo's
engines). o is [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32. Conventions are those of
``zoo.ops.delta.apply`` (scale multiplies q, default K^-1/2). ``platform=None`` picks by
``lax.platform_dependent``: the Triton kernel on cuda, the Mosaic kernel on tpu, the Triton kernel
body in interpret mode on cpu; ``platform="gpu"``/``"tpu"`` forces one kernel (``interpret=True`` runs
it on CPU, for tests). No ``reverse`` argument: ``zoo.ops.delta.apply`` runs reverse=True through
this function on the flipped sequence.

Outside the kernels, in XLA (and differentiated by JAX): the [B, T, H, ·] -> [B·H, T, ·] layout, the
padding (T to whole chunks with β = 0, g = 0, q = k = v = 0, which leaves the state unchanged; K and V
to powers of two >= 16 with zeros, which the rule keeps zero), the chunk-local cumulative sum b of g
and the segment numbers of the resets. The custom_vjp covers the kernels: gradients w.r.t. q, k, v,
beta, b and the initial state come from the backward kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    check_chunked_qkv,
    chunk_segments,
    platform_kernels,
    pow2_at_least,
    scalar_rows,
    to_rows,
)
from pallas_kernels.chunked_delta import gpu, tpu
from pallas_kernels.chunked_delta.reference import chunked_delta_reference

__all__ = ["chunked_delta", "chunked_delta_reference"]

PLATFORMS = (None, "gpu", "tpu")


def _kernels(platform, interpret):
    """(forward, backward) for one platform, or platform_dependent dispatchers."""
    return platform_kernels(gpu, tpu, platform, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(q, k, v, beta, b, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    o, state, _ = forward(q, k, v, beta, b, seg, state0, chunk=chunk, scale=scale)
    return o, state


def _core_fwd(q, k, v, beta, b, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    o, state, states = forward(q, k, v, beta, b, seg, state0, chunk=chunk, scale=scale)
    return (o, state), (q, k, v, beta, b, seg, states)


def _core_bwd(chunk, scale, platform, interpret, residuals, cotangents):
    q, k, v, beta, b, seg, states = residuals
    do, dstate = cotangents
    _, backward = _kernels(platform, interpret)
    dq, dk, dv, dbeta, db, dstate0 = backward(q, k, v, beta, b, seg, states, do.astype(v.dtype),
                                              dstate.astype(jnp.float32), chunk=chunk, scale=scale)
    # seg (segment numbers from the reset flags) is piecewise constant: no gradient.
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, dbeta, db, jnp.zeros_like(seg), dstate0


_core.defvjp(_core_fwd, _core_bwd)


def _check(q, k, v, beta, log_decay, initial_state, reset, chunk_size, platform):
    who = "chunked_delta"
    check_chunked_qkv(who, q, k, v, initial_state, reset, chunk_size, platform, PLATFORMS)
    if beta.shape != q.shape[:3]:
        raise ValueError(f"{who}: beta must be [B, T, H] = {q.shape[:3]} (one strength per head and step), "
                         f"got {beta.shape}")
    if log_decay is not None and log_decay.shape != q.shape[:3]:
        raise ValueError(f"{who}: log_decay must be [B, T, H] = {q.shape[:3]} (one log decay per head "
                         f"and step), got {log_decay.shape}")
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{who}: {name} must be a real float array, got {x.dtype}")


def chunked_delta(q, k, v, beta, log_decay=None, initial_state=None, *, reset=None, scale=None,
                  chunk_size: int = 64, platform=None, interpret: bool = False):
    """See the module docstring. Returns (o [B, T, H, V], final_state [B, H, K, V] float32)."""
    _check(q, k, v, beta, log_decay, initial_state, reset, chunk_size, platform)
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    scale = float(dk ** -0.5 if scale is None else scale)
    chunk = min(chunk_size, pow2_at_least(time))
    tp = -(-time // chunk) * chunk
    kp, vp = pow2_at_least(dk), pow2_at_least(dv)
    if vp > 128:
        vp = -(-vp // 128) * 128
    qr, kr, vr = to_rows(q, tp, kp), to_rows(k, tp, kp), to_rows(v, tp, vp)
    # Padded steps have β = 0 (write nothing) and g = 0 (keep the state).
    betar = scalar_rows(beta, tp)
    if log_decay is None:
        b = jnp.zeros((batch * heads, tp), jnp.float32)
    else:
        gr = scalar_rows(log_decay, tp)
        b = jnp.cumsum(gr.reshape(batch * heads, tp // chunk, chunk), axis=-1).reshape(batch * heads, tp)
    seg = chunk_segments(reset, batch, time, heads, tp, chunk)
    if initial_state is None:
        state0 = jnp.zeros((batch * heads, kp, vp), jnp.float32)
    else:
        state0 = jnp.pad(initial_state.astype(jnp.float32).reshape(batch * heads, dk, dv),
                         ((0, 0), (0, kp - dk), (0, vp - dv)))
    o, state = _core(qr, kr, vr, betar, b, seg, state0, chunk, scale, platform, bool(interpret))
    o = jnp.moveaxis(o[:, :time, :dv].reshape(batch, heads, time, dv), 1, 2)
    return o, state[:, :dk, :dv].reshape(batch, heads, dk, dv)
