"""The matrix engine: gated outer-product memories, one engine for the linear-attention family.

Per batch row and head, with a [K, V] state S (float32)::

    S_t = Diag(α_t) S_{t-1} + k_t v_tᵀ          α_t = exp(g_t): one scalar per head, or one per key dim
    o_t = S_tᵀ q_t · scale                       (``exclusive=True``: o_t = S_{t-1}ᵀ q_t · scale)

Every model of the family is this recurrence with its own gates (the thin front ends are in
``zoo/ops/linear_attention.py``): linear attention (α = 1), RetNet and Lightning (a fixed α per
head), Mamba-2 and simple GLA (a scalar α_t per head), GLA and HGRN2 (α_t per key dimension),
GateLoop (complex α_t), RWKV-6 (α_t per key, exclusive readout plus a bonus term) and mLSTM (an
exponential input gate with the normaliser and max-stabiliser below). Derivation of the chunked
form: S. Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training" (ICML
2024), and Y. Sun et al., "Retentive Network" (2023), §2.

Options (each a keyword; all modes support all of them):

* ``log_input_gate`` ĩ [B, T, H] (xLSTM's exponential input gate, M. Beck et al., "xLSTM: Extended
  Long Short-Term Memory", NeurIPS 2024): the update becomes ``S_t = α_t S_{t-1} + exp(ĩ_t) k_t v_tᵀ``
  with a scalar α_t, and the state is kept scaled by a max-stabiliser m:
  ``m_t = max(g_t + m_{t-1}, ĩ_t)``, ``S̃_t = exp(g_t + m_{t-1} - m_t) S̃_{t-1} + exp(ĩ_t - m_t) k_t v_tᵀ``
  (the true state is exp(m_t) S̃_t). Nothing exponentiates a positive number, so gates of any size
  are safe. A fresh state has m = 0 (as in the xLSTM kernels), also after a reset.
* ``normalizer``: a running key sum n_t = Diag(α_t) n_{t-1} + (exp(ĩ_t)) k_t is kept beside S (as
  an extra value column of ones), and

  - ``"sum"`` (Katharopoulos et al. 2020): ``o_t = S_tᵀ q_t / (n_tᵀ q_t + eps)``;
  - ``"max_abs"`` (xLSTM): ``o_t = S̃_tᵀ q_t / (max(|ñ_tᵀ q_t|, exp(-m_t)) + eps)``, i.e.
    ``S_tᵀ q_t / (max(|n_tᵀ q_t|, 1) + eps exp(m_t))`` unscaled.

Shapes (FLA's layout)::

    q, k           [B, T, H, K]        v [B, T, H, V]
    log_decay      None (no decay), [B, T, H] (scalar per head) or [B, T, H, K] (per key dimension);
                   may be complex (GateLoop), then q, k, v, o and the state are complex
    log_input_gate [B, T, H] or None
    initial_state  S [B, H, K, V], or MatrixState(S, n [B, H, K] | None, m [B, H] | None) when a
                   normaliser or stabiliser is used (None parts start from zeros)
    reset          bool [B, T]: True drops the state before step t (a fresh state, m = 0)
    o              [B, T, H, V] in v's dtype (complex when the decay is complex)

Public API::

    o, final_state = apply(q, k, v, log_decay=None, *, log_input_gate=None, normalizer=None,
                           eps=1e-6, scale=None, initial_state=None, reset=None, reverse=False,
                           exclusive=False, mode="auto", chunk_size=None)
    new_state, o_t = step(state, q_t, k_t, v_t, log_decay_t=None, *, ...)   # one token, no T axis
    o, final_state = reference(...)        # a plain Python loop, float64 under x64

``final_state`` is the array S when neither a normaliser nor an input gate is used, else a
``MatrixState``. ``scale`` multiplies q (default K^-1/2, FLA's default).

Modes (all equal ``reference`` in values and, by autodiff, in gradients):

* ``"chunked"``: the chunkwise form (``zoo/ops/matrix_chunks.py``): inside a chunk an attention-like
  masked product with decay masks; each chunk's own state; a scan over chunks passes the state.
  Default chunk 64 for a scalar decay, 16 for a decay per key dimension (its mask is [C, C, K]).
* ``"parallel"``: the quadratic masked form ``(Q Kᵀ ⊙ M) V`` over the whole sequence, i.e. the
  chunked form with one chunk: O(T²) memory, for short sequences.
* ``"sequential"``: a scan over time carrying the [K, V] state per head.
* ``"auto"``: ``"chunked"``.

Segments and direction: ``reset`` and ``reverse`` follow ``zoo/ops/_time.py``. ``reverse=True``
runs time backwards; the final state is then the state after step 0.

Dtypes: q, k, v are accumulated in float32 (float64 for float64 inputs under x64); every
cumulative sum of log gates is float32 or wider, and the state is float32 (complex64 for complex
decays).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops._checks import check_float, check_positive_int, check_qkv, check_shape, shape_of
from zoo.ops._checks import check_mode as resolve_mode
from zoo.ops._dispatch import pallas_mode, sequence_hook, use_pallas
from zoo.ops._time import check_reset, reset_for_reverse
from zoo.ops.matrix_chunks import DEFAULT_CHUNK_SCALAR, DEFAULT_CHUNK_VECTOR, SUB_CHUNK, Problem, chunked

MODES = ("chunked", "sequential", "parallel")
NORMALIZERS = (None, "sum", "max_abs")


class MatrixState(NamedTuple):
    """The state when a normaliser or stabiliser is used; S and n are scaled by exp(-m)."""

    S: jax.Array            # [B, H, K, V]
    n: Any = None           # [B, H, K] or None
    m: Any = None           # [B, H] or None


# --------------------------------------------------------------------------------------------
# Validation at the public boundary (shapes and dtypes only; nothing is traced here).


def _check_array(who: str, arg: str, x, *, complex_ok: bool = True):
    check_float(who, arg, x, complex_ok=complex_ok)


def check_mode(who: str, mode: str) -> str:
    return resolve_mode(who, mode, MODES, auto="chunked")


def check_chunk_size(who: str, chunk_size, mode: str, vector_decay: bool) -> int | None:
    if chunk_size is None:
        return DEFAULT_CHUNK_VECTOR if vector_decay else DEFAULT_CHUNK_SCALAR
    chunk_size = check_positive_int(who, "chunk_size", chunk_size)
    if mode != "chunked":
        raise ValueError(f"{who}: chunk_size={chunk_size} is given but mode={mode!r} has no chunks")
    return int(chunk_size)


def _validate(who, q, k, v, log_decay, log_input_gate, normalizer, initial_state, time_axis=True):
    """Checks every argument; returns (batch, T, H, K, V). ``time_axis=False`` for one-token steps."""
    lead = "[B, T, H" if time_axis else "[B, H"
    for arg, x in (("q", q), ("k", k), ("v", v)):
        _check_array(who, arg, x)
    batch, time, heads, dk, dv, prefix = check_qkv(who, q, k, v, time_axis=time_axis)
    if log_decay is not None:
        _check_array(who, "log_decay", log_decay)
        if shape_of(log_decay) not in (prefix, prefix + (dk,)):
            raise ValueError(f"{who}: log_decay must have shape {lead}] = {prefix} (one decay per head) "
                             f"or {lead}, K] = {prefix + (dk,)} (one per key dimension), "
                             f"got {shape_of(log_decay)}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"{who}: normalizer={normalizer!r} is not one of {NORMALIZERS}")
    if log_input_gate is not None:
        _check_array(who, "log_input_gate", log_input_gate, complex_ok=False)
        check_shape(who, "log_input_gate", log_input_gate, prefix, f"{lead}]")
        if log_decay is not None and shape_of(log_decay) != prefix:
            raise ValueError(f"{who}: log_input_gate needs one decay per head, log_decay {lead}] = {prefix}; "
                             f"got log_decay {shape_of(log_decay)}")
        if any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in (q, k, v, log_decay) if x is not None):
            raise ValueError(f"{who}: log_input_gate (the max-stabiliser) works with real inputs only")
    if initial_state is not None:
        _validate_state(who, initial_state, batch, heads, dk, dv, normalizer, log_input_gate is not None)
    return batch, time, heads, dk, dv


def _validate_state(who, state, batch, heads, dk, dv, normalizer, stabilised):
    arg = "initial_state"
    if isinstance(state, MatrixState):
        S, n, m = state
    elif isinstance(state, (tuple, list)):
        raise TypeError(f"{who}: {arg} must be an array [B, H, K, V] or a MatrixState, "
                        f"got a {type(state).__name__}")
    else:
        S, n, m = state, None, None
    _check_array(who, f"{arg}.S" if isinstance(state, MatrixState) else arg, S)
    check_shape(who, f"{arg} S", S, (batch, heads, dk, dv), "[B, H, K, V]")
    if n is not None:
        if normalizer is None:
            raise ValueError(f"{who}: {arg}.n is given but normalizer=None keeps no key sum")
        _check_array(who, f"{arg}.n", n)
        check_shape(who, f"{arg}.n", n, (batch, heads, dk), "[B, H, K]")
    if m is not None:
        if not stabilised:
            raise ValueError(f"{who}: {arg}.m is given but there is no log_input_gate to stabilise")
        _check_array(who, f"{arg}.m", m, complex_ok=False)
        check_shape(who, f"{arg}.m", m, (batch, heads), "[B, H]")


# --------------------------------------------------------------------------------------------
# The problem every mode solves.


def _accumulation_dtype(*xs):
    dtype = jnp.result_type(*[x.dtype for x in xs if x is not None])
    return jnp.promote_types(jnp.float32, dtype)


def _prepare(q, k, v, log_decay, log_input_gate, normalizer, scale, initial_state, reset, reverse, exclusive,
             time_axis=True) -> Problem:
    if not time_axis:
        add_t = lambda x: None if x is None else x[:, None]
        q, k, v, log_decay, log_input_gate = map(add_t, (q, k, v, log_decay, log_input_gate))
    batch, time, heads, dk = q.shape
    acc = _accumulation_dtype(q, k, v, log_decay)
    real = jnp.zeros((), acc).real.dtype
    if scale is None:
        scale = dk ** -0.5
    q = q.astype(acc) * scale
    k, v = k.astype(acc), v.astype(acc)
    if log_decay is None:
        g = jnp.zeros((batch, time, heads, 1), acc)
    else:
        g = log_decay.astype(acc)
        g = g[..., None] if g.ndim == 3 else g
    i = None if log_input_gate is None else log_input_gate.astype(real)
    if normalizer is not None:        # the key sum rides along as one more value column of ones
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), acc)], axis=-1)
    S0, n0, m0 = (initial_state if isinstance(initial_state, MatrixState) else (initial_state, None, None))
    S0 = jnp.zeros((batch, heads, dk, v.shape[-1] - (normalizer is not None)), acc) if S0 is None else S0
    S0 = S0.astype(acc)
    if normalizer is not None:
        n0 = jnp.zeros((batch, heads, dk), acc) if n0 is None else n0.astype(acc)
        S0 = jnp.concatenate([S0, n0[..., None]], axis=-1)
    if log_input_gate is not None:
        m0 = jnp.zeros((batch, heads), real) if m0 is None else m0.astype(real)
    else:
        m0 = None
    reset = None if reset is None else jnp.asarray(reset).astype(bool)
    if reverse:
        q, k, v, g = (jnp.flip(x, axis=1) for x in (q, k, v, g))
        i = None if i is None else jnp.flip(i, axis=1)
        reset = reset_for_reverse(reset)
    return Problem(q, k, v, g, i, reset, S0, m0, bool(exclusive))


def _recurrence_step(carry, q_t, k_t, v_t, g_t, i_t, reset_t, exclusive: bool):
    """One step for all heads: carry (S [B, H, K, V'], m [B, H] or None), inputs without T.
    Returns (carry, o_t [B, H, V'], m_t)."""
    S, m = carry
    if reset_t is not None:
        S = jnp.where(reset_t[:, None, None, None], 0, S)
        m = None if m is None else jnp.where(reset_t[:, None], 0, m)
    before = S
    if i_t is None:
        S = jnp.exp(g_t)[..., None] * S + k_t[..., :, None] * v_t[..., None, :]
        m_new = None
    else:
        m_new = jnp.maximum(g_t[..., 0] + m, i_t)
        S = (jnp.exp(g_t[..., 0] + m - m_new)[..., None, None] * S
             + jnp.exp(i_t - m_new)[..., None, None] * k_t[..., :, None] * v_t[..., None, :])
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t, before if exclusive else S)
    return (S, m_new), o_t, m_new


def _sequential(p: Problem):
    def body(carry, xs):
        q_t, k_t, v_t, g_t, i_t, r_t = xs
        carry, o_t, m_t = _recurrence_step(carry, q_t, k_t, v_t, g_t, i_t, r_t, p.exclusive)
        return carry, (o_t, m_t)

    time_major = [None if x is None else jnp.moveaxis(x, 1, 0) for x in (p.q, p.k, p.v, p.g, p.i, p.reset)]
    (S, m), (o, m_seq) = lax.scan(body, (p.S0, p.m0), time_major)
    m_seq = None if m_seq is None else jnp.moveaxis(m_seq, 0, 1)
    return jnp.moveaxis(o, 0, 1), m_seq, S, m


def _one_chunk(time: int) -> int:
    """The parallel mode's single chunk: T rounded up to whole sub-chunks (the padding is exact), so
    that decays per key dimension still tile into sub-chunks."""
    return -(-time // SUB_CHUNK) * SUB_CHUNK if time > SUB_CHUNK else time


def _finish(o, m_seq, S, m, normalizer, eps, reverse, out_dtype, keep_state_form):
    """Normalise, put time back in order, cast; the final state as an array or a MatrixState."""
    n = None
    if normalizer is not None:
        o, den = o[..., :-1], o[..., -1:]
        S, n = S[..., :-1], S[..., -1]
        if normalizer == "sum":
            o = o / (den + eps)
        else:
            floor = 1.0 if m_seq is None else jnp.exp(-m_seq)[..., None]
            o = o / (jnp.maximum(jnp.abs(den), floor) + eps)
    if reverse:
        o = jnp.flip(o, axis=1)
    o = o.astype(out_dtype)
    state = MatrixState(S, n, m) if keep_state_form else S
    return o, state


def _output_dtype(v, log_decay):
    if log_decay is not None and jnp.issubdtype(log_decay.dtype, jnp.complexfloating):
        return jnp.promote_types(v.dtype, log_decay.dtype)
    return v.dtype


@functools.partial(jax.jit, static_argnames=("normalizer", "eps", "scale", "reverse", "exclusive", "mode",
                                             "chunk"))
def _apply(q, k, v, log_decay, log_input_gate, initial_state, reset, *, normalizer, eps, scale, reverse,
           exclusive, mode, chunk):
    p = _prepare(q, k, v, log_decay, log_input_gate, normalizer, scale, initial_state, reset, reverse,
                 exclusive)
    if mode == "sequential":
        o, m_seq, S, m = _sequential(p)
    else:
        o, m_seq, S, m = chunked(p, chunk if mode == "chunked" else _one_chunk(q.shape[1]))
    keep_form = normalizer is not None or log_input_gate is not None
    return _finish(o, m_seq, S, m, normalizer, eps, reverse, _output_dtype(v, log_decay), keep_form)


def apply(q, k, v, log_decay=None, *, log_input_gate=None, normalizer=None, eps: float = 1e-6, scale=None,
          initial_state=None, reset=None, reverse: bool = False, exclusive: bool = False, mode: str = "auto",
          chunk_size=None, implementation=None):
    """The recurrence over axis 1; returns ``(o, final_state)``. See the module docstring.

    ``implementation`` ("xla", "pallas" or a list tried in turn; None: Pallas on GPU/TPU when
    ``mode="auto"``) picks ``pallas_kernels.chunked_gla`` for the cases it covers (a real decay per
    head or per key dimension, real float32/bfloat16 inputs, inclusive readout, either direction;
    no normaliser and a plain state array, or mLSTM: ``log_input_gate`` with ``normalizer="max_abs"``
    and a scalar decay); anything else runs XLA, with one warning when Pallas was asked for."""
    who = "matrix.apply"
    hook = sequence_hook()
    if hook is not None:        # zoo.parallel.sequence.sharded_time: time split over a mesh axis
        return hook("matrix", q, k, v, log_decay, log_input_gate=log_input_gate, normalizer=normalizer,
                    eps=eps, scale=scale, initial_state=initial_state, reset=reset, reverse=reverse,
                    exclusive=exclusive, mode=mode, chunk_size=chunk_size, implementation=implementation)
    mode, implementation = pallas_mode(who, mode, implementation)
    requested_mode = mode
    mode = check_mode(who, mode)
    batch, time, *_ = _validate(who, q, k, v, log_decay, log_input_gate, normalizer, initial_state)
    vector_decay = log_decay is not None and np.ndim(log_decay) == 4
    chunk = check_chunk_size(who, chunk_size, mode, vector_decay)
    if exclusive and log_input_gate is not None:
        raise ValueError(f"{who}: exclusive=True (read before the update) is not offered with log_input_gate")
    reset = check_reset(who, reset, batch, time)
    unsupported = _pallas_unsupported(q, k, v, log_decay, log_input_gate, normalizer, initial_state, reverse,
                                      exclusive, chunk_size)
    if use_pallas(who, implementation, requested_mode, unsupported):
        kernel_chunk = chunk_size or (DEFAULT_CHUNK_VECTOR if vector_decay else DEFAULT_CHUNK_SCALAR)
        return _pallas(q, k, v, log_decay, log_input_gate, initial_state, reset, scale, float(eps),
                       bool(reverse), kernel_chunk)
    return _apply(q, k, v, log_decay, log_input_gate, initial_state, reset, normalizer=normalizer,
                  eps=float(eps), scale=None if scale is None else float(scale), reverse=bool(reverse),
                  exclusive=bool(exclusive), mode=mode, chunk=chunk)


def _pallas(q, k, v, log_decay, log_input_gate, initial_state, reset, scale, eps: float, reverse: bool,
            chunk: int):
    """pallas_kernels.chunked_gla: ``chunked_gla`` (a scalar decay per head or one per key dimension)
    or, with an input gate (and then normalizer="max_abs"), ``chunked_mlstm``. ``reverse`` runs the
    kernel forwards over the flipped sequence, with the flags moved as ``_prepare`` moves them for the
    XLA modes, and flips the output back."""
    from pallas_kernels.chunked_gla import chunked_gla, chunked_mlstm  # Pallas loads only when asked for

    g = jnp.zeros(q.shape[:3], jnp.float32) if log_decay is None else log_decay
    if reverse:
        q, k, v, g = (jnp.flip(x, axis=1) for x in (q, k, v, g))
        log_input_gate = None if log_input_gate is None else jnp.flip(log_input_gate, axis=1)
        reset = reset_for_reverse(reset)
    if log_input_gate is None:
        o, S = chunked_gla(q, k, v, g, initial_state, reset=reset, scale=scale, chunk_size=chunk)
    else:
        parts = (tuple(initial_state) if isinstance(initial_state, MatrixState)
                 else (initial_state, None, None))
        o, S = chunked_mlstm(q, k, v, g, log_input_gate, None if initial_state is None else parts,
                             reset=reset, scale=scale, eps=eps, chunk_size=chunk)
        S = MatrixState(*S)
    return (jnp.flip(o, axis=1) if reverse else o), S


def _pallas_unsupported(q, k, v, log_decay, log_input_gate, normalizer, initial_state, reverse, exclusive,
                        chunk_size):
    """Why pallas_kernels.chunked_gla cannot run this call, or None when it can."""
    del reverse                      # run forwards over the flipped sequence (``_pallas``)
    dtypes = {x.dtype for x in (q, k, v)}
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return "chunk sizes other than powers of two >= 16"
    mlstm = log_input_gate is not None and normalizer == "max_abs"
    if (log_input_gate is not None or normalizer is not None) and not mlstm:
        return "normalisers other than mLSTM's (log_input_gate with normalizer='max_abs')"
    if mlstm and log_decay is not None and np.ndim(log_decay) == 4:
        return "the mLSTM input gate with a decay per key dimension"
    if exclusive:
        return "exclusive=True (read before the update)"
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.float32, jnp.bfloat16):
        return "inputs other than all float32 or all bfloat16"
    if log_decay is not None and jnp.iscomplexobj(log_decay):
        return "complex decays"
    if isinstance(initial_state, MatrixState) and not mlstm:
        return "a MatrixState initial state"
    return None


@functools.partial(jax.jit, static_argnames=("normalizer", "eps", "scale", "exclusive"))
def _step(state, q_t, k_t, v_t, log_decay_t, log_input_gate_t, *, normalizer, eps, scale, exclusive):
    p = _prepare(q_t, k_t, v_t, log_decay_t, log_input_gate_t, normalizer, scale, state, None, False,
                 exclusive, time_axis=False)
    carry, o_t, m_t = _recurrence_step((p.S0, p.m0), p.q[:, 0], p.k[:, 0], p.v[:, 0], p.g[:, 0],
                                       None if p.i is None else p.i[:, 0], None, exclusive)
    keep_form = normalizer is not None or log_input_gate_t is not None
    m_seq = None if m_t is None else m_t[:, None]
    o, new_state = _finish(o_t[:, None], m_seq, *carry, normalizer, eps, False,
                           _output_dtype(v_t, log_decay_t), keep_form)
    return new_state, o[:, 0]


def step(state, q_t, k_t, v_t, log_decay_t=None, *, log_input_gate_t=None, normalizer=None, eps: float = 1e-6,
         scale=None, exclusive: bool = False):
    """One token: ``(new_state, o_t)``; q_t, k_t [B, H, K], v_t [B, H, V], log_decay_t [B, H] or
    [B, H, K], log_input_gate_t [B, H]; ``state`` as ``initial_state`` of ``apply`` (None: zeros)."""
    who = "matrix.step"
    _validate(who, q_t, k_t, v_t, log_decay_t, log_input_gate_t, normalizer, state, time_axis=False)
    if exclusive and log_input_gate_t is not None:
        raise ValueError(f"{who}: exclusive=True is not offered with log_input_gate_t")
    return _step(state, q_t, k_t, v_t, log_decay_t, log_input_gate_t, normalizer=normalizer, eps=float(eps),
                 scale=None if scale is None else float(scale), exclusive=bool(exclusive))


def reference(q, k, v, log_decay=None, *, log_input_gate=None, normalizer=None, eps: float = 1e-6, scale=None,
              initial_state=None, reset=None, reverse: bool = False, exclusive: bool = False):
    """A plain Python loop over time written from the equations (float64 under x64): the check for
    every mode. It shares only argument preparation with the modes."""
    who = "matrix.reference"
    batch, time, *_ = _validate(who, q, k, v, log_decay, log_input_gate, normalizer, initial_state)
    reset = check_reset(who, reset, batch, time)
    p = _prepare(q, k, v, log_decay, log_input_gate, normalizer, scale, initial_state, reset, reverse,
                 exclusive)
    S, m = p.S0, p.m0
    outs, ms = [], []
    for t in range(time):
        if p.reset is not None:
            fresh = p.reset[:, t]
            S = jnp.where(fresh[:, None, None, None], jnp.zeros_like(S), S)
            m = None if m is None else jnp.where(fresh[:, None], jnp.zeros_like(m), m)
        before = S
        alpha = jnp.exp(p.g[:, t])                                          # [B, H, G]
        outer = jnp.einsum("bhk,bhv->bhkv", p.k[:, t], p.v[:, t])
        if m is None:
            S = alpha[..., None] * S + outer
        else:
            m_new = jnp.maximum(p.g[:, t, :, 0] + m, p.i[:, t])
            S = (jnp.exp(p.g[:, t, :, 0] + m - m_new)[..., None, None] * S
                 + jnp.exp(p.i[:, t] - m_new)[..., None, None] * outer)
            m = m_new
            ms.append(m)
        outs.append(jnp.einsum("bhk,bhkv->bhv", p.q[:, t], before if exclusive else S))
    m_seq = jnp.stack(ms, axis=1) if ms else None
    keep_form = normalizer is not None or log_input_gate is not None
    return _finish(jnp.stack(outs, axis=1), m_seq, S, m, normalizer, eps, bool(reverse),
                   _output_dtype(v, log_decay), keep_form)
