"""The chunked (and, with one chunk, the parallel) form of the matrix engine (``zoo/ops/matrix.py``).

Time is cut into chunks of C steps. With g the log decays (scalar per head, or one per key
dimension), i the optional log input gates and ``L[t, s] = Σ_{k=s+1..t} g_k`` the log decay from
step s to step t inside a chunk::

    inside a chunk      o_t ⊇ Σ_{s<=t, same segment} (q_t · (exp(L[t, s]) ⊙ k_s)) v_s · exp(i_s - m_t)
    entering state      o_t ⊇ (exp(b_t) ⊙ q_t)ᵀ S_in · exp(m_in - m_t)      b_t = Σ_{k<=t} g_k
    chunk's own state   S_loc = Σ_s (exp(L[C-1, s]) ⊙ k_s) v_sᵀ · exp(i_s - m_loc)
    across chunks       S_out = exp(b_{C-1}) ⊙ S_in · exp(m_in - m_out) + S_loc · exp(m_loc - m_out)

Every log decay is a direct sum over its own segment of steps (a masked cumulative sum, the
"segsum" of ``zoo/ops/ssd_scan.py``), never the difference of two cumulative sums, so gates near 0
(log decays far below 0) lose no precision and nothing of the form ``exp(-cumsum)`` can overflow.
Entries that a mask drops are replaced before the exp (a "double where"), so they cannot overflow
and their gradients are exactly zero.

Segments are masks, not -inf decays: ``reset`` gives each step a segment number inside its chunk
(a cumulative count of flags), a pair (t, s) interacts only inside one segment, the entering state
reaches only the steps before the chunk's first flag, and a chunk whose own flag dropped the
entering state passes on only its last segment's sum. Keeping the decays finite matters for the
max-stabiliser m (mLSTM): after a reset the state restarts from its fresh value, whose m = 0 still
decays with the forget gates, exactly as the step loop computes.

``exclusive=True`` (RWKV-6) reads the state before the current step's update: the pair (t, t) is
dropped and every decay ends at step t - 1, which is the row above in the same L and b (no
subtraction of g_t). The state updates are the same in both readouts.

A decay per key dimension makes ``exp(L)`` a [C, C, K] tensor per chunk and head, so its default
chunk is smaller (``DEFAULT_CHUNK_VECTOR``) than the scalar-decay one (``DEFAULT_CHUNK_SCALAR``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK_SCALAR = 64
DEFAULT_CHUNK_VECTOR = 64
SUB_CHUNK = 16          # secondary tiling for decays per key dimension (chunks that are multiples of it)
# Largest |cumulative log decay| inside a chunk for which decays per key dimension are factored into
# exp(b_t) exp(-b_s) (e^30 ~ 1e13: far from float32 overflow; the relative rounding of each factor
# stays ~|b| ulp ~ 2e-6).
FACTOR_LIMIT = 30.0


class Problem(NamedTuple):
    """The validated problem every mode solves (time already reversed if asked)."""

    q: jax.Array            # [B, T, H, K]   scaled, accumulation dtype
    k: jax.Array            # [B, T, H, K]
    v: jax.Array            # [B, T, H, V']  V' = V + 1 when a normaliser column is appended
    g: jax.Array            # [B, T, H, G]   log decays, G = 1 (scalar per head) or K
    i: Any                  # [B, T, H] log input gates, or None (no stabiliser)
    reset: Any              # bool [B, T] or None
    S0: jax.Array           # [B, H, K, V']
    m0: Any                 # [B, H] or None
    exclusive: bool


def _masked_exp(log_w, keep):
    """exp(log_w) where keep, else 0, with no overflow and zero gradient in the dropped entries."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, log_w, 0)), 0)


def segsum(g, axis: int):
    """Along ``axis`` (length C) of g: a new axis after it, ``out[.., t, s, ..] = Σ_{k=s+1..t} g_k``
    for s <= t (0 on the diagonal) and 0 above it (callers mask those). Each entry is a cumulative sum
    of the entries masked to k > s, not a difference of cumulative sums."""
    g = jnp.moveaxis(g, axis, -1)                                        # [..., C]
    c = g.shape[-1]
    rows = jnp.broadcast_to(g[..., :, None], g.shape + (c,))            # rows[..., k, s] = g_k
    after_s = jnp.tril(jnp.ones((c, c), bool), -1)                      # k > s
    sums = cumsum(jnp.where(after_s, rows, 0), axis=-2)                 # [..., t, s]
    return jnp.moveaxis(sums, (-2, -1), (axis, axis + 1))


def cumsum(x, axis: int, reverse: bool = False):
    """Inclusive cumulative sum along ``axis`` (from the end when ``reverse``). XLA:CPU runs a cumsum
    of length C as a window reduction of C terms per entry; for long chunks it is done in two levels
    (inside blocks of 8, then over the block totals), which sums exactly the same terms with 8x less
    work."""
    axis = axis % x.ndim
    if reverse:
        return jnp.flip(cumsum(jnp.flip(x, axis), axis), axis)
    c = x.shape[axis]
    if c <= 8 or c % 8:
        return jnp.cumsum(x, axis=axis)
    blocks = x.reshape(*x.shape[:axis], c // 8, 8, *x.shape[axis + 1:])
    inside = jnp.cumsum(blocks, axis=axis + 1)
    totals = lax.slice_in_dim(inside, 7, 8, axis=axis + 1)                       # each block's sum
    before = _shift_down(jnp.cumsum(totals, axis=axis), axis=axis, fill=0)      # sums of earlier blocks
    return (inside + before).reshape(x.shape)


def _shift_down(x, axis: int, fill):
    """x moved one step later along ``axis``: ``out[t] = x[t - 1]``, ``out[0] = fill``."""
    first = jnp.full_like(lax.slice_in_dim(x, 0, 1, axis=axis), fill)
    return jnp.concatenate([first, lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)], axis=axis)


def _pad_time(p: Problem, pad: int) -> Problem:
    """Identity steps at the end: g = 0 keeps the state, k = v = 0 add nothing, i = -inf weighs nothing."""
    if not pad:
        return p

    def grow(x, fill=0):
        return None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                               constant_values=fill)

    reset = None if p.reset is None else grow(p.reset, False)
    return p._replace(q=grow(p.q), k=grow(p.k), v=grow(p.v), g=grow(p.g), i=grow(p.i, -jnp.inf),
                      reset=reset)


def _shift_up(x, axis: int):
    """x moved one step earlier along ``axis``: ``out[t] = x[t + 1]``, ``out[-1] = 0``."""
    last = jnp.zeros_like(lax.slice_in_dim(x, 0, 1, axis=axis))
    return jnp.concatenate([lax.slice_in_dim(x, 1, x.shape[axis], axis=axis), last], axis=axis)


def _read_decays(L, exclusive: bool, t_axis: int):
    """The log decays L[.., t, s, ..] a readout applies: L itself, or (exclusive) the row above, which
    ends the decay at step t - 1."""
    return _shift_down(L, axis=t_axis, fill=0) if exclusive else L


def _within_sub_chunk_scores(q, k, g, exclusive: bool):
    """``q_t · (Π_{j=s+1..t} α_j ⊙ k_s)`` for s <= t (s < t if exclusive) inside blocks of c steps:
    q, k, g [..., c, K] -> [..., c(t), c(s)], with α = exp(g) <= 1.

    The decays are running products of the step decays, built one row t at a time from the row
    before (``P[t, s] = P[t-1, s] α_t``, a scan over the rows): a product of factors <= 1 cannot
    overflow, underflows only towards its true value, and involves no cumulative sum at all, so no
    cancellation."""
    c = q.shape[-2]
    steps = jnp.arange(c)[:, None]

    def row(decay, t):
        # decay[s] = Π_{j=s+1..t-1} α_j for s < t on entry (row t - 1), then row t after the update.
        before = steps < t
        previous = jnp.where(before, decay, 0)
        alpha_t = jnp.exp(lax.dynamic_index_in_dim(g, t, axis=g.ndim - 2))          # [..., 1, K]
        decay = jnp.where(before, decay * alpha_t, 0) + (steps == t)
        q_t = lax.dynamic_index_in_dim(q, t, axis=q.ndim - 2, keepdims=False)     # [..., K]
        # Exclusive readout (o_t reads S_{t-1}): the decays of row t - 1, for s < t only.
        return decay, jnp.einsum("...k,...sk->...s", q_t, k * (previous if exclusive else decay))

    # A scan over the rows (not an unrolled loop) keeps the compiled program small.
    _, rows = lax.scan(row, jnp.zeros_like(k), jnp.arange(c))                      # [c(t), ..., c(s)]
    return jnp.moveaxis(rows, 0, -2)


def _vector_decay_scores(q, k, g, exclusive: bool, sub: int):
    """Scores ``q_t · (exp(Σ_{k=s+1..t} g_k) ⊙ k_s)`` for every pair (t, s) with s <= t of each chunk, for
    decays per key dimension: q, k, g [..., C, K] -> [..., C(t), C(s)] (the caller masks segments).

    The explicit [C, C, K] decay tensor would cost C K per token, so the chunk is cut into sub-chunks of
    ``sub`` steps (FLA's secondary tiling). Between sub-chunks J > I the decay factors into three
    parts, each the exp of a sum of log decays taken directly over its own steps (so each is <= 1
    and nothing is a difference of cumulative sums): from the start of J to t (a cumulative sum
    inside J), the whole sub-chunks strictly between I and J (a segsum of sub-chunk totals), and from
    just after s to the end of I (a reversed cumulative sum inside I). The pairs inside one sub-chunk
    use the explicit [sub, sub, K] tensor."""
    *lead, c, dk = q.shape
    n_sub = c // sub

    def split(x):
        return x.reshape(*lead, n_sub, sub, dk)

    qs, ks, gs = split(q), split(k), split(g)                            # [.., S, c, K]
    within = _within_sub_chunk_scores(qs, ks, gs, exclusive)                              # [.., S, c, c]
    if n_sub == 1:
        return within.reshape(*lead, c, c)
    from_start = jnp.cumsum(gs, axis=-2)                                 # Σ_{J start..t}
    if exclusive:
        from_start = _shift_down(from_start, axis=from_start.ndim - 2, fill=0)
    to_sub_end = _shift_up(jnp.flip(jnp.cumsum(jnp.flip(gs, axis=-2), axis=-2), axis=-2), axis=gs.ndim - 2)
    totals = jnp.cumsum(gs, axis=-2)[..., -1, :]                         # [.., S, K]
    # between[J, I] = Σ_{I<M<J} totals_M: the segsum up to J - 1, i.e. its row above.
    between = _shift_down(segsum(totals, axis=totals.ndim - 2), axis=totals.ndim - 2, fill=0)  # [.., S, S, K]
    earlier = jnp.tril(jnp.ones((n_sub, n_sub), bool), -1)[..., None, None]               # I < J
    key_log = to_sub_end[..., None, :, :, :] + between[..., :, :, None, :]                # [.., J, I, c, K]
    keys = ks[..., None, :, :, :] * _masked_exp(key_log, earlier)
    across = jnp.einsum("...jtk,...jisk->...jtis", qs * jnp.exp(from_start), keys)        # [.., J, c, I, c]
    diagonal = jnp.eye(n_sub, dtype=within.dtype)[:, None, :, None]                      # [J, 1, I, 1]
    scores = across + within[..., :, :, None, :] * diagonal
    return scores.reshape(*lead, c, c)


def _factored_scores(q, k, b, b_read):
    """GLA's chunk form: exp(b_t - b_s) = exp(b_t) exp(-b_s), b the cumulative log decay from the
    chunk's start (b_read its readout version), so the scores are one matmul of rescaled queries and
    keys."""
    return jnp.einsum("...tk,...sk->...ts", q * jnp.exp(b_read), k * jnp.exp(-b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _vector_scores(q, k, g, b, b_read, factorable, exclusive: bool, sub: int):
    """Decayed scores for decays per key dimension, [..., C, K] -> [..., C(t), C(s)] (unmasked).

    When every cumulative log decay b inside every chunk lies within ±FACTOR_LIMIT (``factorable``,
    one bool for the whole batch), the factored form (``_factored_scores``) is exact to rounding:
    neither factor can overflow, and each is rounded once, relative to itself. Otherwise (gates near 0
    somewhere) the sub-chunk tiling of ``_vector_decay_scores`` runs, which never exponentiates a
    positive sum. The choice is one ``lax.cond`` (under ``vmap`` a select of both). The backward pass
    is the chosen form's VJP, recomputed from the inputs: differentiating through ``lax.cond``
    directly keeps the residuals of both branches and runs several times slower."""
    return lax.cond(factorable, lambda: _factored_scores(q, k, b, b_read),
                    lambda: _vector_decay_scores(q, k, g, exclusive, sub))


def _vector_scores_fwd(q, k, g, b, b_read, factorable, exclusive, sub):
    return _vector_scores(q, k, g, b, b_read, factorable, exclusive, sub), (q, k, g, b, b_read, factorable)


def _vector_scores_bwd(exclusive, sub, residuals, cotangent):
    q, k, g, b, b_read, factorable = residuals

    def through_factored():
        dq, dk, db, db_read = jax.vjp(_factored_scores, q, k, b, b_read)[1](cotangent)
        return dq, dk, jnp.zeros_like(g), db, db_read

    def through_tiles():
        tiled = functools.partial(_vector_decay_scores, exclusive=exclusive, sub=sub)
        dq, dk, dg = jax.vjp(tiled, q, k, g)[1](cotangent)
        return dq, dk, dg, jnp.zeros_like(b), jnp.zeros_like(b_read)

    return (*lax.cond(factorable, through_factored, through_tiles), None)


_vector_scores.defvjp(_vector_scores_fwd, _vector_scores_bwd)


def chunked(p: Problem, chunk: int):
    """(o [B, T, H, V'], m [B, T, H] or None, S_final [B, H, K, V'], m_final [B, H] or None)."""
    batch, time, heads, _ = p.q.shape
    pad = (-time) % chunk
    p = _pad_time(p, pad)
    n = (time + pad) // chunk
    stabilised = p.i is not None
    vector_decay = p.g.shape[-1] > 1
    # The largest sub-chunk up to SUB_CHUNK that divides the chunk.
    sub_chunk = max(d for d in range(1, min(SUB_CHUNK, chunk) + 1) if chunk % d == 0)

    def chunks(x):            # [B, T, H, ...] -> [B, N, H, C, ...]
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 2, 3)

    q, k, v, g = chunks(p.q), chunks(p.k), chunks(p.v), chunks(p.g)      # g: [B, N, H, C, G]
    log_i = None if p.i is None else chunks(p.i[..., None])[..., 0]      # [B, N, H, C]

    # Segments inside each chunk: same[t, s] says s and t are in one segment and s <= t.
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    if p.reset is None:
        same = jnp.broadcast_to(lower, (batch, n, chunk, chunk))
        fresh = jnp.zeros((batch, n, chunk), bool)
    else:
        seg = jnp.cumsum(p.reset.reshape(batch, n, chunk).astype(jnp.int32), axis=-1)
        same = (seg[..., :, None] == seg[..., None, :]) & lower
        fresh = seg > 0                                                  # the entering state is dropped
    same = same[:, :, None]                                              # [B, N, 1, C, C]
    fresh = fresh[:, :, None]                                            # [B, N, 1, C]
    at_end = same[..., -1, :]                                            # s reaches the chunk's end

    b = cumsum(g, axis=3)                                                # [B, N, H, C, G]
    b_read = _shift_down(b, axis=3, fill=0) if p.exclusive else b
    factorable = jnp.all(jnp.abs(jnp.real(b) if jnp.iscomplexobj(b) else b) <= FACTOR_LIMIT)
    if p.exclusive:
        read = same & ~jnp.eye(chunk, dtype=bool)
    else:
        read = same
    # Log decay from just after s to the chunk's end, Σ_{k=s+1..C-1} g_k: a reversed cumulative sum.
    to_end = _shift_up(cumsum(g, axis=3, reverse=True), axis=3)                              # [B, N, H, C, G]
    L_read = None if vector_decay else _read_decays(segsum(g[..., 0], axis=3), p.exclusive, 3)   # [B,N,H,C,C]

    # Stabiliser: m_t is the largest log weight reaching o_t, m_loc the largest reaching the chunk end.
    if stabilised:
        g1 = g[..., 0]                                                   # scalar decays [B, N, H, C]
        w_read = jnp.where(read, L_read + log_i[..., None, :], -jnp.inf)              # [B, N, H, C, C]
        w_end = jnp.where(at_end, to_end[..., 0] + log_i, -jnp.inf)                   # [B, N, H, C]
        # Log decay since the last reset (or since the chunk start): Σ_{s in t's segment, s<=t} g_s.
        # A sum of the selected entries (not a 0/1 matmul, where 0 · -inf would give NaN).
        seg_decay = jnp.sum(jnp.where(same, g1[..., None, :], 0), axis=-1)
        m_loc = jnp.max(w_end, axis=-1)                                  # [B, N, H]
    else:
        seg_decay = m_loc = None

    # 1. Each chunk's own end state, from a zero start: Σ_s (exp(L[-1, s]) ⊙ k_s) v_sᵀ.
    if stabilised:
        weight_end = _masked_exp(w_end - m_loc[..., None], at_end)[..., None]       # [B, N, H, C, 1]
    else:
        weight_end = _masked_exp(to_end, at_end[..., None])                         # [B, N, H, C, G]
    S_loc = jnp.einsum("bnhsk,bnhsv->bnhkv", weight_end * k, v)

    # 2. Carry the state across chunks. Non-stabilised: S_out = decay ⊙ S_in + S_loc. Stabilised:
    # (S, m) with S the state scaled by exp(-m); the entering m decays like the state, and a chunk
    # with a reset restarts it from the fresh state's m = 0 (decayed from the reset on).
    keep_in = ~fresh[..., -1]                                            # [B, N, 1]
    decay_end = b[..., -1, :]                                            # [B, N, H, G]

    def across(carry, xs):
        S_in, m_in = carry
        if stabilised:
            decay, keep, S_c, m_c, seg_end = xs
            m_start = seg_end + jnp.where(keep, m_in, 0)
            m_out = jnp.maximum(m_start, m_c)
            carry_w = _masked_exp(decay[..., 0] + m_in - m_out, keep)[..., None, None]
            S_out = carry_w * S_in + jnp.exp(m_c - m_out)[..., None, None] * S_c
            return (S_out, m_out), (S_in, m_in)
        decay, keep, S_c = xs
        carry_w = _masked_exp(decay, keep[..., None])[..., None]         # [B, H, G, 1]
        return (carry_w * S_in + S_c, m_in), (S_in, m_in)

    xs = (decay_end, keep_in, S_loc)
    if stabilised:
        xs = xs + (m_loc, seg_decay[..., -1])
    m0 = p.m0 if stabilised else jnp.zeros((batch, heads), p.S0.real.dtype)
    (S_final, m_final), (S_in, m_in) = lax.scan(across, (p.S0, m0), [jnp.moveaxis(x, 1, 0) for x in xs])
    S_in, m_in = jnp.moveaxis(S_in, 0, 1), jnp.moveaxis(m_in, 0, 1)      # [B, N, H, K, V'], [B, N, H]

    # 3. The readout: inside the chunk, then the entering state.
    keep_start = ~fresh                                                  # [B, N, 1, C]
    if stabilised:
        m_start = seg_decay + jnp.where(keep_start, m_in[..., None], 0)
        if p.exclusive:          # not offered with a stabiliser (checked in matrix.py)
            raise AssertionError
        m = jnp.maximum(jnp.max(w_read, axis=-1), m_start)               # [B, N, H, C]
        weights = _masked_exp(w_read - m[..., None], read)               # [B, N, H, C, C]
        scores = jnp.einsum("bnhtk,bnhsk->bnhts", q, k) * weights
        q_start = q * _masked_exp(b_read[..., 0] + m_in[..., None] - m, keep_start)[..., None]
    else:
        m = None
        if vector_decay:
            scores = _vector_scores(q, k, g, b, b_read, factorable, p.exclusive, sub_chunk)
            scores = jnp.where(read, scores, 0)
        else:
            scores = jnp.einsum("bnhtk,bnhsk->bnhts", q, k) * _masked_exp(L_read, read)
        q_start = q * _masked_exp(b_read, keep_start[..., None])
    o = jnp.einsum("bnhts,bnhsv->bnhtv", scores, v) + jnp.einsum("bnhtk,bnhkv->bnhtv", q_start, S_in)

    def unchunk(x):           # [B, N, H, C, ...] -> [B, T, H, ...]
        x = jnp.moveaxis(x, 3, 2)
        return x.reshape(batch, n * chunk, *x.shape[3:])[:, :time]

    m_seq = None if m is None else unchunk(m[..., None])[..., 0]
    return unchunk(o), m_seq, S_final, (m_final if stabilised else None)
