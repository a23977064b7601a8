"""Per-chunk arithmetic for log decays per key dimension (GLA, S. Yang et al., ICML 2024, §4: the
secondary-level chunking), shared by the GPU (Triton) and TPU (Mosaic) kernels, on loaded values::

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ q_t · scale,    g_t in R^K, g <= 0

A chunk of C steps is handled as n = C / 16 sub-chunks of 16 rows, passed as Python lists (the kernel
loads each sub-chunk from its refs: Triton has no slicing of values). With b the chunk-local
cumulative sum of g (per key) and B its last row:

* scores between a later sub-chunk i (rows t) and an earlier one j (columns s): with r_i the first
  row of sub-chunk i as reference, ``(q_t ⊙ exp(b_t - b_r)) · (k_s ⊙ exp(b_r - b_s))``: both factors
  are <= 1 (s < r <= t) and the product is exp(b_t - b_s) exactly: one plain matmul per pair;
* the diagonal 16 × 16 blocks: ``Σ_k q_tk k_sk exp(b_tk - b_sk)`` for s <= t as a [16, 16, K]
  product, the exponent replaced by 0 above the diagonal BEFORE the exp (nothing can overflow);
* the entering state: ``(q_t ⊙ exp(b_t)) S``; the leaving state:
  ``Diag(exp(B)) S + Σ_s (k_s ⊙ exp(B - b_s)) v_sᵀ`` (every exponent <= 0).

Resets (segment numbers, as in ``_math``) multiply the scores by "same segment", keep the entering
state only for segment 0 and its decayed copy only when the chunk has no reset, and let only the
last segment's keys reach the leaving state.

Diag(exp(B)) S needs B as a column [K, 1] while b's rows are [1, K]; rather than transposing a
vector in the kernel, the caller passes the chunk totals as a column (``total_col``) and gets their
gradient back as a column (``dtotal_col``), summed into b's last row by XLA's autodiff.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunked_gla._math import _dot

F32 = jnp.float32
SUB = 16


def _first_row(x):
    """x[0:1, :] as a masked sum (no value slicing, which Triton lacks)."""
    first = lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0) == 0
    return jnp.sum(jnp.where(first, x, 0.0), axis=0, keepdims=True)


def _last_row(x):
    last = lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0) == x.shape[0] - 1
    return jnp.sum(jnp.where(last, x, 0.0), axis=0, keepdims=True)


def _last_lane(x):
    last = lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1) == x.shape[1] - 1
    return jnp.sum(jnp.where(last, x, 0.0), axis=1, keepdims=True)


def _diag_factors(b, seg_col, seg_row):
    """For one sub-chunk: the [16, 16, K] factors exp(b_t - b_s) for s <= t (0 elsewhere; the exponent
    is replaced by 0 before the exp) and the [16, 16] mask (s <= t, same segment)."""
    n = b.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    causal = rows >= cols
    mask = (causal & (seg_col == seg_row)).astype(F32)
    causal3 = causal[:, :, None]
    decay = jnp.where(causal3, jnp.exp(jnp.where(causal3, b[:, None, :] - b[None, :, :], 0.0)), 0.0)
    return decay, mask


def _diag_scores(qs, k, decay, mask):
    """A[t, s] = Σ_k qs_tk k_sk exp(b_tk - b_sk) over one diagonal block (float32)."""
    return jnp.sum(qs[:, None, :] * k.astype(F32)[None, :, :] * decay, axis=-1) * mask


def _chunk_flags(seg_cols, seg_rows):
    """Per sub-chunk: sees the entering state [16, 1], reaches the leaving state [16, 1]; and whether
    the entering state survives the chunk [1, 1] (see ``_math._segment_masks``)."""
    last = _last_lane(seg_rows[-1])
    sees_in = [(s == 0).astype(F32) for s in seg_cols]
    reaches_out = [(s == last).astype(F32) for s in seg_cols]
    return sees_in, reaches_out, (last == 0).astype(F32)


def forward_chunk(qs_in, ks, vs, bs, seg_cols, seg_rows, total_col, state, scale: float):
    """One chunk as n sub-chunks: lists of q, k [16, K], v [16, Vt] (input dtype), b [16, K] (float32),
    seg_col [16, 1], seg_row [1, 16]; total_col [K, 1] = B as a column; state [K, Vt] float32.
    Returns (list of o [16, Vt] float32, the state after the chunk)."""
    dt = qs_in[0].dtype
    n = len(qs_in)
    qs = [q.astype(F32) * scale for q in qs_in]
    sees_in, reaches_out, keeps_in = _chunk_flags(seg_cols, seg_rows)
    total_row = _last_row(bs[-1])
    state_dt = state.astype(dt)
    outs = []
    for i in range(n):
        ref = _first_row(bs[i])
        q_local = (qs[i] * jnp.exp(bs[i] - ref)).astype(dt)                     # <= 1 factors
        decay, mask = _diag_factors(bs[i], seg_cols[i], seg_rows[i])
        scores = _diag_scores(qs[i], ks[i], decay, mask)
        o = _dot(scores.astype(dt), vs[i], 1, 0)
        for j in range(i):
            k_local = (ks[j].astype(F32) * jnp.exp(ref - bs[j])).astype(dt)
            a = _dot(q_local, k_local, 1, 1) * (seg_cols[i] == seg_rows[j]).astype(F32)
            o = o + _dot(a.astype(dt), vs[j], 1, 0)
        q_from_start = (qs[i] * (jnp.exp(bs[i]) * sees_in[i])).astype(dt)
        outs.append(o + _dot(q_from_start, state_dt, 1, 0))
    new_state = (jnp.exp(total_col) * keeps_in) * state
    for j in range(n):
        k_to_end = (ks[j].astype(F32) * (jnp.exp(total_row - bs[j]) * reaches_out[j])).astype(dt)
        new_state = new_state + _dot(k_to_end, vs[j], 0, 0)
    return outs, new_state


def backward_chunk(qs_in, ks, vs, bs, seg_cols, seg_rows, total_col, state, dos, dstate, scale: float):
    """Gradients of one chunk (lists as in ``forward_chunk``; dos the output cotangents, dstate that of
    the leaving state, state the entering one). Returns (lists dq, dk [16, K], dv [16, Vt], db [16, K],
    dtotal_col [K, 1], dstate entering the chunk), float32 and this V tile's share. db is the
    gradient w.r.t. b except the Diag(exp(B)) S term, which is dtotal_col."""
    dt = qs_in[0].dtype
    n = len(qs_in)
    qs = [q.astype(F32) * scale for q in qs_in]
    kf = [k.astype(F32) for k in ks]
    sees_in, reaches_out, keeps_in = _chunk_flags(seg_cols, seg_rows)
    total_row = _last_row(bs[-1])
    state_dt, dstate_dt = state.astype(dt), dstate.astype(dt)
    dq = [None] * n
    dk = [None] * n
    dv = [None] * n
    dk_total = jnp.zeros_like(total_row)                  # Σ_s k_s ⊙ dk_inter,s: the exp(B - b) terms
    for j in range(n):
        to_end = jnp.exp(total_row - bs[j]) * reaches_out[j]
        dk_inter = to_end * _dot(vs[j], dstate_dt, 1, 1)                              # [16, K]
        dk_total = dk_total + jnp.sum(kf[j] * dk_inter, axis=0, keepdims=True)
        dk[j] = dk_inter
        dv[j] = _dot((kf[j] * to_end).astype(dt), dstate_dt, 1, 0)
    for i in range(n):
        ref = _first_row(bs[i])
        to_ref = jnp.exp(bs[i] - ref)
        q_local = (qs[i] * to_ref).astype(dt)
        decay, mask = _diag_factors(bs[i], seg_cols[i], seg_rows[i])
        scores = _diag_scores(qs[i], ks[i], decay, mask)
        dscores = _dot(dos[i], vs[i], 1, 1) * mask
        dq_i = jnp.sum(dscores[:, :, None] * kf[i][None, :, :] * decay, axis=1)
        dk[i] = dk[i] + jnp.sum(dscores[:, :, None] * qs[i][:, None, :] * decay, axis=0)
        dv[i] = dv[i] + _dot(scores.astype(dt), dos[i], 0, 0)
        dq_local = jnp.zeros_like(qs[i])
        for j in range(i):
            from_ref = jnp.exp(ref - bs[j])
            k_local = (kf[j] * from_ref).astype(dt)
            same = (seg_cols[i] == seg_rows[j]).astype(F32)
            a = _dot(q_local, k_local, 1, 1) * same
            da = _dot(dos[i], vs[j], 1, 1) * same
            dq_local = dq_local + _dot(da.astype(dt), k_local, 1, 0)
            dk[j] = dk[j] + from_ref * _dot(da.astype(dt), q_local, 0, 0)
            dv[j] = dv[j] + _dot(a.astype(dt), dos[i], 0, 0)
        from_start = jnp.exp(bs[i]) * sees_in[i]
        dq[i] = dq_i + to_ref * dq_local + from_start * _dot(dos[i], state_dt, 1, 1)
    db = [qs[i] * dq[i] - kf[i] * dk[i] for i in range(n)]
    is_last = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0) == SUB - 1
    db[-1] = db[-1] + jnp.where(is_last, dk_total, 0.0)
    carry = jnp.exp(total_col) * keeps_in                                              # [K, 1]
    dtotal_col = carry * jnp.sum(state * dstate, axis=1, keepdims=True)
    dstate_in = carry * dstate
    for i in range(n):
        from_start = jnp.exp(bs[i]) * sees_in[i]
        dstate_in = dstate_in + _dot((qs[i] * from_start).astype(dt), dos[i], 0, 0)
    return [d * scale for d in dq], dk, dv, db, dtotal_col, dstate_in
