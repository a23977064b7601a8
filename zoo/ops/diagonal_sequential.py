"""The sequential mode of ``zoo.ops.diagonal``: one pass over time that reads [B, T, ...] in place.

On XLA CPU, moving time to the front (the layout ``lax.scan`` needs) costs more than the scan
itself (ENV-NOTES §3, §10). This loop instead indexes axis 1 of the batch-major arrays and writes
each step into a preallocated output, so the data is read once and written once; measured, it runs
at the speed of a plain element-wise pass over the same arrays.

The gradient is a ``custom_vjp``: the backward pass is the same recurrence run the other way on the
cotangents. With ``a'_t = a_t`` (0 where the carried state is dropped) and ``prev``/``next`` the
neighbours in processing order::

    g_t  = dh_t + conj(a'_next(t)) ⊙ g_next(t)      (g_last = dh_last + d final_state)
    db_t = g_t,   d h0 = conj(a'_first) ⊙ g_first,   da_t = [not dropped_t] · g_t ⊙ conj(h_prev(t))

(``conj`` matters only for (real, imag) pairs.) The residuals are the output ``h`` itself, so
nothing per step is stored beyond what the forward pass returns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from zoo.ops.diagonal_pairs import conj, fmap, mul, real_part, shift_from_previous, zero_where


def _sum_to(x, shape):
    """Sum x over the axes where ``shape`` has size 1 (undoing a broadcast)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def loop_over_time(step, initial, xs, reverse: bool, invariant=None, carried=None):
    """A pass over axis 1 of batch-major arrays, without moving time to the front.

    ``step(c, x_t) -> y_t`` computes step t's output from the state ``c`` carried into it;
    ``carried(y_t, x_t) -> c`` is the state step t hands to the next one (default: ``y_t`` itself).
    ``xs`` is a pytree of [B, T, ...] arrays (``invariant``, a matching pytree of bools or None,
    marks leaves with a size-1 time axis that every step reads whole); ``initial`` is the state
    carried into the first step. Returns ``(the state after the last step, ys [B, T, ...])``;
    ``reverse=True`` runs t = T-1, ..., 0.

    For a single real output the loop's only carry is the output buffer: step t reads its state
    back from the row that step t - 1 wrote (and from ``xs`` at t - 1 when ``carried`` needs it).
    On XLA CPU a carried state is written by one kernel and copied into the output by another;
    reading the row back lets the step's arithmetic fuse into the in-place row update, one kernel
    per step. Measured (experiments/bench/diagonal.py, B=8, T=4096, D=256) about 10% faster forward
    than carrying the state, and faster than taking several steps per iteration, which gained
    nothing more with jax 0.10. At D=16 the backward pass took half the time.
    """
    leaves, treedef = jax.tree.flatten(xs)
    fixed = jax.tree.leaves(invariant) if invariant is not None else [False] * len(leaves)
    time = max(v.shape[1] for v, f in zip(leaves, fixed, strict=True) if not f)
    carried = carried if carried is not None else (lambda y, x: y)

    def x_at(t):
        row = [v[:, 0] if f else lax.dynamic_index_in_dim(v, t, axis=1, keepdims=False)
               for v, f in zip(leaves, fixed, strict=True)]
        return jax.tree.unflatten(treedef, row)

    def y_at(out, t):
        return fmap(lambda o: lax.dynamic_index_in_dim(o, t, axis=1, keepdims=False), out)

    def index(i):
        return time - 1 - i if reverse else i

    y_struct = jax.eval_shape(step, initial, x_at(0))
    out = fmap(lambda y: jnp.empty((y.shape[0], time, *y.shape[1:]), y.dtype), y_struct)

    def write(out, y, t):
        return fmap(lambda o, v: lax.dynamic_update_index_in_dim(o, v, t, axis=1), out, y)

    if len(jax.tree.leaves(y_struct)) > 1:
        # A (real, imag) pair is two buffers, and each step's parts read both of the previous row's:
        # read back, XLA copies a whole buffer per step to keep the in-place updates apart. Carry the
        # state instead.
        def carrying_body(i, state):
            c, out = state
            t = index(i)
            x_t = x_at(t)
            y = step(c, x_t)
            return carried(y, x_t), write(out, y, t)

        return lax.fori_loop(0, time, carrying_body, (initial, out))

    def body(i, out):
        t, before = index(i), index(jnp.maximum(i - 1, 0))
        from_before = carried(y_at(out, before), x_at(before))
        c = jnp.where(i == 0, initial.astype(from_before.dtype), from_before)
        return write(out, step(c, x_at(t)), t)

    out = lax.fori_loop(0, time, body, out)
    last = index(time - 1)
    return carried(y_at(out, last), x_at(last)), out


def _forward(a, b, h0, drop, reverse: bool):
    def step(h, x_t):
        a_t, b_t, d_t = x_t
        if d_t is not None:
            h = zero_where(d_t, h)
        return fmap(jnp.add, mul(a_t, h), b_t)

    invariant = (fmap(lambda v: v.shape[1] == 1, a), fmap(lambda v: False, b),
                 None if drop is None else False)
    final, out = loop_over_time(step, h0, (a, b, drop), reverse, invariant)
    return out, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan(a, b, h0, drop, reverse):
    return _forward(a, b, h0, drop, reverse)


def _scan_fwd(a, b, h0, drop, reverse):
    out, final = _forward(a, b, h0, drop, reverse)
    return (out, final), (a, out, h0, drop)


def _scan_bwd(reverse, residuals, cotangents):
    a, h, h0, drop = residuals
    dh, d_final = cotangents
    varying = real_part(a).shape[1] != 1

    # The loop computes only g (which is db); writing a second [B, T, ...] output from the same
    # loop measured about as slow as a second loop, so da is one fused element-wise pass after it.
    def step(c, x_t):
        return fmap(jnp.add, x_t[1], c)

    def carried(g, x_t):
        a_t, _, d_t = x_t
        c = mul(conj(a_t), g)
        return c if d_t is None else zero_where(d_t, c)

    invariant = (fmap(lambda v: not varying, a), fmap(lambda v: False, dh), None if drop is None else False)
    d_h0, g = loop_over_time(step, d_final, (a, dh, drop), not reverse, invariant, carried)

    da = mul(g, conj(shift_from_previous(h, h0, reverse)))
    if drop is not None:
        da = zero_where(drop, da)
    da = fmap(lambda v, ref: _sum_to(v, ref.shape), da, a)
    return da, g, d_h0, None


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan_batch_major(a, b, h0, drop, reverse: bool):
    """``(h, final_state)`` for the engine's normalised inputs.

    ``a``, ``b``, ``h0`` are real arrays or (real, imag) pairs in the accumulation dtype; ``a`` has
    b's rank with size-1 axes where it broadcasts; ``drop`` is bool [B, T] (or None) marking the steps
    that must not see the carried state, already in the direction of processing.
    """
    return _scan(a, b, h0, drop, bool(reverse))
