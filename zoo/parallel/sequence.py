"""Sequence parallelism for the linear recurrences: time (axis 1) split over a mesh axis.

A linear recurrence is an affine map per step, ``S_t = A_t S_{t-1} + X_t``, and affine maps compose
associatively, so a sequence can be cut into pieces that are scanned independently and then
stitched together by a scan over the pieces' compositions: the parallel prefix scan (G. E.
Blelloch, "Prefix Sums and Their Applications", 1990), with one piece per device. For linear
attention this is the idea of W. Sun et al., "Linear Attention Sequence Parallelism" (LASP, 2024):
each device passes on an O(state) summary of its piece, never its activations.

Under ``jax.shard_map`` with time split over the mesh axis ``axis`` (n devices, T/n steps each):

1. Each shard runs the ordinary engine on its own piece from a zero state and gets its summary: the
   affine map ``S_out = M S_in + S_loc`` of its whole piece. ``S_loc`` is the local final state and
   ``M`` the transition: the total decay (diagonal: [B, ...]; matrix: one per key dimension,
   [B, H, K]) or, for the delta rule, the [K, K] product of the per-step transitions
   ``α_t (I - β_t k_t k_tᵀ)``. A reset inside the piece (including at its first step, i.e. exactly at
   a shard boundary) drops the entering state, so ``M`` is zero there.
2. The summaries are combined across the axis: one ``all_gather`` (each shard receives the n - 1
   others' summaries, O(n · state) bytes, independent of T), then a small sequential scan over the n
   summaries, started from the global ``initial_state``, gives every shard its true entering state
   ``S_in`` (shard 0 gets ``initial_state``) and the final state.
3. Each shard corrects its outputs with ``S_in``:

   * diagonal: ``h_t += A_t ⊙ S_in`` with the cumulative decay ``A_t`` of the piece;
   * matrix (without a normaliser) and delta: the output is linear in the state, so
     ``o_t += (M_tᵀ q_t · scale)ᵀ S_in`` with the cumulative transition ``M_t``;
   * matrix with a normaliser (the readout divides by the key sum) or with mLSTM's input gate: the
     engine is run a second time on the piece, from the true entering state. Exact, and twice the
     local work.

   The cumulative transitions come from the engine itself, not from a second implementation: the
   piece is run with extra state columns that start as the identity and receive no input (value /
   input columns of zeros), so those columns of the state are ``M_t`` (``A_t``) and those of the
   readout are ``M_tᵀ q_t · scale``. Step 1 and the correction therefore cost one engine call with
   the state widened by K columns (matrix, delta), or two calls (diagonal: b from zeros, then zeros
   from ones).
4. The final state is the last shard's; it is returned replicated over ``axis`` (one masked
   ``psum`` of one state).

``reverse=True`` (time runs backwards; the engines' meaning of ``reset`` is kept, see
``zoo/ops/_time.py``) runs the same steps with the scan over shards from the last to the first; the
global ``initial_state`` enters the last shard and the final state leaves shard 0. Backwards, the
state carried from shard j + 1 into shard j is dropped when shard j + 1's first step starts a
segment, a flag in shard j + 1's piece of ``reset``; those [B] flags are gathered with the summaries.

Gradients flow through all of it (``jax.grad`` through ``shard_map``, the engines' own VJPs inside).

What cannot be split: a nonlinear cell (LSTM, GRU, sLSTM, ...) has no O(state) summary of a piece:
its state after the piece is a nonlinear function of the state before it, which cannot be evaluated
before that state is known, so the pieces would run one after the other and time cannot be split
(``check_engine("nonlinear")`` raises). Not offered here yet: the matrix engine's
``log_input_gate`` with ``reverse=True``, and the diagonal engine's ``(real, imag)`` tuple inputs
(pass complex arrays instead).

mLSTM's input gate (matrix engine, ``log_input_gate``): the engine keeps the state scaled,
S = exp(m) S̃, by the max-stabiliser ``m_t = max(g_t + m_{t-1}, i_t)``. That is a linear recurrence
in the (max, +) semiring, so a piece has a summary for it too, ``m_out = max(G + m_in, L)``; the
summaries (G, L, S̃_loc, m_loc) compose with the rescaling of S̃, and each piece is run again from
its true entering (S̃, m), since the normalised readout depends on m.

Public API (``mesh`` a ``jax.sharding.Mesh``; ``batch_axis`` optionally shards the batch too)::

    h, final_state = diagonal_apply(a, b, *, mesh, axis="sequence", batch_axis=None,
                                    initial_state=None, reset=None, **engine_kwargs)
    o, final_state = matrix_apply(q, k, v, log_decay=None, *, mesh, axis=..., ...)
    o, final_state = delta_apply(q, k, v, beta, log_decay=None, *, mesh, axis=..., ...)
    out            = apply(engine_name, *args, mesh=..., **kwargs)        # dispatcher
    check_engine(engine_name)          # ValueError for engines that cannot be split along time
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from zoo.ops import delta as delta_engine
from zoo.ops import diagonal as diagonal_engine
from zoo.ops import matrix as matrix_engine
from zoo.ops._dispatch import using_sequence_hook

ENGINES = ("diagonal", "matrix", "delta")
# Engines whose step is not affine in the state: their pieces have no summary to pass on.
NONLINEAR_ENGINES = ("nonlinear",)


# --------------------------------------------------------------------------------------------
# Validation at the public boundary (global shapes, before anything is sharded).


def check_engine(engine: str) -> str:
    """``engine`` if it can run sequence-parallel, else a ValueError that says why not."""
    if engine in NONLINEAR_ENGINES:
        raise ValueError(
            f"sequence parallelism: the {engine!r} engine cannot be split along time. Its cell is "
            f"nonlinear in the state, so a piece of the sequence has no summary (an affine map "
            f"S_out = M S_in + S_loc) that could be computed before the state entering it is known; "
            f"shard the batch instead, or use one of {ENGINES}")
    if engine not in ENGINES:
        raise ValueError(f"sequence parallelism: unknown engine {engine!r}; supported are {ENGINES}")
    return engine


def _batch_axes(batch_axis) -> tuple[str, ...]:
    if batch_axis is None:
        return ()
    return tuple(batch_axis) if isinstance(batch_axis, (tuple, list)) else (batch_axis,)


def _check_mesh(who: str, mesh, axis, batch_axis, arg: str, shape) -> int:
    """The number of shards along ``axis``; ValueError naming the argument and shapes otherwise."""
    names = tuple(mesh.axis_names)
    sizes = dict(zip(names, mesh.devices.shape, strict=True))
    if axis not in names:
        raise ValueError(f"{who}: axis={axis!r} is not an axis of the mesh, whose axes are {sizes}")
    n = sizes[axis]
    if len(shape) < 2:
        raise ValueError(f"{who}: {arg} must have shape [B, T, ...], got {tuple(shape)}")
    if shape[1] % n:
        raise ValueError(f"{who}: {arg} has shape {tuple(shape)}: T = {shape[1]} (axis 1) is not divisible "
                         f"by the {n} devices of mesh axis {axis!r}")
    batch_axes = _batch_axes(batch_axis)
    for name in batch_axes:
        if name not in names or name == axis:
            raise ValueError(f"{who}: batch_axis={batch_axis!r}: {name!r} is not a mesh axis other than "
                             f"axis={axis!r}; the mesh has axes {sizes}")
    batch_shards = math.prod(sizes[name] for name in batch_axes)
    if shape[0] % batch_shards:
        raise ValueError(f"{who}: {arg} has shape {tuple(shape)}: B = {shape[0]} (axis 0) is not divisible "
                         f"by the {batch_shards} devices of batch_axis={batch_axis!r}")
    return n


# --------------------------------------------------------------------------------------------
# Specs: [B, T, ...] arrays split over (batch, time), [B, ...] states over batch only.


def _batch_spec(batch_axis):
    axes = _batch_axes(batch_axis)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _sequence_spec(x, batch_axis, axis):
    """[B, T, ...] split over batch and time; a size-1 batch or time axis (broadcast) is not split."""
    if x is None:
        return None
    return P(_batch_spec(batch_axis) if x.shape[0] > 1 else None, axis if x.shape[1] > 1 else None)


def _state_spec(x, batch_axis):
    return None if x is None else P(_batch_spec(batch_axis))


# --------------------------------------------------------------------------------------------
# The combine: from every shard's summary (M_j, S_j), the state entering each shard.


def _varying(x, axis):
    """x marked as varying over ``axis``: scan carries inside shard_map must be (ENV-NOTES §4)."""
    return jax.tree.map(lambda v: lax.pcast(v, (axis,), to="varying"), x)


def _entering_state(summary, initial_state, compose, axis: str, reset=None, reverse: bool = False):
    """(the state entering this shard, the final state after the last processed shard), as trees.

    ``compose(summary_j, state)`` is the state after shard j given the state before it. Every shard
    gathers all n summaries and runs the same n-step exclusive scan (n is the number of devices, so
    this is O(n · state) work and O(n · state) bytes received per shard, independent of T).
    Forwards, a reset anywhere in a shard (its first step included) is already in its summary.
    Backwards (``reverse``), the state leaving shard j enters shard j - 1 unless shard j's first
    step starts a segment, a flag the engine on shard j - 1 cannot see; so those flags ([B] per
    shard) are gathered too."""
    gathered = jax.tree.map(lambda x: lax.all_gather(x, axis), summary)         # [n, B, ...] each
    keeps = None if reset is None or not reverse else lax.all_gather(~reset[:, 0], axis)   # [n, B]

    def through_shard(state, xs):
        summary_j, keep = xs
        out = compose(summary_j, state)
        if keep is not None:
            drop = lambda x: jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
            out = jax.tree.map(drop, out)
        return out, state

    _, entering = lax.scan(through_shard, _varying(initial_state, axis), (gathered, keeps), reverse=reverse)
    # The final state leaves the last processed shard; the flag at its first step (t = 0 backwards)
    # drops nothing, as the engines' last step never resets.
    at = lambda tree, j: jax.tree.map(lambda x: x[j], tree)
    last = 0 if reverse else jax.tree.leaves(gathered)[0].shape[0] - 1
    final = compose(at(gathered, last), at(entering, last))
    return at(entering, lax.axis_index(axis)), final


def _affine(act):
    """compose for a summary (M, S_loc): S_out = act(M, S_in) + S_loc."""
    return lambda summary, state: act(summary[0], state) + summary[1]


def _replicated(x, axis: str):
    """x as held by shard 0, the same on every shard of ``axis`` (a masked psum: exact). Every shard
    computed the same value from the same gathered summaries; this makes it one replicated value."""
    first = lax.axis_index(axis) == 0
    return jax.tree.map(lambda v: lax.psum(jnp.where(first, v, jnp.zeros_like(v)), axis), x)


def _engine_output(engine_apply, args, arrays: dict, static: dict):
    """The engine's own checks and output shapes on the global shapes (nothing is computed). Shapes
    and dtypes only, without the inputs' sharding: on an Explicit mesh the engines' reshapes over a
    sharded time axis would not trace, and the checks need no sharding."""
    def abstract(x):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), dtype)

    args, arrays = jax.tree.map(abstract, (args, arrays))
    return jax.eval_shape(lambda a, k: engine_apply(*a, **k, **static), args, arrays)


def _accumulation_dtype(*xs):
    dtype = jnp.result_type(*[x.dtype for x in xs if x is not None])
    return jnp.promote_types(jnp.float32, dtype)


def _shard_map(fn, mesh, in_specs, out_specs, *args):
    """``fn`` under ``jax.shard_map`` on ``args``. On a mesh with Explicit axes (``jax.make_mesh``'s
    default) shard_map takes inputs only already laid out as ``in_specs`` says, so they are resharded
    first; a mesh of Auto axes lets shard_map do it."""
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        args = tuple(_reshard(x, spec, mesh) for x, spec in zip(args, in_specs, strict=True))
    # check_vma=False: the engines' internal loops start from carries (preallocated output buffers,
    # zero states) that are not marked as varying over the mesh axis, which the type check rejects.
    # The values are what matter, and the tests check them and their gradients against the engines.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _reshard(x, spec, mesh):
    if x is None:
        return None
    return jax.tree.map(lambda v, s: jax.reshard(v, NamedSharding(mesh, s)), x, spec)


# --------------------------------------------------------------------------------------------
# diagonal: h_t = a_t ⊙ h_{t-1} + b_t.


def _diagonal_shard(a, b, initial_state, reset, *, axis, out_dtype, kwargs):
    acc = _accumulation_dtype(a, b, initial_state)
    state_shape = (b.shape[0], *b.shape[2:])
    # Two engine calls on the piece: the input b from a zero state (h_loc), and no input from a state
    # of ones (the cumulative decay A_t; a reset zeroes it from there on). Two calls measured 2x faster
    # on CPU than one call on the two stacked along a new last axis.
    zeros, ones = _varying((jnp.zeros(state_shape, acc), jnp.ones(state_shape, acc)), axis)
    h_loc, s_loc = diagonal_engine.apply(a, b.astype(acc), initial_state=zeros, reset=reset, **kwargs)
    decay, total_decay = diagonal_engine.apply(a, jnp.zeros(b.shape, acc), initial_state=ones, reset=reset,
                                               **kwargs)
    h0 = jnp.zeros(state_shape, acc) if initial_state is None else initial_state.astype(acc)
    h_in, final = _entering_state((total_decay, s_loc), h0, _affine(lambda m, s: m * s), axis, reset,
                                  kwargs.get("reverse", False))
    h = h_loc + decay * h_in[:, None]
    return h.astype(out_dtype), _replicated(final, axis)


def diagonal_apply(a, b, *, mesh, axis: str = "sequence", batch_axis=None, initial_state=None, reset=None,
                   **engine_kwargs):
    """``zoo.ops.diagonal.apply`` with time split over the mesh axis ``axis``: ``(h, final_state)``.

    Same shapes and meaning as the engine (``a`` [B, T, ...], size-1 axes broadcast, or [...]
    time-invariant; ``b`` [B, T, ...]; ``initial_state`` [B, ...]; ``reset`` bool [B, T]); ``h`` is
    sharded like ``b``, ``final_state`` is replicated over ``axis``. ``batch_axis`` (a mesh axis name
    or a tuple of them) also splits the batch. ``engine_kwargs`` (``mode``, ``chunk_size``,
    ``implementation``) go to the engine on each shard. Each shard's summary is its total decay and
    its final state from a zero state, [B, ...] each; outputs are corrected by
    ``h_t += A_t ⊙ h_in`` (module docstring; Blelloch 1990; LASP, Sun et al. 2024)."""
    who = "sequence.diagonal_apply"
    if any(isinstance(x, (tuple, list)) for x in (a, b, initial_state)):
        # (real, imag) pairs (LRU, S5): run the complex form and return pairs, as the engine does.
        as_complex = lambda x: x[0] + 1j * x[1] if isinstance(x, (tuple, list)) else x
        h, final = diagonal_apply(as_complex(a), as_complex(b), mesh=mesh, axis=axis, batch_axis=batch_axis,
                                  initial_state=None if initial_state is None else as_complex(initial_state),
                                  reset=reset, **engine_kwargs)
        return (jnp.real(h), jnp.imag(h)), (jnp.real(final), jnp.imag(final))
    b = jnp.asarray(b)
    a = jnp.asarray(a)
    # The engine's own checks, on the global shapes (nothing is computed).
    out = _engine_output(diagonal_engine.apply, (a, b), dict(initial_state=initial_state, reset=reset),
                         engine_kwargs)
    _check_mesh(who, mesh, axis, batch_axis, "b", b.shape)
    if a.ndim == b.ndim - 2:
        a = a.reshape((1, 1, *a.shape))                     # time-invariant: b's rank, broadcast
    if reset is not None:
        reset = jnp.asarray(reset).astype(bool)
    fn = functools.partial(_diagonal_shard, axis=axis, out_dtype=out[0].dtype, kwargs=engine_kwargs)
    in_specs = (_sequence_spec(a, batch_axis, axis), _sequence_spec(b, batch_axis, axis),
                _state_spec(initial_state, batch_axis), _sequence_spec(reset, batch_axis, axis))
    out_specs = (P(_batch_spec(batch_axis), axis), P(_batch_spec(batch_axis)))
    h, final = _shard_map(fn, mesh, in_specs, out_specs, a, b, initial_state, reset)
    return h, final.astype(out[1].dtype)


# --------------------------------------------------------------------------------------------
# matrix and delta: a [K, V] state per head; the summary's transition M acts on the key axis.


def _identity_columns(batch, heads, dk, dv, dtype):
    """[B, H, K, V + K]: zeros for the state, then the identity that becomes the cumulative M_t."""
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=dtype), (batch, heads, dk, dk))
    return jnp.concatenate([jnp.zeros((batch, heads, dk, dv), dtype), eye], axis=-1)


def _with_zero_columns(v, dk, dtype):
    return jnp.concatenate([v.astype(dtype), jnp.zeros((*v.shape[:-1], dk), dtype)], axis=-1)


def _read_entering(o_aug, dv, s_in):
    """The readout with the entering state: o_loc + (M_tᵀ q_t scale)ᵀ S_in, per step and head."""
    return o_aug[..., :dv] + jnp.einsum("bthj,bhjv->bthv", o_aug[..., dv:], s_in)


def _matrix_shard(q, k, v, log_decay, initial_state, reset, *, axis, normalizer, out_dtype, kwargs):
    batch, _, heads, dk = q.shape
    acc = _accumulation_dtype(q, k, v, log_decay)
    # With a normaliser the key sum n rides along as one more value column of ones (as in the engine).
    values = v if normalizer is None else jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], -1)
    dv = values.shape[-1]
    start = _varying(_identity_columns(batch, heads, dk, dv, acc), axis)
    o_aug, s_aug = matrix_engine.apply(q, k, _with_zero_columns(values, dk, acc), log_decay,
                                       initial_state=start, reset=reset, **kwargs)
    s_loc = s_aug[..., :dv]
    decay = jnp.diagonal(s_aug[..., dv:], axis1=-2, axis2=-1)      # M is diagonal: [B, H, K]
    if initial_state is None:
        s0 = jnp.zeros((batch, heads, dk, dv), acc)
    elif normalizer is None:
        s0 = initial_state.astype(acc)
    else:                                    # an array S or a MatrixState(S, n or None, None)
        stated = isinstance(initial_state, matrix_engine.MatrixState)
        s0, n0 = (initial_state.S, initial_state.n) if stated else (initial_state, None)
        n0 = jnp.zeros((batch, heads, dk), acc) if n0 is None else n0.astype(acc)
        s0 = jnp.concatenate([s0.astype(acc), n0[..., None]], axis=-1)
    s_in, final = _entering_state((decay, s_loc), s0, _affine(lambda m, s: m[..., None] * s), axis, reset,
                                  kwargs.get("reverse", False))
    final = _replicated(final, axis)
    if normalizer is None:
        return _read_entering(o_aug, dv, s_in).astype(out_dtype), final
    # The normalised readout divides by the key sum: not linear in the state, so run the piece again
    # from its true entering state.
    entering = matrix_engine.MatrixState(s_in[..., :-1], s_in[..., -1], None)
    o, _ = matrix_engine.apply(q, k, v, log_decay, initial_state=entering, reset=reset,
                               normalizer=normalizer, **kwargs)
    return o.astype(out_dtype), matrix_engine.MatrixState(final[..., :-1], final[..., -1], None)


# A finite stand-in for log 0 (no decay survives a reset): exp of it is 0, and unlike -inf it never
# meets another infinity in a difference.
LOG_ZERO = -1e30


def _stabiliser_summary(g, i, reset):
    """The max-stabiliser's summary of a piece: m_out = max(G + m_in, L), [B, H] each.

    The stabiliser m_t = max(g_t + m_{t-1}, i_t) is a max-plus recurrence, so it composes like the
    affine ones with (max, +) for (+, ·): G = Σ_t g_t (LOG_ZERO when a reset drops m_in) and
    L = max over steps t after the last reset of i_t + Σ_{s>t} g_s, and, for a reset at r, the fresh
    m = 0 it starts from, carried as 0 + Σ_{s>=r} g_s. g, i [B, T, H]; reset [B, T] or None."""
    total = jnp.sum(g, axis=1)                                     # [B, H]
    after = total[:, None] - jnp.cumsum(g, axis=1)                 # Σ_{s>t} g_s
    if reset is None:
        return total, jnp.max(i + after, axis=1)
    from_t = jnp.flip(jnp.cumsum(jnp.flip(reset.astype(jnp.int32), 1), axis=1), 1) > 0   # a reset in [t, T)
    later = jnp.concatenate([from_t[:, 1:], jnp.zeros_like(from_t[:, :1])], axis=1)      # ... in (t, T)
    valid = ~later[..., None]
    from_inputs = jnp.max(jnp.where(valid, i + after, LOG_ZERO), axis=1)
    from_reset = jnp.max(jnp.where(valid & reset[..., None], g + after, LOG_ZERO), axis=1)
    dropped = jnp.any(reset, axis=1)[:, None]
    return jnp.where(dropped, LOG_ZERO, total), jnp.maximum(from_inputs, from_reset)


def _compose_stabilised(summary, state):
    """State (S̃, m) after a piece, S = exp(m) S̃ the true state, from the state before it."""
    total, most, s_loc, m_loc = summary
    s_in, m_in = state
    m_out = jnp.maximum(total + m_in, most)
    scale_in = jnp.exp(total + m_in - m_out)[..., None, None]
    scale_loc = jnp.exp(m_loc - m_out)[..., None, None]
    return scale_in * s_in + scale_loc * s_loc, m_out


def _gated_matrix_shard(q, k, v, log_decay, log_input_gate, initial_state, reset, *, axis, normalizer,
                        out_dtype, kwargs):
    """The matrix engine with mLSTM's input gate: the state is (S̃, m) with S = exp(m) S̃; the piece
    is run from zeros for its summary, then again from its true entering state."""
    batch, time, heads, dk = q.shape
    acc = _accumulation_dtype(q, k, v, log_decay)
    values = v if normalizer is None else jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], -1)
    dv = values.shape[-1]
    g = jnp.zeros((batch, time, heads), acc) if log_decay is None else log_decay.astype(acc)
    zeros = matrix_engine.MatrixState(jnp.zeros((batch, heads, dk, dv), acc), None,
                                      jnp.zeros((batch, heads), acc))
    _, local = matrix_engine.apply(q, k, values.astype(acc), log_decay, log_input_gate=log_input_gate,
                                   initial_state=_varying(zeros, axis), reset=reset, **kwargs)
    total, most = _stabiliser_summary(g, log_input_gate.astype(acc), reset)
    if isinstance(initial_state, matrix_engine.MatrixState):
        s0, n0, m0 = initial_state
    else:                                    # None or an array S
        s0, n0, m0 = initial_state, None, None
    s0 = jnp.zeros((batch, heads, dk, v.shape[-1]), acc) if s0 is None else s0.astype(acc)
    if normalizer is not None:
        n0 = jnp.zeros((batch, heads, dk), acc) if n0 is None else n0.astype(acc)
        s0 = jnp.concatenate([s0, n0[..., None]], axis=-1)
    m0 = jnp.zeros((batch, heads), acc) if m0 is None else m0.astype(acc)
    (s_in, m_in), (s_fin, m_fin) = _entering_state((total, most, local.S, local.m), (s0, m0),
                                                   _compose_stabilised, axis)
    split = lambda s, m: (matrix_engine.MatrixState(s[..., :-1], s[..., -1], m) if normalizer is not None
                          else matrix_engine.MatrixState(s, None, m))
    o, _ = matrix_engine.apply(q, k, v, log_decay, log_input_gate=log_input_gate, normalizer=normalizer,
                               initial_state=split(s_in, m_in), reset=reset, **kwargs)
    return o.astype(out_dtype), _replicated(split(s_fin, m_fin), axis)


def matrix_apply(q, k, v, log_decay=None, *, mesh, axis: str = "sequence", batch_axis=None,
                 initial_state=None, reset=None, normalizer=None, **engine_kwargs):
    """``zoo.ops.matrix.apply`` with time split over the mesh axis ``axis``: ``(o, final_state)``.

    Same shapes and meaning as the engine (q, k [B, T, H, K]; v [B, T, H, V]; ``log_decay`` None,
    [B, T, H] or [B, T, H, K], possibly complex; ``initial_state`` [B, H, K, V] or a ``MatrixState``
    with a normaliser or input gate; ``reset`` bool [B, T]). ``o`` is sharded like ``v``, the final
    state replicated over ``axis``. ``engine_kwargs`` (``eps``, ``scale``, ``exclusive``,
    ``reverse``, ``mode``, ``chunk_size``, ``implementation``) go to the engine. Each shard's summary
    is its total decay per key dimension [B, H, K] and its final state [B, H, K, V]; without a
    normaliser the outputs are corrected in closed form, with one the piece is run again from its
    true entering state (module docstring; LASP, Sun et al. 2024).

    ``log_input_gate`` [B, T, H] (mLSTM; forwards only): the state is kept scaled by the
    max-stabiliser m, itself a max-plus recurrence; its summary (G, L) composes as
    ``m_out = max(G + m_in, L)`` beside the scaled state, and each piece is run again from its
    true entering (S̃, m)."""
    who = "sequence.matrix_apply"
    gate = engine_kwargs.pop("log_input_gate", None)
    if gate is not None and engine_kwargs.get("reverse", False):
        raise ValueError(f"{who}: log_input_gate with reverse=True is not offered sequence-parallel")
    arrays = dict(initial_state=initial_state, reset=reset, log_input_gate=gate)
    out = _engine_output(matrix_engine.apply, (q, k, v, log_decay), arrays,
                         dict(normalizer=normalizer, **engine_kwargs))
    _check_mesh(who, mesh, axis, batch_axis, "q", q.shape)
    if reset is not None:
        reset = jnp.asarray(reset).astype(bool)
    seq = lambda x: _sequence_spec(x, batch_axis, axis)
    state = (None if initial_state is None
             else jax.tree.map(lambda x: _state_spec(x, batch_axis), initial_state))
    final_spec = jax.tree.map(lambda x: P(_batch_spec(batch_axis)), out[1])
    out_specs = (P(_batch_spec(batch_axis), axis), final_spec)
    if gate is not None:
        fn = functools.partial(_gated_matrix_shard, axis=axis, normalizer=normalizer, out_dtype=out[0].dtype,
                               kwargs=engine_kwargs)
        in_specs = (seq(q), seq(k), seq(v), seq(log_decay), seq(gate), state, seq(reset))
        o, final = _shard_map(fn, mesh, in_specs, out_specs, q, k, v, log_decay, gate, initial_state, reset)
        return o, jax.tree.map(lambda x, s: x.astype(s.dtype), final, out[1])
    fn = functools.partial(_matrix_shard, axis=axis, normalizer=normalizer, out_dtype=out[0].dtype,
                           kwargs=engine_kwargs)
    in_specs = (seq(q), seq(k), seq(v), seq(log_decay), state, seq(reset))
    o, final = _shard_map(fn, mesh, in_specs, out_specs, q, k, v, log_decay, initial_state, reset)
    return o, jax.tree.map(lambda x, s: x.astype(s.dtype), final, out[1])


def _delta_shard(q, k, v, beta, log_decay, initial_state, reset, *, axis, out_dtype, kwargs):
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    acc = _accumulation_dtype(q, k, v, beta, log_decay)
    start = _varying(_identity_columns(batch, heads, dk, dv, acc), axis)
    o_aug, s_aug = delta_engine.apply(q, k, _with_zero_columns(v, dk, acc), beta, log_decay,
                                      initial_state=start, reset=reset, **kwargs)
    s_loc, transition = s_aug[..., :dv], s_aug[..., dv:]           # [B, H, K, V], [B, H, K, K]
    s0 = jnp.zeros((batch, heads, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    s_in, final = _entering_state((transition, s_loc), s0, _affine(lambda m, s: m @ s), axis, reset,
                                  kwargs.get("reverse", False))
    return _read_entering(o_aug, dv, s_in).astype(out_dtype), _replicated(final, axis)


def delta_apply(q, k, v, beta, log_decay=None, *, mesh, axis: str = "sequence", batch_axis=None,
                initial_state=None, reset=None, **engine_kwargs):
    """``zoo.ops.delta.apply`` with time split over the mesh axis ``axis``: ``(o, final_state)``.

    Same shapes and meaning as the engine (q, k [B, T, H, K]; v [B, T, H, V]; beta and
    ``log_decay`` [B, T, H]; ``initial_state`` [B, H, K, V]; ``reset`` bool [B, T]). ``o`` is
    sharded like ``v``, the final state replicated over ``axis``. ``engine_kwargs`` (``scale``,
    ``mode``, ``chunk_size``, ``implementation``) go to the engine. Each shard's summary is its
    affine transition ``S_out = M S_in + S_loc``: M = ∏ α_t (I - β_t k_t k_tᵀ) [B, H, K, K] and S_loc
    [B, H, K, V]; the outputs are corrected in closed form, ``o_t += (M_tᵀ q_t scale)ᵀ S_in`` (module
    docstring; Blelloch 1990; LASP, Sun et al. 2024)."""
    who = "sequence.delta_apply"
    out = _engine_output(delta_engine.apply, (q, k, v, beta, log_decay),
                         dict(initial_state=initial_state, reset=reset), engine_kwargs)
    _check_mesh(who, mesh, axis, batch_axis, "q", q.shape)
    if reset is not None:
        reset = jnp.asarray(reset).astype(bool)
    fn = functools.partial(_delta_shard, axis=axis, out_dtype=out[0].dtype, kwargs=engine_kwargs)
    seq = lambda x: _sequence_spec(x, batch_axis, axis)
    in_specs = (seq(q), seq(k), seq(v), seq(beta), seq(log_decay), _state_spec(initial_state, batch_axis),
                seq(reset))
    out_specs = (P(_batch_spec(batch_axis), axis), P(_batch_spec(batch_axis)))
    o, final = _shard_map(fn, mesh, in_specs, out_specs, q, k, v, beta, log_decay, initial_state, reset)
    return o, final.astype(out[1].dtype)


_APPLY = {"diagonal": diagonal_apply, "matrix": matrix_apply, "delta": delta_apply}


def apply(engine: str, *args, **kwargs):
    """Dispatch to ``{engine}_apply``; ValueError for engines that cannot be split along time."""
    return _APPLY[check_engine(engine)](*args, **kwargs)


@contextlib.contextmanager
def sharded_time(mesh, axis: str = "sequence", batch_axis=None):
    """Within the block, every call of the diagonal, matrix and delta engines' ``apply`` that is
    *traced* here runs sequence-parallel over the mesh axis ``axis`` (``batch_axis`` also splits the
    batch): a whole model, or its training step, with time split across devices and nothing in the
    model changed::

        with zoo.parallel.sharded_time(mesh, "sequence", batch_axis="data"):
            loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)

    It acts when a function is traced, like any trace-time setting: a function jitted and compiled
    before entering the block keeps its compiled form. The nonlinear, selective and other engines
    are not split (they run on the whole sequence), and T must be a multiple of the axis size."""

    def hook(engine, *args, **kwargs):
        # The engines inside the shard_map (and its shape checks) run the plain engine, not the hook.
        with using_sequence_hook(None):
            return _APPLY[engine](*args, mesh=mesh, axis=axis, batch_axis=batch_axis, **kwargs)

    with using_sequence_hook(hook):
        yield


def sequence_parallel(engine_apply, mesh, axis: str = "sequence", batch_axis=None):
    """DESIGN.md's form: a function with the signature of ``engine_apply`` (``zoo.ops.diagonal.apply``,
    ``zoo.ops.matrix.apply`` or ``zoo.ops.delta.apply``, or the engine's name) whose time axis is
    split over the mesh axis ``axis``. ``zoo.ops.nonlinear.apply`` (or "nonlinear") is a ValueError
    saying why a nonlinear cell cannot be split along time."""
    engine = engine_apply if isinstance(engine_apply, str) else _engine_of(engine_apply)
    run = _APPLY[check_engine(engine)]

    def parallel_apply(*args, **kwargs):
        return run(*args, mesh=mesh, axis=axis, batch_axis=batch_axis, **kwargs)

    parallel_apply.__doc__ = f"{engine}.apply with time split over mesh axis {axis!r} ({run.__name__})."
    return parallel_apply


def _engine_of(engine_apply) -> str:
    """The engine name of an engine's ``apply`` (its module, ``zoo.ops.<engine>``)."""
    module = getattr(engine_apply, "__module__", "") or ""
    name = module.rsplit(".", 1)[-1]
    if not module.startswith("zoo.ops.") or getattr(engine_apply, "__name__", "") != "apply":
        raise ValueError(f"sequence_parallel: engine_apply must be an engine's apply (zoo.ops.diagonal.apply,"
                         f" zoo.ops.matrix.apply, zoo.ops.delta.apply) or an engine name, "
                         f"got {engine_apply!r}")
    return name


def summary_bytes(engine: str, batch: int, state_shape, heads: int = 1, dk: int = 0, dv: int = 0,
                  itemsize: int = 4) -> dict[str, int]:
    """Bytes of one shard's summary (transition + local final state) for ``engine``; independent of T.

    diagonal: ``state_shape`` = the feature shape (...); matrix and delta: ``heads``, ``dk``, ``dv``."""
    check_engine(engine)
    if engine == "diagonal":
        state = batch * int(np.prod(state_shape, dtype=np.int64))
        transition = state
    else:
        state = batch * heads * dk * dv
        transition = batch * heads * dk * (dk if engine == "delta" else 1)
    return {"transition": transition * itemsize, "state": state * itemsize,
            "summary": (transition + state) * itemsize}
