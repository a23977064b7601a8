"""The SSD engine: Mamba-2's scalar-decay, matrix-state recurrence, per head.

Paper: T. Dao, A. Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (ICML 2024). The arguments follow ``mamba_chunk_scan_combined`` of
the authors' ``mamba_ssm`` package, so a Mamba-2 port changes only its imports.

Per batch row and head h (head dim P, state size N; head h reads the B and C of group
g = h // (H / G), so G groups share their B, C among H / G heads each)::

    Δ_t = softplus(dt_t + dt_bias)        (dt_softplus=True; else dt_t + dt_bias)     float32
    a_t = exp(Δ_t A_h)                    scalar decay per head (A_h < 0 in Mamba-2)
    S_t = a_t S_{t-1} + Δ_t x_t B_tᵀ      S_t ∈ R^{P×N}, the state
    y_t = S_t C_t + D_h ⊙ x_t             then y_t ⊙ silu(z_t) when z is given

Shapes (``batch`` is the batch axis; letters as in the paper)::

    x              [batch, T, H, P]
    dt             [batch, T, H]          A [H]          dt_bias [H]
    B, C           [batch, T, G, N]       H % G == 0
    D              [H] or [H, P]          z [batch, T, H, P]
    initial_states [batch, H, P, N]       float32 (zeros when None)
    seq_idx        [batch, T] int         reset [batch, T] bool
    y              [batch, T, H, P] in x's dtype;   final_states [batch, H, P, N] float32

Public API::

    y                 = ssd(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None,
                            dt_softplus=False, initial_states=None, seq_idx=None,
                            return_final_states=False, *, reset=None, reverse=False, mode="auto")
    y, final_states   = ssd(..., return_final_states=True)
    new_state, y_t    = step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                             dt_softplus=False)        # one token (no T axis); the argument order
                                                       # of mamba_ssm's selective_state_update
    y[, final_states] = reference(x, dt, A, B, C, ...)   # a plain loop, float64 under x64

Modes (both equal ``reference`` in values and, by autodiff, in gradients):

* ``"chunked"``: the paper's SSD algorithm. Time is cut into chunks of ``chunk_size`` steps. Inside
  a chunk the output is the masked quadratic form ``y = (L ∘ C Bᵀ)(Δ x)`` with
  ``L_ts = exp(Σ_{k=s+1..t} log a_k)``; each chunk's own end state is ``Σ_s exp(Σ_{k>s} log a_k)
  Δ_s x_s B_sᵀ``; a scan over chunks carries the state across boundaries; the state entering a
  chunk reaches step t through ``exp(Σ_{k<=t} log a_k) C_t``. Every decay is the exp of a *sum* of
  log decays taken directly over its segment (the "segsum"), never a difference of cumulative sums
  and never a division by a cumulative decay, so decays near zero cannot turn into 0/0 and long
  chunks lose no precision to cancellation. T not a multiple of ``chunk_size`` is padded with
  identity steps (log a = 0, Δ x = 0), which change neither y nor the final state.
* ``"sequential"``: a scan over time carrying S [batch, H, P, N]: O(T·H·P·N) work, no T² term.
* ``"auto"``: ``"chunked"``. Measured on 2 shared CPU cores (load ~4; batch 4, T = 1024, H = 8,
  P = N = 32, G = 1, float32, median of 5, jitted), forward / forward+backward: chunked (64)
  37 / 119 ms, chunked (128) 37 / 123 ms, sequential 14 / 214 ms. The sequential scan wins a
  forward pass on a CPU, the chunked form wins training (its backward pass is matmuls, not a
  reverse scan storing every state) and is the form that maps onto accelerators' matmul units.

Segments. ``reset[b, t] = True`` drops the state before step t (as if the segment started from
zeros). It is realised as a decay of exactly zero (log a_t = -inf), which both modes already handle:
a sum of log decays that crosses a segment start is -inf and its exp is 0, with zero gradient.
``seq_idx`` is mamba_ssm's packed-sequence marker and is turned into reset flags: a segment starts
wherever ``seq_idx`` changes, and at t = 0 when ``seq_idx[:, 0] != 0`` (mamba_ssm's kernels treat
``initial_states`` as the state of sequence 0). Both may be given; their flags are combined.
``reverse=True`` runs time backwards with ``reset`` keeping its meaning (``zoo/ops/_time.py``); the
final state is then the state after step 0.

Dtypes. Δ, the log decays and all accumulation are float32 (float64 when the inputs are float64
under x64): a bfloat16 Δ or cumulative decay would lose the decay itself. The state is float32;
y has x's dtype.

Differences from mamba_ssm: ``dt_limit`` and ``cu_seqlens`` are not offered (``reset``/``seq_idx``
cover packed sequences), and ``reset``, ``reverse`` and ``mode`` are added. Gradients are JAX's
autodiff through each mode; ``implementation="pallas"`` (the default on GPU/TPU) runs
``pallas_kernels.chunked_gla`` instead, with its Pallas backward.

Known upstream issue: in jaxlib 0.10.2 on CPU, ``jax.vmap`` of the *backward* pass of the chunked
mode (e.g. ``jax.jacrev``) at some shapes (seen at batch 4 with two or more chunks) runs, but the
next XLA compile in the process segfaults; with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``
(empty: no YNNPACK fusions) it does not, so the fault is in XLA:CPU's experimental YNNPACK path.
Plain gradients and ``vmap`` of the forward pass are not affected (the tests run both).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops._checks import check_float, check_positive_int, check_shape, shape_of
from zoo.ops._checks import check_mode as resolve_mode
from zoo.ops._dispatch import pallas_mode, use_pallas
from zoo.ops._time import reset_for_reverse

MODES = ("chunked", "sequential")
DEFAULT_CHUNK_SIZE = 64


# --------------------------------------------------------------------------------------------
# Validation at the public boundary.


class _Problem(NamedTuple):
    x: jax.Array           # [batch, T, H, P]   accumulation dtype
    delta: jax.Array       # [batch, T, H]      Δ, accumulation dtype (float32 or float64)
    log_a: jax.Array       # [batch, T, H]      Δ A, -inf where the carried state is dropped
    B: jax.Array           # [batch, T, G, N]
    C: jax.Array           # [batch, T, G, N]
    D: Any                 # [H, P] or None
    z: Any                 # [batch, T, H, P] or None
    h0: jax.Array          # [batch, H, P, N]


def check_chunk_size(who: str, chunk_size) -> int:
    """``chunk_size`` as a positive int (``None`` gives the default), or ValueError."""
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    return check_positive_int(who, "chunk_size", chunk_size)


def _check_mode(who: str, mode: str) -> str:
    return resolve_mode(who, mode, MODES, auto="chunked")


def _check_flags(who: str, arg: str, v, batch: int, time: int, integer_only: bool) -> None:
    check_shape(who, arg, v, (batch, time), "[batch, T]")
    dtype = v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype
    ok = jnp.issubdtype(dtype, jnp.integer) or (not integer_only and jnp.issubdtype(dtype, jnp.bool_))
    if not ok:
        kind = "an integer" if integer_only else "a bool"
        raise ValueError(f"{who}: {arg} must be {kind} array [batch, T], got dtype {dtype}")


def _segment_flags(reset, seq_idx):
    """bool [batch, T] (or None): True where a segment starts, from ``reset`` and/or ``seq_idx``."""
    flags = None if reset is None else reset.astype(bool)
    if seq_idx is not None:
        # mamba_ssm's kernels compare each token with the previous one, and token 0 with sequence 0.
        previous = jnp.concatenate([jnp.zeros_like(seq_idx[:, :1]), seq_idx[:, :-1]], axis=1)
        changed = seq_idx != previous
        flags = changed if flags is None else flags | changed
    return flags


def _discretise(dt, A, dt_bias, dt_softplus: bool, acc):
    """Δ [..., H] and Δ A, in the accumulation dtype whatever dt's dtype."""
    delta = dt.astype(acc)
    if dt_bias is not None:
        delta = delta + dt_bias.astype(acc)
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    return delta, delta * A.astype(acc)


def _validate(who, x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx,
              state_arg: str = "initial_states") -> None:
    """Every check of the public arguments, on shapes and dtypes only (nothing is traced here)."""
    for arg, v in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_float(who, arg, v)
    if np.ndim(x) != 4:
        raise ValueError(f"{who}: x must have shape [batch, T, H, P], got {shape_of(x)}")
    batch, time, heads, head_dim = shape_of(x)
    if time == 0:
        raise ValueError(f"{who}: x has shape {shape_of(x)} with T = 0 steps; at least one step is needed")
    check_shape(who, "dt", dt, (batch, time, heads), "[batch, T, H]")
    check_shape(who, "A", A, (heads,), "[H]")
    if np.ndim(B) != 4 or shape_of(B)[:2] != (batch, time):
        raise ValueError(f"{who}: B must have shape [batch, T, G, N] = ({batch}, {time}, G, N) to match x "
                         f"{shape_of(x)}, got {shape_of(B)}")
    groups, state = shape_of(B)[2:]
    if groups == 0 or heads % groups:
        raise ValueError(f"{who}: B has G = {groups} groups (shape {shape_of(B)}) but x has "
                         f"H = {heads} heads; H must be a multiple of G")
    check_shape(who, "C", C, shape_of(B), "[batch, T, G, N] like B")
    if D is not None:
        check_float(who, "D", D)
        if shape_of(D) not in ((heads,), (heads, head_dim)):
            raise ValueError(f"{who}: D must have shape [H] = ({heads},) or [H, P] = {(heads, head_dim)}, "
                             f"got {shape_of(D)}")
    if z is not None:
        check_float(who, "z", z)
        check_shape(who, "z", z, shape_of(x), "[batch, T, H, P] like x")
    if dt_bias is not None:
        check_float(who, "dt_bias", dt_bias)
        check_shape(who, "dt_bias", dt_bias, (heads,), "[H]")
    if initial_states is not None:
        check_float(who, state_arg, initial_states)
        check_shape(who, state_arg, initial_states, (batch, heads, head_dim, state), "[batch, H, P, N]")
    if reset is not None:
        _check_flags(who, "reset", reset, batch, time, integer_only=False)
    if seq_idx is not None:
        _check_flags(who, "seq_idx", seq_idx, batch, time, integer_only=True)


def _normalise(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx, dt_softplus: bool,
               reverse: bool) -> _Problem:
    """Validated arguments -> the problem both modes solve: accumulation dtype, Δ and log decays,
    time reversed when asked, -inf log decays where a segment starts."""
    batch, _, heads, head_dim = x.shape
    acc = jnp.promote_types(jnp.float32, x.dtype)
    if D is not None:
        D = jnp.broadcast_to(jnp.reshape(D, (heads, -1)), (heads, head_dim)).astype(acc)
    z = None if z is None else z.astype(acc)
    if initial_states is None:
        h0 = jnp.zeros((batch, heads, head_dim, B.shape[-1]), acc)
    else:
        h0 = initial_states.astype(acc)
    flags = _segment_flags(reset, seq_idx)
    delta, log_a = _discretise(dt, A, dt_bias, dt_softplus, acc)
    x, B, C = (v.astype(acc) for v in (x, B, C))
    if reverse:
        # Run the reversed sequence forwards; the flags move to where the carry is dropped.
        x, delta, log_a, B, C = (jnp.flip(v, axis=1) for v in (x, delta, log_a, B, C))
        z = None if z is None else jnp.flip(z, axis=1)
        flags = reset_for_reverse(flags)
    if flags is not None:
        log_a = jnp.where(flags[..., None], -jnp.inf, log_a)
    return _Problem(x, delta, log_a, B, C, D, z, h0)


# --------------------------------------------------------------------------------------------
# The two modes. Both take the prepared problem (time already reversed if asked) and return
# (y [batch, T, H, P] before the D skip and the z gate, final state).


def _update(h, x_t, delta_t, log_a_t, B_t, C_t):
    """One step for all heads: h [batch, G, R, P, N], x_t [batch, G, R, P], delta_t/log_a_t
    [batch, G, R], B_t/C_t [batch, G, N] -> (h, y_t [batch, G, R, P])."""
    decay = jnp.exp(log_a_t)[..., None, None]
    h = decay * h + jnp.einsum("bgrp,bgn->bgrpn", delta_t[..., None] * x_t, B_t)
    return h, jnp.einsum("bgrpn,bgn->bgrp", h, C_t)


def _sequential(p: _Problem):
    batch, time, heads, head_dim = p.x.shape
    groups, state = p.B.shape[2:]
    r = heads // groups
    x = p.x.reshape(batch, time, groups, r, head_dim)
    delta = p.delta.reshape(batch, time, groups, r)
    log_a = p.log_a.reshape(batch, time, groups, r)
    h0 = p.h0.reshape(batch, groups, r, head_dim, state)

    def body(h, inputs):
        return _update(h, *inputs)

    # The per-step work is O(H P N) against O(H P + G N) inputs, so moving time to the front costs
    # little here (unlike the diagonal engine, whose steps are as cheap as the copy).
    time_major = [jnp.moveaxis(v, 1, 0) for v in (x, delta, log_a, p.B, p.C)]
    final, ys = lax.scan(body, h0, time_major)
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, time, heads, head_dim)
    return y, final.reshape(batch, heads, head_dim, state)


def segsum(log_a):
    """[..., Q] -> [..., Q, Q]: ``out[..., t, s] = Σ_{k=s+1..t} log_a[..., k]`` for s <= t, -inf above.

    Each entry is summed directly over its own segment (a cumsum of the entries masked to k > s),
    not as a difference of two cumulative sums: no cancellation, and a -inf (a dropped state)
    inside a segment makes exactly that segment -inf without producing inf - inf.
    """
    q = log_a.shape[-1]
    rows = jnp.broadcast_to(log_a[..., :, None], log_a.shape + (q,))      # rows[..., k, s] = log_a_k
    after_s = jnp.tril(jnp.ones((q, q), bool), -1)                        # k > s
    sums = jnp.cumsum(jnp.where(after_s, rows, 0.0), axis=-2)             # Σ_{s<k<=t} log_a_k
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), sums, -jnp.inf)


def _chunked(p: _Problem, chunk: int):
    batch, time, heads, head_dim = p.x.shape
    groups, state = p.B.shape[2:]
    r = heads // groups
    pad = (-time) % chunk
    n = (time + pad) // chunk

    def chunks(v):
        # Identity steps: log a = 0 keeps the state, Δ x = 0 adds nothing, B = C = 0 read nothing.
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) if pad else v
        return v.reshape(batch, n, chunk, *v.shape[2:])

    u = chunks((p.delta[..., None] * p.x).reshape(batch, time, groups, r, head_dim))   # b c l g r p
    B, C = chunks(p.B), chunks(p.C)                                                    # b c l g n
    log_a = jnp.moveaxis(chunks(p.log_a), 2, -1).reshape(batch, n, groups, r, chunk)  # b c g r l

    # 1. Inside each chunk: the masked quadratic (attention-like) form.
    decay = jnp.exp(segsum(log_a))                                                     # b c g r l s
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)
    y_diag = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, u)

    # 2. Each chunk's own end state (from a zero start).
    to_end = decay[..., -1, :]                                                         # b c g r s
    local = jnp.einsum("bcsgn,bcsgrp->bcgrpn", B, jnp.moveaxis(to_end, -1, 2)[..., None] * u)

    # 3. Carry the state across chunks: h_next = a_chunk h_in + local.
    from_start = jnp.exp(jnp.cumsum(log_a, axis=-1))                                   # b c g r l
    a_chunk = from_start[..., -1]                                                      # b c g r

    def across(h, chunk_summary):
        a_c, local_c = chunk_summary
        return a_c[..., None, None] * h + local_c, h

    h0 = p.h0.reshape(batch, groups, r, head_dim, state)
    final, h_in = lax.scan(across, h0, (jnp.moveaxis(a_chunk, 1, 0), jnp.moveaxis(local, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)                                                    # b c g r p n

    # 4. The incoming state read out inside each chunk.
    y_off = jnp.einsum("bclgn,bcgrpn->bclgrp", C, h_in) * jnp.moveaxis(from_start, -1, 2)[..., None]
    y = (y_diag + y_off).reshape(batch, n * chunk, heads, head_dim)[:, :time]
    return y, final.reshape(batch, heads, head_dim, state)


def _finish(p: _Problem, y, final, reverse: bool, out_dtype, return_final_states: bool):
    if p.D is not None:
        y = y + p.D * p.x
    if p.z is not None:
        y = y * jax.nn.silu(p.z)
    if reverse:
        y = jnp.flip(y, axis=1)
    y = y.astype(out_dtype)
    return (y, final) if return_final_states else y


# --------------------------------------------------------------------------------------------
# Public functions.


@functools.partial(jax.jit, static_argnames=("dt_softplus", "reverse", "mode", "chunk", "with_final"))
def _ssd(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx, *, dt_softplus, reverse, mode, chunk,
         with_final):
    # One compiled program per configuration: eager callers pay one dispatch, not one per op.
    p = _normalise(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx, dt_softplus, reverse)
    y, final = _sequential(p) if mode == "sequential" else _chunked(p, chunk)
    return _finish(p, y, final, reverse, x.dtype, with_final)


def ssd(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
        initial_states=None, seq_idx=None, return_final_states=False, *, reset=None,
        reverse: bool = False, mode: str = "auto", implementation=None):
    """Mamba-2's SSD over axis 1. Returns ``y`` or, with ``return_final_states``, ``(y, final_states)``.

    See the module docstring for the equations, shapes, modes and segment flags. ``implementation``
    ("xla", "pallas" or a list tried in turn; None: Pallas on GPU/TPU when ``mode="auto"``) runs the
    recurrence as ``pallas_kernels.chunked_gla`` where it applies (real float32/bfloat16 inputs,
    chunk sizes that are powers of two >= 16): SSD is chunked GLA with one scalar decay per head,
    q = C, k = B, v = Δ x and the state transposed (``_ssd_pallas``).
    """
    who = "ssd"
    mode, implementation = pallas_mode(who, mode, implementation)
    requested_mode = mode
    mode = _check_mode(who, mode)
    chunk = check_chunk_size(who, chunk_size)
    _validate(who, x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx)
    reset, seq_idx = (None if v is None else jnp.asarray(v) for v in (reset, seq_idx))
    if use_pallas(who, implementation, requested_mode, _pallas_unsupported(x, chunk_size)):
        return _ssd_pallas(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx,
                           dt_softplus=bool(dt_softplus), reverse=bool(reverse), chunk=chunk,
                           with_final=bool(return_final_states))
    return _ssd(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx, dt_softplus=bool(dt_softplus),
                reverse=bool(reverse), mode=mode, chunk=chunk, with_final=bool(return_final_states))


def _pallas_unsupported(x, chunk_size) -> str | None:
    """Why pallas_kernels.chunked_gla cannot run this call (None when it can)."""
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return f"inputs of dtype {x.dtype}"
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return "chunk sizes other than powers of two >= 16"
    return None


def _ssd_pallas(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx, *, dt_softplus, reverse,
                chunk, with_final):
    """SSD through ``pallas_kernels.chunked_gla``: per head, S_ssd [P, N] is the transpose of GLA's
    state [K = N, V = P], so q = C_t, k = B_t (each head reads its group's), v = Δ_t x_t, g = Δ_t A,
    scale 1. Segment starts go to the kernel as reset flags (finite decays), and the D skip, the z gate
    and the reversal are the XLA modes' own (``_normalise``, ``_finish``)."""
    from pallas_kernels.chunked_gla import chunked_gla  # Pallas loads only when asked for

    p = _normalise(x, dt, A, B, C, D, z, dt_bias, initial_states, None, None, dt_softplus, reverse)
    flags = _segment_flags(reset, seq_idx)
    if reverse and flags is not None:
        flags = reset_for_reverse(flags)
    heads, groups = x.shape[2], B.shape[2]
    per_head = lambda v: jnp.repeat(v, heads // groups, axis=2).astype(x.dtype)      # [b, T, H, N]
    v = (p.delta[..., None] * p.x).astype(x.dtype)
    y, final = chunked_gla(per_head(p.C), per_head(p.B), v, p.log_a, jnp.swapaxes(p.h0, -1, -2),
                           reset=flags, scale=1.0, chunk_size=chunk)
    return _finish(p, y.astype(p.x.dtype), jnp.swapaxes(final, -1, -2), reverse, x.dtype, with_final)


@functools.partial(jax.jit, static_argnames=("dt_softplus",))
def _step(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus):
    p = _normalise(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, None if z is None else z[:, None],
                   dt_bias, state, None, None, dt_softplus, False)
    batch, _, heads, head_dim = p.x.shape
    groups, n = p.B.shape[2:]
    r = heads // groups
    h, y = _update(p.h0.reshape(batch, groups, r, head_dim, n), p.x[:, 0].reshape(batch, groups, r, head_dim),
                   p.delta[:, 0].reshape(batch, groups, r), p.log_a[:, 0].reshape(batch, groups, r),
                   p.B[:, 0], p.C[:, 0])
    y, new = _finish(p, y.reshape(batch, 1, heads, head_dim), h.reshape(batch, heads, head_dim, n), False,
                     x.dtype, True)
    return new, y[:, 0]


def step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token: ``(new_state, y_t)``.

    ``state`` [batch, H, P, N], ``x`` and ``z`` [batch, H, P], ``dt`` [batch, H], ``B``/``C``
    [batch, G, N], the rest as in ``ssd``. The new state is float32 (float64 for float64 inputs);
    ``y_t`` has x's dtype.
    """
    who = "ssd.step"
    if np.ndim(x) != 3:
        raise ValueError(f"{who}: x must have shape [batch, H, P], got {shape_of(x)}")
    for arg, v in (("dt", dt), ("B", B), ("C", C)):
        if np.ndim(v) != (2 if arg == "dt" else 3):
            letters = "[batch, H]" if arg == "dt" else "[batch, G, N]"
            raise ValueError(f"{who}: {arg} must have shape {letters}, got {shape_of(v)}")
    expand = lambda v: None if v is None else v[:, None]
    _validate(who, expand(x), expand(dt), A, expand(B), expand(C), D, expand(z), dt_bias, state, None, None,
              state_arg="state")
    return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=bool(dt_softplus))


def reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
              seq_idx=None, return_final_states=False, *, reset=None, reverse: bool = False):
    """A plain Python loop over time, head by head through the group index: the check for every mode
    (float64 when the inputs are float64 under x64)."""
    _validate("ssd.reference", x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx)
    p = _normalise(x, dt, A, B, C, D, z, dt_bias, initial_states, reset, seq_idx, bool(dt_softplus),
                   bool(reverse))
    batch, time, heads, _ = p.x.shape
    groups = p.B.shape[2]
    group_of_head = np.arange(heads) // (heads // groups)
    h = p.h0
    ys = []
    for t in range(time):
        b_t, c_t = p.B[:, t, group_of_head], p.C[:, t, group_of_head]           # [batch, H, N]
        h = (jnp.exp(p.log_a[:, t])[..., None, None] * h
             + (p.delta[:, t, :, None] * p.x[:, t])[..., None] * b_t[:, :, None, :])
        ys.append(jnp.sum(h * c_t[:, :, None, :], axis=-1))
    return _finish(p, jnp.stack(ys, axis=1), h, bool(reverse), x.dtype, return_final_states)
