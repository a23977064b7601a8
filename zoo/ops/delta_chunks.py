"""The chunked form of the delta-rule engine (``zoo/ops/delta.py``): the WY / UT representation.

Per head, with α_t = exp(g_t) and a chunk of C steps entered with the state S_in::

    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ = α_t S_{t-1} + k_t u_tᵀ,
    u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t)                              (the "new value" written at t)

Unrolling inside the chunk, with ``L[t, s] = Σ_{j=s+1..t} g_j`` and ``b_t = Σ_{j<=t} g_j`` (from the
chunk's start)::

    S_t = exp(b_t) S_in + Σ_{s<=t} exp(L[t, s]) k_s u_sᵀ
    u_t + β_t Σ_{s<t} exp(L[t, s]) (k_t · k_s) u_s = β_t v_t - β_t exp(b_t) S_inᵀ k_t

so with the strictly lower triangular ``A[t, s] = β_t exp(L[t, s]) (k_t · k_s)`` and
``T = (I + A)⁻¹`` (a unit lower triangular solve, never an explicit inverse)::

    U = T diag(β) V          W = T diag(β exp(b)) K          u = U - W S_in
    o_t = exp(b_t) S_inᵀ q_t + Σ_{s<=t} exp(L[t, s]) (q_t · k_s) u_s
    S_out = exp(b_{C-1}) S_in + Σ_s exp(L[C-1, s]) k_s u_sᵀ

(S. Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
NeurIPS 2024, §3; with the decays folded in as in S. Yang et al., "Gated Delta Networks", ICLR 2025,
§3.3, and FLA's ``chunk_gated_delta_rule``). U, W and the scores are computed for all chunks at
once; only ``u = U - W S_in`` and the state update run in the scan over chunks, and the read-out
follows for all chunks at once. The gradient of that linear algebra is written out
(``_core_backward``); autodiff carries it from the decays back to g.

Numerics are those of ``zoo/ops/matrix_chunks.py``: every log decay is a direct (segment) sum over its
own steps, never a difference of cumulative sums and never positive for log decays <= 0, so decays
near 0 (g = -30, -1e4) lose nothing and cannot overflow; masked entries are replaced before the exp
(zero value and zero gradient). Resets are masks: steps interact only inside one segment (A, the
scores and the chunk's own state are masked by segment), the entering state reaches only the steps
before the chunk's first flag, and a chunk with a flag passes on only its last segment. Padded steps
(β = 0, g = 0, k = v = q = 0) write nothing and keep the state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops.matrix_chunks import _masked_exp, _shift_up, cumsum, segsum

# FLA's chunk. On XLA:CPU (B=2, T=4096, H=4, K=V=64, forward + backward) chunks of 64 run as fast as
# 32 or up to 15% faster (four runs of experiments/bench/delta_chunked.py), 16 is 40% slower.
DEFAULT_CHUNK = 64


class Problem(NamedTuple):
    """The validated problem every mode solves (time already reversed if asked)."""

    q: jax.Array            # [B, T, H, K]   scaled, accumulation dtype
    k: jax.Array            # [B, T, H, K]
    v: jax.Array            # [B, T, H, V]
    beta: jax.Array         # [B, T, H]
    g: Any                  # [B, T, H]      log decays, or None for the plain delta rule (no decay)
    reset: Any              # bool [B, T] or None
    S0: jax.Array           # [B, H, K, V]


def _pad_time(p: Problem, pad: int) -> Problem:
    """Identity steps at the end: β = 0 writes nothing, g = 0 keeps the state."""
    if not pad:
        return p

    def grow(x, fill=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

    reset = None if p.reset is None else grow(p.reset, False)
    g = None if p.g is None else grow(p.g)
    return p._replace(q=grow(p.q), k=grow(p.k), v=grow(p.v), beta=grow(p.beta), g=g, reset=reset)


def _segments(reset, batch: int, n: int, chunk: int):
    """(same [B, N, 1, C, C]: t and s in one segment and s <= t; fresh [B, N, 1, C]: the entering state
    is dropped before t)."""
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    if reset is None:
        same = jnp.broadcast_to(lower, (batch, n, chunk, chunk))
        fresh = jnp.zeros((batch, n, chunk), bool)
    else:
        seg = jnp.cumsum(reset.reshape(batch, n, chunk).astype(jnp.int32), axis=-1)
        same = (seg[..., :, None] == seg[..., None, :]) & lower
        fresh = seg > 0
    return same[:, :, None], fresh[:, :, None]


def unit_lower_inverse(A):
    """(I + A)⁻¹ for strictly lower triangular A [..., C, C], by doubling the size of the inverted
    diagonal blocks (1, 2, 4, ... then C, padded to a power of two): with the inverses T₀, T₁ of
    two neighbouring blocks and A₁₀ the block of A between them,

        [[I + A₀₀, 0], [A₁₀, I + A₁₁]]⁻¹ = [[T₀, 0], [-T₁ A₁₀ T₀, T₁]],

    so every level is two batched matmuls (FLA's ``solve_tril`` merges 16 x 16 blocks the same way).
    Exact to rounding like a forward substitution, but with matmuls instead of C dependent steps:
    XLA:CPU's batched ``triangular_solve`` runs ~10x slower on these shapes. Not differentiated:
    ``_core_backward`` takes dA = -(Tᵀ du) uᵀ from T itself."""
    c = A.shape[-1]
    size = 1 << max(c - 1, 0).bit_length()
    if size != c:
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, size - c), (0, size - c)])
    lead = A.shape[:-2]
    blocks = jnp.ones(lead + (size, 1, 1), A.dtype)                      # [..., n blocks, s, s]
    s = 1
    while s < size:
        pairs = size // (2 * s)
        # A's block (2j + 1, 2j) for each pair j: the row half 1 and column half 0 of the pair, picked
        # off the diagonal of pairs by a mask and a sum (one fused loop, no gather).
        split = A.reshape(*lead, pairs, 2, s, pairs, 2, s)[..., :, 1, :, :, 0, :]      # [.., j, s, j', s]
        same_pair = np.eye(pairs, dtype=bool)[:, None, :, None]
        between = jnp.sum(jnp.where(same_pair, split, 0), axis=-2)                     # [.., j, s, s]
        first, second = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        lower = -_block_product(_block_product(second, between), first)
        zeros = jnp.zeros_like(first)
        blocks = jnp.concatenate([jnp.concatenate([first, zeros], axis=-1),
                                  jnp.concatenate([lower, second], axis=-1)], axis=-2)
        s *= 2
    return blocks[..., 0, :c, :c]


def _block_product(x, y):
    """x @ y over the last two axes. Below 16 x 16 XLA:CPU's batched dot pays per matrix, not per
    flop (the 4 x 4 level of a [2, 128, 4] batch of 32 x 32 inverses took 2 ms per product): those
    are a broadcast multiply and a sum, which fuse into one loop over all the blocks."""
    if x.shape[-1] >= 16:
        return jnp.einsum("...ij,...jk->...ik", x, y)
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)


def _decays(g, same, keep_start, keep_in, at_end):
    """The decays a chunk applies, from its log decays g [B, N, H, C]: exp(L[t, s]) [.., C, C] (s <= t
    in one segment), exp(b_t) from the chunk's start [.., C], exp(L[C-1, s]) to its end [.., C], and
    exp(b_{C-1}) over all of it [B, N, H]; zero where the masks cut the path."""
    L = segsum(g, axis=3)                                                # [B, N, H, C(t), C(s)]
    decay_read = _masked_exp(L, same)                                    # exp(L[t, s]), s <= t
    b = cumsum(g, axis=3)                                                # [B, N, H, C]
    from_start = _masked_exp(b, keep_start)                              # exp(b_t) where S_in reaches t
    to_end = _masked_exp(_shift_up(cumsum(g, axis=3, reverse=True), axis=3), at_end)   # exp(L[C-1, s])
    decay_end = _masked_exp(b[..., -1], keep_in)                         # [B, N, H]
    return decay_read, from_start, to_end, decay_end


def chunked(p: Problem, chunk: int):
    """(o [B, T, H, V], S_final [B, H, K, V])."""
    batch, time, heads, _ = p.q.shape
    pad = (-time) % chunk
    p = _pad_time(p, pad)
    n = (time + pad) // chunk

    def chunks(x):            # [B, T, H, ...] -> [B, N, H, C, ...]
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 2, 3)

    q, k, v = chunks(p.q), chunks(p.k), chunks(p.v)                      # [B, N, H, C, K|V]
    beta = chunks(p.beta[..., None])[..., 0]                             # [B, N, H, C]
    same, fresh = _segments(p.reset, batch, n, chunk)
    keep_start = ~fresh                                                  # S_in reaches step t
    keep_in = ~fresh[..., -1]                                            # S_in reaches the chunk end
    at_end = same[..., -1, :]                                            # s reaches the chunk end
    if p.g is None:           # the plain delta rule: every decay is 1 where the masks let a term through

        def mask(keep, shape):
            return jnp.broadcast_to(keep, shape).astype(q.dtype)

        decay_read = mask(same, beta.shape + (chunk,))
        from_start, to_end = mask(keep_start, beta.shape), mask(at_end, beta.shape)
        decay_end = mask(keep_in, beta.shape[:-1])
    else:
        decay_read, from_start, to_end, decay_end = _decays(chunks(p.g[..., None])[..., 0], same, keep_start,
                                                            keep_in, at_end)
    o, S_final = _chunk_core(q, k, v, beta, decay_read, from_start, to_end, decay_end, p.S0)
    o = jnp.moveaxis(o, 3, 2).reshape(batch, n * chunk, heads, -1)[:, :time]
    return o, S_final


# --------------------------------------------------------------------------------------------
# The chunks' linear algebra, with a hand-written gradient. Inputs per chunk (leading [B, N, H]):
# q, k [C, K], v [C, V], β [C], and the decays as ``chunked`` builds them from g (so autodiff carries
# their gradients back to g): Γ = decay_read [C, C] (exp(L[t, s]) for s <= t in one segment, else 0),
# e = from_start [C], r = to_end [C], d = decay_end []. The state passes through the scan over chunks.
# Written out rather than left to autodiff, forward and backward compile to 15 full-size [C, C] or
# [C, K] products where autodiff's took 27 (the identities are at each step below): fwd + bwd
# 217 -> 137 ms for the plain delta rule in experiments/bench/delta_chunked.py's shape.


def _core_forward(q, k, v, beta, decay, e, r, d, S0):
    qk = jnp.einsum("bnhtk,bnhsk->bnhts", q, k)                          # [B, N, H, C, C]
    kk = jnp.einsum("bnhtk,bnhsk->bnhts", k, k)
    # The UT transform: (I + A) [U | W] = [diag(β) V | diag(β e) K], A strictly lower triangular.
    A = jnp.where(_strictly_lower(q.shape[-2]), kk * decay * beta[..., :, None], 0)
    T = unit_lower_inverse(A)
    U = jnp.einsum("bnhts,bnhsd->bnhtd", T, v * beta[..., None])        # [B, N, H, C, V]
    W = jnp.einsum("bnhts,bnhsd->bnhtd", T, k * (beta * e)[..., None])  # [B, N, H, C, K]
    k_end = k * r[..., None]

    # The scan over chunks: u = U - W S_in, then S_out = d S_in + Σ_s r_s k_s u_sᵀ, two [C, K] x [K, V]
    # products per chunk. (Mapping each chunk's S_in affinely, S_out = M S_in + S_loc, with M and S_loc
    # built for all chunks at once, leaves one [K, K] x [K, V] product in the scan but takes three
    # full-size products outside it: 6% slower fwd + bwd.)
    def across(S_in, xs):
        U_c, W_c, k_end_c, d_c = xs
        u_c = U_c - jnp.einsum("bhck,bhkv->bhcv", W_c, S_in)
        return d_c[..., None, None] * S_in + jnp.einsum("bhck,bhcv->bhkv", k_end_c, u_c), (u_c, S_in)

    S_final, (u, S_in) = lax.scan(across, S0, tuple(jnp.moveaxis(x, 1, 0) for x in (U, W, k_end, d)))
    u, S_in = jnp.moveaxis(u, 0, 1), jnp.moveaxis(S_in, 0, 1)           # [B, N, H, C, V], [B, N, H, K, V]
    o = (jnp.einsum("bnhts,bnhsv->bnhtv", qk * decay, u)
         + jnp.einsum("bnhck,bnhkv->bnhcv", q * e[..., None], S_in))
    return (o, S_final), (q, k, v, beta, decay, e, r, d, T, W, u, S_in, qk, kk)


def _strictly_lower(c: int):
    return jnp.tril(jnp.ones((c, c), bool), -1)


@jax.custom_vjp
def _chunk_core(q, k, v, beta, decay, e, r, d, S0):
    """(o [B, N, H, C, V], S_final [B, H, K, V]) of the chunks laid out by ``chunked``."""
    return _core_forward(q, k, v, beta, decay, e, r, d, S0)[0]


def _core_backward(residuals, cotangents):
    q, k, v, beta, decay, e, r, d, T, W, u, S_in, qk, kk = residuals
    do, dS_final = cotangents
    # o = P u + (e q) S_in with P = qk Γ, and S_out = d S_in + k_endᵀ u. So with G the cotangent of a
    # chunk's S_out: du = Pᵀ do + k_end G, and S_in's cotangent (G of the chunk before) is
    # d G + (e q)ᵀ do - Wᵀ du. The parts without G are products over all chunks at once; the reverse
    # scan adds the two that need it.
    du_local = jnp.einsum("bnhts,bnhtv->bnhsv", qk * decay, do)
    read_in = jnp.einsum("bnhck,bnhcv->bnhkv", q * e[..., None], do)
    k_end = k * r[..., None]

    def back(G, xs):
        du_c, read_in_c, W_c, k_end_c, d_c = xs
        du_c = du_c + jnp.einsum("bhck,bhkv->bhcv", k_end_c, G)
        return d_c[..., None, None] * G + read_in_c - jnp.einsum("bhck,bhcv->bhkv", W_c, du_c), (du_c, G)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (du_local, read_in, W, k_end, d))
    dS0, (du, G) = lax.scan(back, dS_final, xs, reverse=True)
    du, G = jnp.moveaxis(du, 0, 1), jnp.moveaxis(G, 0, 1)               # G: [B, N, H, K, V], dS_out
    dk_end = jnp.einsum("bnhcv,bnhkv->bnhck", u, G)
    dd = jnp.sum(S_in * G, axis=(-2, -1))
    dP = jnp.einsum("bnhtv,bnhsv->bnhts", do, u)
    dqk = dP * decay
    ddecay = dP * qk
    do_S = jnp.einsum("bnhcv,bnhkv->bnhck", do, S_in)                   # do S_inᵀ
    dq = jnp.einsum("bnhts,bnhsk->bnhtk", dqk, k) + e[..., None] * do_S
    de = jnp.sum(q * do_S, axis=-1)
    dk = jnp.einsum("bnhts,bnhtk->bnhsk", dqk, q) + r[..., None] * dk_end
    dr = jnp.sum(k * dk_end, axis=-1)
    # U = T diag(β) V and W = T diag(β e) K.
    # u = U - W S_in gives dU = du and dW = -du S_inᵀ, so Tᵀ dW = -(Tᵀ du) S_inᵀ: dW is never formed.
    dU_rhs = jnp.einsum("bnhts,bnhtv->bnhsv", T, du)                     # Tᵀ dU
    dW_rhs = -jnp.einsum("bnhcv,bnhkv->bnhck", dU_rhs, S_in)             # Tᵀ dW
    k_dW_rhs = jnp.sum(k * dW_rhs, axis=-1)
    dv = beta[..., None] * dU_rhs
    dbeta = jnp.sum(v * dU_rhs, axis=-1) + e * k_dW_rhs
    dk = dk + (beta * e)[..., None] * dW_rhs
    de = de + beta * k_dW_rhs
    # T = (I + A)⁻¹ gives dA = -Tᵀ dT Tᵀ on A's strictly lower triangle, with dT = dU (β V)ᵀ +
    # dW (β e K)ᵀ. As T (β V) = U and T (β e K) = W, that is -(Tᵀ dU) Uᵀ - (Tᵀ dW) Wᵀ
    # = -(Tᵀ du) (U - W S_in)ᵀ = -(Tᵀ du) uᵀ: one product where autodiff takes four.
    # A = (k kᵀ) Γ β_t there.
    dA = jnp.where(_strictly_lower(q.shape[-2]), -jnp.einsum("bnhtv,bnhsv->bnhts", dU_rhs, u), 0)
    dkk = dA * decay * beta[..., :, None]
    ddecay = ddecay + dA * kk * beta[..., :, None]
    dbeta = dbeta + jnp.sum(dA * kk * decay, axis=-1)
    dk = dk + jnp.einsum("bnhts,bnhsk->bnhtk", dkk + jnp.swapaxes(dkk, -1, -2), k)
    return dq, dk, dv, dbeta, ddecay, de, dr, dd, dS0


_chunk_core.defvjp(_core_forward, _core_backward)
