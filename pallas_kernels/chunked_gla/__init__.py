"""chunked_gla: the chunked form of zoo's matrix engine for a scalar log decay per head (simple GLA,
RetNet, Mamba-2/SSD), as a Pallas kernel for GPU (Triton) and TPU (Mosaic) with a Pallas backward.

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ q_t · scale

(S. Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", ICML 2024;
Y. Sun et al., "Retentive Network", 2023.) Public function::

    o, final_state = chunked_gla(q, k, v, g, initial_state=None, *, reset=None, scale=None,
                                 chunk_size=64, platform=None, interpret=False)

q, k [B, T, H, K], v [B, T, H, V] (float32 or bfloat16), g [B, T, H] log decays, initial_state
[B, H, K, V] (float32; None: zeros), reset bool [B, T] (True: the state is dropped before
step t, as in zoo's engines; None: no resets). o is [B, T, H, V] in v's dtype, final_state
[B, H, K, V] float32.
``platform=None`` picks by ``lax.platform_dependent``: the Triton kernel on cuda, the Mosaic kernel on
tpu, the Triton kernel body in interpret mode on cpu; ``platform="gpu"``/``"tpu"`` forces one kernel
(``interpret=True`` runs it on CPU, for tests). Not supported here (the caller falls back to XLA):
per-key decays, the mLSTM input gate / stabiliser, normalisers, reverse, exclusive readout.

Outside the kernels, in XLA (and differentiated by JAX): the [B, T, H, ·] -> [B·H, T, ·] layout, the
padding (T to whole chunks with g = 0, k = v = 0, which leaves the state unchanged; K and V to
powers of two >= 16 with zeros), and the chunk-local cumulative sum b of g. The custom_vjp covers the
kernels: gradients w.r.t. q, k, v, b and the initial state come from the backward kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunked_gla import gpu, tpu
from pallas_kernels.chunked_gla.reference import chunked_gla_reference

__all__ = ["chunked_gla", "chunked_gla_reference"]

PLATFORMS = (None, "gpu", "tpu")
DTYPES = (jnp.float32, jnp.bfloat16)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _kernels(platform, interpret):
    """(forward, backward) for one platform, or platform_dependent dispatchers."""
    if platform == "gpu":
        return (functools.partial(gpu.forward, interpret=interpret),
                functools.partial(gpu.backward, interpret=interpret))
    if platform == "tpu":
        return (functools.partial(tpu.forward, interpret=interpret),
                functools.partial(tpu.backward, interpret=interpret))

    def dispatch(name):
        def run(*args, **kw):
            per_platform = {
                "cpu": functools.partial(getattr(gpu, name), interpret=True, **kw),
                "cuda": functools.partial(getattr(gpu, name), **kw),
                "tpu": functools.partial(getattr(tpu, name), **kw),
            }
            return lax.platform_dependent(*args, **per_platform)
        return run

    return dispatch("forward"), dispatch("backward")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _core(q, k, v, b, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    o, state, _ = forward(q, k, v, b, seg, state0, chunk=chunk, scale=scale)
    return o, state


def _core_fwd(q, k, v, b, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    o, state, states = forward(q, k, v, b, seg, state0, chunk=chunk, scale=scale)
    return (o, state), (q, k, v, b, seg, states)


def _core_bwd(chunk, scale, platform, interpret, residuals, cotangents):
    q, k, v, b, seg, states = residuals
    do, dstate = cotangents
    _, backward = _kernels(platform, interpret)
    dq, dk, dv, db, dstate0 = backward(q, k, v, b, seg, states, do.astype(v.dtype),
                                       dstate.astype(jnp.float32), chunk=chunk, scale=scale)
    # seg (segment numbers from the reset flags) is piecewise constant: no gradient.
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, db, jnp.zeros_like(seg), dstate0


_core.defvjp(_core_fwd, _core_bwd)


def _check(q, k, v, g, initial_state, reset, chunk_size, platform):
    who = "chunked_gla"
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{who}: q and k must be [B, T, H, K] of one shape, got q {q.shape}, k {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{who}: v must be [B, T, H, V] = {q.shape[:3]} + (V,), got {v.shape}")
    if g.shape != q.shape[:3]:
        raise ValueError(f"{who}: g must be [B, T, H] = {q.shape[:3]} (one log decay per head), "
                         f"got {g.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise TypeError(f"{who}: {name} must be float32 or bfloat16, got {x.dtype}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"{who}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"{who}: g must be a real float array, got {g.dtype}")
    b, _, h, dk = q.shape
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"{who}: initial_state must be [B, H, K, V] = {(b, h, dk, v.shape[-1])}, "
                         f"got {initial_state.shape}")
    if reset is not None and (reset.shape != (b, q.shape[1]) or reset.dtype != jnp.bool_):
        raise ValueError(f"{who}: reset must be bool [B, T] = {(b, q.shape[1])}, "
                         f"got {reset.dtype} {reset.shape}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{who}: chunk_size must be a power of two >= 16, got {chunk_size}")
    if platform not in PLATFORMS:
        raise ValueError(f"{who}: platform must be one of {PLATFORMS}, got {platform!r}")


def _to_rows(x, tp, width):
    """[B, T, H, W] -> [B·H, Tp, width], zero-padded in time and width."""
    batch, time, heads, w = x.shape
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, time, w)
    return jnp.pad(x, ((0, 0), (0, tp - time), (0, width - w)))


def _segments(reset, batch, time, heads, tp, chunk):
    """[B·H, Tp] float32: inside each chunk, the number of resets at or before each step (0: the step
    still sees the state entering the chunk). Padded steps never reset."""
    if reset is None:
        return jnp.zeros((batch * heads, tp), jnp.float32)
    flags = jnp.pad(reset.astype(jnp.float32), ((0, 0), (0, tp - time)))
    seg = jnp.cumsum(flags.reshape(batch, tp // chunk, chunk), axis=-1).reshape(batch, 1, tp)
    return jnp.broadcast_to(seg, (batch, heads, tp)).reshape(batch * heads, tp)


def chunked_gla(q, k, v, g, initial_state=None, *, reset=None, scale=None, chunk_size: int = 64,
                platform=None, interpret: bool = False):
    """See the module docstring. Returns (o [B, T, H, V], final_state [B, H, K, V] float32)."""
    _check(q, k, v, g, initial_state, reset, chunk_size, platform)
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    scale = float(dk ** -0.5 if scale is None else scale)
    chunk = min(chunk_size, _pow2_at_least_16(time))
    tp = -(-time // chunk) * chunk
    kp, vp = _pow2_at_least_16(dk), _pow2_at_least_16(dv)
    if vp > 128:
        vp = -(-vp // 128) * 128
    qr, kr, vr = _to_rows(q, tp, kp), _to_rows(k, tp, kp), _to_rows(v, tp, vp)
    # Padded steps have g = 0: exp(0) = 1 keeps the state, and k = v = 0 add nothing to it.
    gr = _to_rows(g.astype(jnp.float32)[..., None], tp, 1)[..., 0]
    b = jnp.cumsum(gr.reshape(batch * heads, tp // chunk, chunk), axis=-1).reshape(batch * heads, tp)
    seg = _segments(reset, batch, time, heads, tp, chunk)
    if initial_state is None:
        state0 = jnp.zeros((batch * heads, kp, vp), jnp.float32)
    else:
        state0 = jnp.pad(initial_state.astype(jnp.float32).reshape(batch * heads, dk, dv),
                         ((0, 0), (0, kp - dk), (0, vp - dv)))
    o, state = _core(qr, kr, vr, b, seg, state0, chunk, scale, platform, bool(interpret))
    o = jnp.moveaxis(o[:, :time, :dv].reshape(batch, heads, time, dv), 1, 2)
    return o, state[:, :dk, :dv].reshape(batch, heads, dk, dv)
