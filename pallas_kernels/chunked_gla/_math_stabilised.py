"""Per-chunk arithmetic for the max-stabilised form of xLSTM's mLSTM (M. Beck et al., "xLSTM",
NeurIPS 2024), scalar log forget gate g and log input gate i per head, on loaded values::

    m_t = max(g_t + m_{t-1}, i_t)
    S̃_t = exp(g_t + m_{t-1} - m_t) S̃_{t-1} + exp(i_t - m_t) k_t v_tᵀ,      o_t = S̃_tᵀ q_t · scale

The stabiliser sequence m is computed outside the kernel (an associative max-plus scan in XLA,
differentiated by JAX), so inside a chunk, with b the chunk-local cumsum of g, m_in the stabiliser
entering the chunk and the two log weights α_t = b_t - m_t (queries) and β_s = b_s - i_s (keys)::

    o     = ((Q Kᵀ) ⊙ D) V + (exp(α + m_in) ⊙ Q) S̃_in      D[t, s] = exp(α_t - β_s), s <= t
    S̃_out = exp(α_L + m_in) S̃_in + (exp(α_L - β) ⊙ K)ᵀ V       α_L = α at the chunk's last step

Every kept exponent is <= 0 because m_t is a running max over exactly these terms. Across a reset
they need not be, so every exponent is masked BEFORE its exp (segments as in ``_math``). Plain GLA
is the special case α = β = b, m_in = 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunked_gla._math import _dot, _sum2

F32 = jnp.float32


def _last(col):
    """col[C-1] as [1, 1] (a masked sum: no value slicing in Triton)."""
    is_last = lax.broadcasted_iota(jnp.int32, col.shape, 0) == col.shape[0] - 1
    return jnp.sum(jnp.where(is_last, col, 0.0), axis=0, keepdims=True)


def _masked_exp(x, keep):
    """exp(x) where keep, else 0; x is replaced before the exp so nothing overflows."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def _weights(a_col, beta_col, beta_row, mu, seg_col, seg_row):
    c = a_col.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    decay = _masked_exp(a_col - beta_row, (rows >= cols) & (seg_col == seg_row))
    last_seg = _last(seg_col)
    a_last = _last(a_col)
    from_start = _masked_exp(a_col + mu, seg_col == 0)                           # [C, 1]
    to_end = _masked_exp(a_last - beta_col, seg_col == last_seg)                 # [C, 1]
    carry = _masked_exp(a_last + mu, last_seg == 0)                              # [1, 1]
    return decay, from_start, to_end, carry


def forward_chunk(q, k, v, a_col, beta_col, beta_row, mu, seg_col, seg_row, state, scale: float):
    """q, k [C, K], v [C, Vt] (input dtype); a_col, beta_col [C, 1], beta_row [1, C], mu [1, 1],
    seg_col [C, 1], seg_row [1, C] float32; state [K, Vt] float32 (stabilised, entering).
    Returns (o [C, Vt] float32, the stabilised state after the chunk)."""
    dt = q.dtype
    qs = q.astype(F32) * scale
    decay, from_start, to_end, carry = _weights(a_col, beta_col, beta_row, mu, seg_col, seg_row)
    scores = _dot(qs.astype(dt), k, 1, 1) * decay
    o = _dot(scores.astype(dt), v, 1, 0) + _dot((qs * from_start).astype(dt), state.astype(dt), 1, 0)
    new_state = carry * state + _dot((k.astype(F32) * to_end).astype(dt), v, 0, 0)
    return o, new_state


def backward_chunk(q, k, v, a_col, beta_col, beta_row, mu, seg_col, seg_row, state, do, dstate,
                   scale: float):
    """Gradients of one chunk: (dq, dk [C, K], dv [C, Vt], da [C, 1], dbeta [C, 1], dmu [1, 1],
    dstate entering), float32, this V tile's share."""
    dt = q.dtype
    qs = q.astype(F32) * scale
    kf = k.astype(F32)
    decay, from_start, to_end, carry = _weights(a_col, beta_col, beta_row, mu, seg_col, seg_row)
    scores = _dot(qs.astype(dt), k, 1, 1) * decay
    dscores = _dot(do, v, 1, 1) * decay
    dq_inter = from_start * _dot(do, state.astype(dt), 1, 1)
    dqs = _dot(dscores.astype(dt), k, 1, 0) + dq_inter
    dk_inter = to_end * _dot(v, dstate.astype(dt), 1, 1)
    dk = _dot(dscores.astype(dt), qs.astype(dt), 0, 0) + dk_inter
    dv = _dot(scores.astype(dt), do, 0, 0) + _dot((kf * to_end).astype(dt), dstate.astype(dt), 1, 0)
    # Every term with exp(α_t ...) is linear in it: dα_t = qs_t · dqs_t; likewise dβ_s = -k_s · dk_s.
    da = jnp.sum(qs * dqs, axis=1, keepdims=True)
    dbeta = -jnp.sum(kf * dk, axis=1, keepdims=True)
    dcarry = carry * _sum2(state * dstate)
    da_last = _sum2(kf * dk_inter) + dcarry                    # exp(α_L - β) and exp(α_L + m_in)
    c = a_col.shape[0]
    da = da + jnp.where(lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1, da_last, 0.0)
    dmu = _sum2(qs * dq_inter) + dcarry
    dstate_in = carry * dstate + _dot((qs * from_start).astype(dt), do, 0, 0)
    return dqs * scale, dk, dv, da, dbeta, dmu, dstate_in
