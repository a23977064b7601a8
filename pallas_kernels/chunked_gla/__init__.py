"""chunked_gla: the chunked form of zoo's matrix engine for a scalar log decay per head (simple GLA,
RetNet, Mamba-2/SSD) or one per key dimension (GLA), as Pallas kernels for GPU (Triton) and TPU
(Mosaic) with Pallas backward kernels.

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ q_t · scale     (g_t scalar or in R^K)

(S. Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", ICML 2024;
Y. Sun et al., "Retentive Network", 2023.) Public function::

    o, final_state = chunked_gla(q, k, v, g, initial_state=None, *, reset=None, scale=None,
                                 chunk_size=64, platform=None, interpret=False)

q, k [B, T, H, K], v [B, T, H, V] (float32 or bfloat16), g [B, T, H] or [B, T, H, K] log decays
(per key: ``_math_per_key``, sub-chunks of 16 inside each chunk), initial_state
[B, H, K, V] (float32; None: zeros), reset bool [B, T] (True: the state is dropped before
step t, as in zoo's engines; None: no resets). o is [B, T, H, V] in v's dtype, final_state
[B, H, K, V] float32.
``platform=None`` picks by ``lax.platform_dependent``: the Triton kernel on cuda, the Mosaic kernel on
tpu, the Triton kernel body in interpret mode on cpu; ``platform="gpu"``/``"tpu"`` forces one kernel
(``interpret=True`` runs it on CPU, for tests). Not supported here (the caller falls back to XLA or,
for reverse, flips time itself): the mLSTM input gate / stabiliser, normalisers, reverse, exclusive
readout.

Outside the kernels, in XLA (and differentiated by JAX): the [B, T, H, ·] -> [B·H, T, ·] layout, the
padding (T to whole chunks with g = 0, k = v = 0, which leaves the state unchanged; K and V to
powers of two >= 16 with zeros), and the chunk-local cumulative sum b of g (per key: also the chunk
totals as columns). The custom_vjp covers the kernels: gradients w.r.t. q, k, v, b (and the totals)
and the initial state come from the backward kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import check_chunked_qkv, chunk_segments, platform_kernels, pow2_at_least, to_rows
from pallas_kernels.chunked_gla import gpu, tpu
from pallas_kernels.chunked_gla.reference import chunked_gla_reference

__all__ = ["chunked_gla", "chunked_gla_reference", "chunked_mlstm"]

PLATFORMS = (None, "gpu", "tpu")


def _kernels(platform, interpret, kind=""):
    """(forward, backward) for one platform, or platform_dependent dispatchers; kind "" (scalar decay),
    "_per_key" or "_stabilised" (mLSTM)."""
    return platform_kernels(gpu, tpu, platform, interpret, names=("forward" + kind, "backward" + kind))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core_per_key(q, k, v, b, total_col, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret, "_per_key")
    o, state, _ = forward(q, k, v, b, total_col, seg, state0, chunk=chunk, scale=scale)
    return o, state


def _core_per_key_fwd(q, k, v, b, total_col, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret, "_per_key")
    o, state, states = forward(q, k, v, b, total_col, seg, state0, chunk=chunk, scale=scale)
    return (o, state), (q, k, v, b, total_col, seg, states)


def _core_per_key_bwd(chunk, scale, platform, interpret, residuals, cotangents):
    q, k, v, b, total_col, seg, states = residuals
    do, dstate = cotangents
    _, backward = _kernels(platform, interpret, "_per_key")
    dq, dk, dv, db, dtotal, dstate0 = backward(q, k, v, b, total_col, seg, states, do.astype(v.dtype),
                                               dstate.astype(jnp.float32), chunk=chunk, scale=scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, db, dtotal, jnp.zeros_like(seg), dstate0


_core_per_key.defvjp(_core_per_key_fwd, _core_per_key_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _core_stabilised(q, k, v, a, beta, mu, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret, "_stabilised")
    o, state, _ = forward(q, k, v, a, beta, mu, seg, state0, chunk=chunk, scale=scale)
    return o, state


def _core_stabilised_fwd(q, k, v, a, beta, mu, seg, state0, chunk, scale, platform, interpret):
    forward, _ = _kernels(platform, interpret, "_stabilised")
    o, state, states = forward(q, k, v, a, beta, mu, seg, state0, chunk=chunk, scale=scale)
    return (o, state), (q, k, v, a, beta, mu, seg, states)


def _core_stabilised_bwd(chunk, scale, platform, interpret, residuals, cotangents):
    q, k, v, a, beta, mu, seg, states = residuals
    do, dstate = cotangents
    _, backward = _kernels(platform, interpret, "_stabilised")
    dq, dk, dv, da, dbeta, dmu, dstate0 = backward(q, k, v, a, beta, mu, seg, states, do.astype(v.dtype),
                                                   dstate.astype(jnp.float32), chunk=chunk, scale=scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, da, dbeta, dmu, jnp.zeros_like(seg), dstate0


_core_stabilised.defvjp(_core_stabilised_fwd, _core_stabilised_bwd)


def _check(q, k, v, g, initial_state, reset, chunk_size, platform):
    who = "chunked_gla"
    check_chunked_qkv(who, q, k, v, initial_state, reset, chunk_size, platform, PLATFORMS)
    if g.shape not in (q.shape[:3], q.shape):
        raise ValueError(f"{who}: g must be [B, T, H] = {q.shape[:3]} (one log decay per head) or "
                         f"[B, T, H, K] = {q.shape} (one per key dimension), got {g.shape}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"{who}: g must be a real float array, got {g.dtype}")


def chunked_gla(q, k, v, g, initial_state=None, *, reset=None, scale=None, chunk_size: int = 64,
                platform=None, interpret: bool = False):
    """See the module docstring. Returns (o [B, T, H, V], final_state [B, H, K, V] float32)."""
    _check(q, k, v, g, initial_state, reset, chunk_size, platform)
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    scale = float(dk ** -0.5 if scale is None else scale)
    chunk = min(chunk_size, pow2_at_least(time))
    tp = -(-time // chunk) * chunk
    kp, vp = pow2_at_least(dk), pow2_at_least(dv)
    if vp > 128:
        vp = -(-vp // 128) * 128
    qr, kr, vr = to_rows(q, tp, kp), to_rows(k, tp, kp), to_rows(v, tp, vp)
    # Padded steps have g = 0: exp(0) = 1 keeps the state, and k = v = 0 add nothing to it.
    seg = chunk_segments(reset, batch, time, heads, tp, chunk)
    if initial_state is None:
        state0 = jnp.zeros((batch * heads, kp, vp), jnp.float32)
    else:
        state0 = jnp.pad(initial_state.astype(jnp.float32).reshape(batch * heads, dk, dv),
                         ((0, 0), (0, kp - dk), (0, vp - dv)))
    if g.ndim == 4:
        gr = to_rows(g.astype(jnp.float32), tp, kp)
        b = jnp.cumsum(gr.reshape(batch * heads, tp // chunk, chunk, kp), axis=2)
        total_col = b[:, :, -1, :].reshape(batch * heads, (tp // chunk) * kp, 1)
        o, state = _core_per_key(qr, kr, vr, b.reshape(batch * heads, tp, kp), total_col, seg, state0,
                                 chunk, scale, platform, bool(interpret))
    else:
        gr = to_rows(g.astype(jnp.float32)[..., None], tp, 1)[..., 0]
        b = jnp.cumsum(gr.reshape(batch * heads, tp // chunk, chunk), axis=-1).reshape(batch * heads, tp)
        o, state = _core(qr, kr, vr, b, seg, state0, chunk, scale, platform, bool(interpret))
    o = jnp.moveaxis(o[:, :time, :dv].reshape(batch, heads, time, dv), 1, 2)
    return o, state[:, :dk, :dv].reshape(batch, heads, dk, dv)


# ------------------------------------------------------------------------------------------------
# mLSTM (xLSTM's matrix memory, M. Beck et al., NeurIPS 2024) with its input gate, max-stabiliser and
# max_abs normaliser: zoo.ops.matrix with log_input_gate and normalizer="max_abs".

NEG = -1e30        # "minus infinity" kept finite: a reset's carry weight, a padded step's input gate


def _stabiliser(g, i, reset_rows, m0):
    """m_t = max(g_t + m_{t-1}, i_t) along axis 1 of [R, T], m_{-1} = m0 [R], a reset making m_{t-1} = 0:
    an associative max-plus scan (log depth; JAX differentiates it). Step t is the map
    m -> max(a_t + m, c_t); two maps compose to (a1 + a2, max(c1 + a2, c2))."""
    a = jnp.where(reset_rows, NEG, g)
    c = jnp.where(reset_rows, jnp.maximum(g, i), i)

    def compose(first, second):
        (a1, c1), (a2, c2) = first, second
        return a1 + a2, jnp.maximum(c1 + a2, c2)

    a_pre, c_pre = lax.associative_scan(compose, (a, c), axis=1)
    return jnp.maximum(a_pre + m0[:, None], c_pre)


def _check_mlstm(q, k, v, log_f, log_i, initial_state, reset, chunk_size, platform):
    who = "chunked_mlstm"
    _check(q, k, v, log_f, None, reset, chunk_size, platform)
    if log_f.shape != q.shape[:3]:
        raise ValueError(f"{who}: log_f must be [B, T, H] = {q.shape[:3]}, got {log_f.shape}")
    if log_i.shape != q.shape[:3] or not jnp.issubdtype(log_i.dtype, jnp.floating):
        raise ValueError(f"{who}: log_i must be a float [B, T, H] = {q.shape[:3]}, got {log_i.dtype} "
                         f"{log_i.shape}")
    if initial_state is not None:
        b, _, h, dk = q.shape
        want = ((b, h, dk, v.shape[-1]), (b, h, dk), (b, h))
        got = tuple(None if x is None else tuple(x.shape) for x in initial_state)
        if len(got) != 3 or any(g_ is not None and g_ != w for g_, w in zip(got, want, strict=True)):
            raise ValueError(f"{who}: initial_state must be (S, n, m) of shapes {want} (None parts: zeros), "
                             f"got {got}")


def chunked_mlstm(q, k, v, log_f, log_i, initial_state=None, *, reset=None, scale=None, eps: float = 1e-6,
                  chunk_size: int = 64, platform=None, interpret: bool = False):
    """mLSTM as ``zoo.ops.matrix.apply(q, k, v, log_f, log_input_gate=log_i, normalizer="max_abs")``::

        m_t = max(log_f_t + m_{t-1}, log_i_t)
        S̃_t = exp(log_f_t + m_{t-1} - m_t) S̃_{t-1} + exp(log_i_t - m_t) k_t v_tᵀ     (ñ_t: v -> 1)
        h_t = S̃_tᵀ q_t / (max(|ñ_tᵀ q_t|, exp(-m_t)) + eps)      (q scaled by ``scale``, default K^-1/2)

    q, k [B, T, H, K], v [B, T, H, V] (float32 or bfloat16), log_f, log_i [B, T, H]; initial_state
    (S [B, H, K, V], n [B, H, K], m [B, H]) with None parts zero; reset bool [B, T] (a fresh state,
    m = 0). Returns (h [B, T, H, V] in v's dtype, (S, n, m) float32).

    The stabiliser sequence m comes from an associative scan in XLA; the kernel (``_math_stabilised``)
    gets α = b - m and β = b - log_i (b the chunk-local cumsum of log_f) and the stabiliser entering
    each chunk, and carries S̃ with n as one more value column. The normaliser runs in XLA."""
    _check_mlstm(q, k, v, log_f, log_i, initial_state, reset, chunk_size, platform)
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    bh = batch * heads
    scale = float(dk ** -0.5 if scale is None else scale)
    chunk = min(chunk_size, pow2_at_least(time))
    tp = -(-time // chunk) * chunk
    nc = tp // chunk
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)   # the key sum n
    kp, vp = pow2_at_least(dk), pow2_at_least(dv + 1)
    if vp > 128:
        vp = -(-vp // 128) * 128
    qr, kr, vr = to_rows(q, tp, kp), to_rows(k, tp, kp), to_rows(v1, tp, vp)
    s0, n0, m0 = (None, None, None) if initial_state is None else initial_state
    s0 = jnp.zeros((batch, heads, dk, dv), jnp.float32) if s0 is None else s0.astype(jnp.float32)
    n0 = jnp.zeros((batch, heads, dk), jnp.float32) if n0 is None else n0.astype(jnp.float32)
    m0 = jnp.zeros((bh,), jnp.float32) if m0 is None else m0.astype(jnp.float32).reshape(bh)
    state0 = jnp.concatenate([s0, n0[..., None]], axis=-1).reshape(bh, dk, dv + 1)
    state0 = jnp.pad(state0, ((0, 0), (0, kp - dk), (0, vp - dv - 1)))
    # Padded steps: log_f = 0, log_i = NEG, k = v = 0: m, S̃ and ñ stay as they are.
    gr = to_rows(log_f.astype(jnp.float32)[..., None], tp, 1)[..., 0]
    ir = jnp.pad(to_rows(log_i.astype(jnp.float32)[..., None], time, 1)[..., 0], ((0, 0), (0, tp - time)),
                 constant_values=NEG)
    if reset is None:
        reset_rows = jnp.zeros((bh, tp), bool)
    else:
        reset_rows = jnp.pad(jnp.broadcast_to(reset[:, None, :], (batch, heads, time)).reshape(bh, time),
                             ((0, 0), (0, tp - time)))
    m = _stabiliser(gr, ir, reset_rows, m0)                                              # [BH, Tp]
    b = jnp.cumsum(gr.reshape(bh, nc, chunk), axis=-1).reshape(bh, tp)
    mu = jnp.concatenate([m0[:, None], m[:, chunk - 1:tp - 1:chunk]], axis=1)             # [BH, NC]
    seg = chunk_segments(reset, batch, time, heads, tp, chunk)
    o, state = _core_stabilised(qr, kr, vr, b - m, b - ir, mu, seg, state0, chunk, scale, platform,
                                bool(interpret))
    num, den = o[:, :time, :dv].astype(jnp.float32), o[:, :time, dv].astype(jnp.float32)
    m_seq = m[:, :time]
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_seq))[..., None] + eps)
    h = jnp.moveaxis(h.reshape(batch, heads, time, dv), 1, 2).astype(v.dtype)
    s_out = state[:, :dk, :dv].reshape(batch, heads, dk, dv)
    n_out = state[:, :dk, dv].reshape(batch, heads, dk)
    return h, (s_out, n_out, m_seq[:, -1].reshape(batch, heads))
