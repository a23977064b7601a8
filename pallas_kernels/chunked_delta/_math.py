"""The per-chunk arithmetic of the chunked (gated) delta rule, shared by the GPU (Triton) and TPU
(Mosaic) kernels, on loaded values.

Inside a chunk of C steps entered with the state S [K, Vt], with b the chunk-local inclusive cumsum of
the log decays g, B = b[C-1] the chunk's total, e_t = exp(b_t) and f_t = exp(B - b_t)::

    A[t, s] = β_t exp(b_t - b_s) (k_t · k_s)   for s < t (strictly lower triangular)
    T       = (I + A)⁻¹                                     (the UT transform, unit lower triangular)
    r       = β ⊙ (V - e ⊙ K S)                              (what each step would write on S alone)
    u       = T r                                            (the values actually written, "new values")
    o       = ((Q Kᵀ) ⊙ D) u + (e ⊙ Q) S                     D[t, s] = exp(b_t - b_s) for s <= t
    S_out   = exp(B) S + (f ⊙ K)ᵀ u

(S. Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
NeurIPS 2024, §3; decays as in "Gated Delta Networks", ICLR 2025, §3.3.) ``u = T r`` is zoo's
``U - W S`` of ``zoo/ops/delta_chunks.py`` with the two products merged, so W is never formed. Given u,
the read-out and the state write are chunked GLA with values u.

T is built by forward substitution over the chunk's rows (row i = e_i − Σ_{j<i} A[i, j] T[j, :]), in a
``fori_loop`` of masked element-wise ops: no value slicing (Triton has none), no [1, C] matmuls
(Triton needs M, N, K >= 16), no transposes (Aᵀ is built directly from the symmetric K Kᵀ). T and u
are float32; Q Kᵀ and K Kᵀ take the input dtype with float32 accumulation.

Resets are masks, from the chunk-local segment numbers (a running count of reset flags): A and D only
within one segment, e only for segment 0, f only for the last segment, exp(B) S only without a reset.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _dot(a, b, contract_a: int, contract_b: int):
    """a·b contracting one axis of each 2-D operand, float32 accumulation. float32 operands (the state,
    T, u and their cotangents) are multiplied at full float32 precision: the default would be TF32 on
    Triton and one bfloat16 pass on Mosaic, too coarse for the triangular solve's products."""
    precision = lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=F32)


def _iotas(c: int):
    return lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _pair_decay(b_hi, b_lo, keep):
    """exp(b_hi - b_lo) where ``keep``, else 0 (masked before the exp: no overflow, zero gradient)."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, b_hi - b_lo, 0.0)), 0.0)


def _chunk_total(row):
    """row[0, C-1] as a [1, 1] array (a masked sum: no value slicing, which Triton lacks)."""
    c = row.shape[1]
    last = lax.broadcasted_iota(jnp.int32, (1, c), 1) == c - 1
    return jnp.sum(jnp.where(last, row, 0.0), axis=1, keepdims=True)


def _sum2(x):
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _row_to_col(row):
    """[1, C] -> [C, 1] through the diagonal (a transpose without a transpose op)."""
    rows, cols = _iotas(row.shape[1])
    return jnp.sum(jnp.where(rows == cols, row, 0.0), axis=1, keepdims=True)


def _unit_lower_inverse(a_t):
    """T = (I + A)⁻¹ from Aᵀ (A strictly lower triangular), by forward substitution over the rows:
    row i of T is e_i − Σ_{j<i} A[i, j] T[j, :], where A[i, :] is column i of Aᵀ (picked by a mask)
    and rows j >= i of T are still the identity's (A[i, j] = 0 there). Exact to rounding."""
    c = a_t.shape[0]
    rows, cols = _iotas(c)
    eye = (rows == cols).astype(F32)

    def row(i, t):
        a_i = jnp.sum(jnp.where(cols == i, a_t, 0.0), axis=1, keepdims=True)      # [C, 1]: A[i, j]
        new = eye - jnp.sum(a_i * t, axis=0, keepdims=True)                          # row i (broadcast)
        return jnp.where(rows == i, new, t)

    return lax.fori_loop(1, c, row, eye)


class _Chunk:
    """Everything both passes recompute for one chunk (float32 unless said)."""

    def __init__(self, q, k, v, beta_col, beta_row, b_col, b_row, seg_col, seg_row, state, scale):
        dt = q.dtype
        c = q.shape[0]
        rows, cols = _iotas(c)
        same = seg_col == seg_row
        self.read = _pair_decay(b_col, b_row, (rows >= cols) & same)          # D[t, s], s <= t
        self.lower = _pair_decay(b_col, b_row, (rows > cols) & same)          # exp(b_t - b_s), s < t
        upper = _pair_decay(b_row, b_col, (rows < cols) & same)               # its transpose
        last = _chunk_total(seg_row)
        total = _chunk_total(b_row)
        self.from_start = jnp.exp(b_col) * (seg_col == 0).astype(F32)        # e [C, 1]
        self.to_end = jnp.exp(total - b_col) * (seg_col == last).astype(F32)  # f [C, 1]
        self.carry = jnp.exp(total) * (last == 0).astype(F32)                 # [1, 1]
        self.qs = q.astype(F32) * scale
        self.kf, self.vf = k.astype(F32), v.astype(F32)
        self.kk = _dot(k, k, 1, 1)                                            # K Kᵀ (symmetric)
        self.a = beta_col * self.kk * self.lower                              # A
        self.t = _unit_lower_inverse(beta_row * self.kk * upper)              # (I + A)⁻¹ from Aᵀ
        self.ks = _dot(self.kf, state, 1, 0)                                  # K S [C, Vt]
        self.resid = self.vf - self.from_start * self.ks                      # V - e ⊙ K S
        self.u = _dot(self.t, beta_col * self.resid, 1, 0)                    # u = T r
        self.scores = _dot(self.qs.astype(dt), k, 1, 1) * self.read           # (Q Kᵀ) ⊙ D


def forward_chunk(q, k, v, beta_col, beta_row, b_col, b_row, seg_col, seg_row, state, scale: float):
    """One chunk: q, k [C, K], v [C, Vt] (input dtype); beta_col, b_col, seg_col [C, 1] and beta_row,
    b_row, seg_row [1, C] (float32; seg all 0 without resets); state [K, Vt] float32 entering the chunk.
    Returns (o [C, Vt] float32, the state leaving the chunk)."""
    ch = _Chunk(q, k, v, beta_col, beta_row, b_col, b_row, seg_col, seg_row, state, scale)
    o = _dot(ch.scores, ch.u, 1, 0) + _dot(ch.qs * ch.from_start, state, 1, 0)
    new_state = ch.carry * state + _dot(ch.kf * ch.to_end, ch.u, 0, 0)
    return o, new_state


def backward_chunk(q, k, v, beta_col, beta_row, b_col, b_row, seg_col, seg_row, state, do, dstate,
                   scale: float):
    """Gradients of one chunk (arguments as ``forward_chunk``; ``do`` [C, Vt] the output's cotangent,
    ``dstate`` the leaving state's). Returns (dq, dk [C, K], dv [C, Vt], dbeta [C, 1], db [C, 1],
    dstate entering the chunk), float32; dq, dk, dbeta, db are this V tile's share. db is w.r.t. the
    chunk-local cumulative log decay b, the chunk total's share added to the last row.

    With dr = Tᵀ du (u = T r) and dA = -dr uᵀ on A's support (d(I + A)⁻¹ = -T dA T)::

        du  = ((Q Kᵀ) ⊙ D)ᵀ dO + (f ⊙ K) dS'              dP = (dO uᵀ) ⊙ D
        dQ  = dP K + e ⊙ dO Sᵀ                            dV = β ⊙ dr
        dK  = dPᵀ Q + f ⊙ u dS'ᵀ − (β e ⊙ dr) Sᵀ + (G + Gᵀ) K,     G = β ⊙ dA ⊙ exp(b_t - b_s)
        dβ  = Σ_v dr ⊙ (V − e ⊙ K S) + Σ_s dA ⊙ (K Kᵀ) ⊙ exp(b_t - b_s)
        dS  = exp(B) dS' + (e ⊙ Q)ᵀ dO − Kᵀ (β e ⊙ dr)
        db_t = Σ_s P[t, s] − Σ_s P[s, t] + e_t ∂e_t − f_t ∂f_t,   P = dP ⊙ (Q Kᵀ) + dA ⊙ A
        dB  = exp(B) ⟨S, dS'⟩ + Σ_t f_t ∂f_t                  (added to the last row of db)
    """
    ch = _Chunk(q, k, v, beta_col, beta_row, b_col, b_row, seg_col, seg_row, state, scale)
    dof = do.astype(F32)
    k_end = ch.kf * ch.to_end
    du = _dot(ch.scores, dof, 0, 0) + _dot(k_end, dstate, 1, 0)
    dout_u = _dot(dof, ch.u, 1, 1)                                            # dO uᵀ
    dp = dout_u * ch.read
    dr = _dot(ch.t, du, 0, 0)                                                 # Tᵀ du
    da = -_dot(dr, ch.u, 1, 1)                              # every use is masked by ch.lower (A's support)
    g = beta_col * da * ch.lower                                              # dL/d(K Kᵀ)
    beta_e_dr = beta_col * ch.from_start * dr                                 # -dL/d(K S)

    dqs = _dot(dp, ch.kf, 1, 0) + ch.from_start * _dot(dof, state, 1, 1)
    dk = (_dot(dp, ch.qs, 0, 0) + ch.to_end * _dot(ch.u, dstate, 1, 1) - _dot(beta_e_dr, state, 1, 1)
          + _dot(g, ch.kf, 1, 0) + _dot(g, ch.kf, 0, 0))
    dv = beta_col * dr
    dbeta = (jnp.sum(dr * ch.resid, axis=1, keepdims=True)
             + jnp.sum(da * ch.kk * ch.lower, axis=1, keepdims=True))
    dstate_in = ch.carry * dstate + _dot(ch.qs * ch.from_start, dof, 0, 0) - _dot(ch.kf, beta_e_dr, 0, 0)

    pairs = dout_u * ch.scores + da * ch.a
    d_from_start = (jnp.sum(dof * _dot(ch.qs, state, 1, 0), axis=1, keepdims=True)
                    - beta_col * jnp.sum(dr * ch.ks, axis=1, keepdims=True))
    d_to_end = jnp.sum(_dot(ch.kf, dstate, 1, 0) * ch.u, axis=1, keepdims=True)
    db = (jnp.sum(pairs, axis=1, keepdims=True) - _row_to_col(jnp.sum(pairs, axis=0, keepdims=True))
          + ch.from_start * d_from_start - ch.to_end * d_to_end)
    dtotal = ch.carry * _sum2(state * dstate) + jnp.sum(ch.to_end * d_to_end, axis=0, keepdims=True)
    c = q.shape[0]
    is_last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
    db = db + jnp.where(is_last, dtotal, 0.0)
    return dqs * scale, dk, dv, dbeta, db, dstate_in
