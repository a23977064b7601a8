"""The per-chunk arithmetic shared by the GPU (Triton) and TPU (Mosaic) kernels, on loaded values.

Scalar decay per head (simple GLA / RetNet / SSD). Inside a chunk of C steps, with b the chunk-local
inclusive cumulative sum of the log decays g and B = b[C-1] the chunk's total::

    o     = ((Q Kᵀ) ⊙ D) V + (exp(b) ⊙ Q) S          D[t, s] = exp(b_t - b_s) for s <= t, else 0
    S_out = exp(B) S + (exp(B - b) ⊙ K)ᵀ V

Every exponent is b_t - b_s with s <= t, B - b_s or b_t: sums of log decays over steps, so for
g <= 0 nothing exponentiates a positive number; entries above the diagonal are replaced by 0 before
the exp. Matmuls take the input dtype and accumulate in float32; the state is float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _dot(a, b, contract_a: int, contract_b: int):
    """a·b contracting one axis of each 2-D operand, float32 accumulation."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=F32)


def _decay_mask(b_col, b_row, seg_col, seg_row):
    """D[t, s] = exp(b_t - b_s) for s <= t in one segment, else 0 (masked before the exp)."""
    c = b_col.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = (rows >= cols) & (seg_col == seg_row)
    return jnp.where(causal, jnp.exp(jnp.where(causal, b_col - b_row, 0.0)), 0.0)


def _chunk_total(b_row):
    """B = b[C-1] as a [1, 1] array (a masked sum: no value slicing, which Triton lacks)."""
    c = b_row.shape[1]
    last = lax.broadcasted_iota(jnp.int32, (1, c), 1) == c - 1
    return jnp.sum(jnp.where(last, b_row, 0.0), axis=1, keepdims=True)


def _segment_masks(seg_col, seg_row):
    """From the chunk-local segment numbers (a running count of resets, 0 before the chunk's first
    one): which steps still see the entering state [C, 1], which steps reach the leaving state
    [C, 1] (the last segment's), and whether the entering state survives the chunk [1, 1]."""
    last = _chunk_total(seg_row)
    return (seg_col == 0).astype(F32), (seg_col == last).astype(F32), (last == 0).astype(F32)


def _sum2(x):
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def forward_chunk(q, k, v, b_col, b_row, seg_col, seg_row, state, scale: float):
    """One chunk: q, k [C, K], v [C, Vt] (input dtype), b_col [C, 1], b_row [1, C] (float32),
    seg_col [C, 1], seg_row [1, C] the segment numbers (float32; all 0 without resets),
    state [K, Vt] float32 entering the chunk. Returns (o [C, Vt] float32, state after the chunk)."""
    dt = q.dtype
    qs = q.astype(F32) * scale
    sees_in, reaches_out, keeps_in = _segment_masks(seg_col, seg_row)
    scores = _dot(qs.astype(dt), k, 1, 1) * _decay_mask(b_col, b_row, seg_col, seg_row)     # [C, C]
    q_from_start = (qs * (jnp.exp(b_col) * sees_in)).astype(dt)
    o = _dot(scores.astype(dt), v, 1, 0) + _dot(q_from_start, state.astype(dt), 1, 0)
    total = _chunk_total(b_row)
    k_to_end = (k.astype(F32) * (jnp.exp(total - b_col) * reaches_out)).astype(dt)
    new_state = (jnp.exp(total) * keeps_in) * state + _dot(k_to_end, v, 0, 0)
    return o, new_state


def backward_chunk(q, k, v, b_col, b_row, seg_col, seg_row, state, do, dstate, scale: float):
    """Gradients of one chunk. ``state`` is the state entering the chunk, ``dstate`` the cotangent of the
    state leaving it. Returns (dq, dk [C, K], dv [C, Vt], db [C, 1], dstate entering the chunk), all
    float32; dq and dk are this V tile's share, db the gradient w.r.t. the chunk-local cumulative
    log decay b (the chunk total's share added to the last row)."""
    dt = q.dtype
    qs = q.astype(F32) * scale
    decay = _decay_mask(b_col, b_row, seg_col, seg_row)
    sees_in, reaches_out, keeps_in = _segment_masks(seg_col, seg_row)
    total = _chunk_total(b_row)
    from_start = jnp.exp(b_col) * sees_in                                       # [C, 1]
    to_end = jnp.exp(total - b_col) * reaches_out                               # [C, 1]
    carry = jnp.exp(total) * keeps_in                                           # [1, 1]
    scores = _dot(qs.astype(dt), k, 1, 1) * decay                               # (Q Kᵀ) ⊙ D
    dscores = _dot(do, v, 1, 1) * decay                                         # (dO Vᵀ) ⊙ D
    dq_inter = from_start * _dot(do, state.astype(dt), 1, 1)                # exp(b) ⊙ dO Sᵀ
    dqs = _dot(dscores.astype(dt), k, 1, 0) + dq_inter                          # w.r.t. the scaled q
    dk_inter = to_end * _dot(v, dstate.astype(dt), 1, 1)                        # exp(B-b) ⊙ V dS'ᵀ
    dk = _dot(dscores.astype(dt), qs.astype(dt), 0, 0) + dk_inter
    dv = (_dot(scores.astype(dt), do, 0, 0)
          + _dot((k.astype(F32) * to_end).astype(dt), dstate.astype(dt), 1, 0))
    kf = k.astype(F32)
    db = jnp.sum(qs * dqs, axis=1, keepdims=True) - jnp.sum(kf * dk, axis=1, keepdims=True)
    dtotal = (carry * _sum2(state * dstate)
              + jnp.sum(jnp.sum(kf * dk_inter, axis=1, keepdims=True), axis=0, keepdims=True))
    c = b_col.shape[0]
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    db = db + jnp.where(is_last, dtotal, 0.0)
    dstate_in = carry * dstate + _dot((qs * from_start).astype(dt), do, 0, 0)
    return dqs * scale, dk, dv, db, dstate_in
