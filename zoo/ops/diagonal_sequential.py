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
import numpy as np
from jax import lax

from zoo.ops.diagonal_pairs import conj, fmap, mul, real_part, shift_from_previous, zero_where


def _sum_to(x, shape):
    """Sum x over the axes where ``shape`` has size 1 (undoing a broadcast)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _steps_per_iteration(time: int) -> int:
    # On XLA CPU each loop iteration has a fixed cost of about 2.5 us; taking 2-4 steps per iteration
    # measured ~35% faster when the arrays fit in cache (B=8, T=1024, D=256), with no copies because
    # [B, T, ...] -> [B, T/k, k·S] is a free reshape. More steps per iteration gained nothing more.
    for k in (4, 2):
        if time % k == 0:
            return k
    return 1


def loop_over_time(step, carry, xs, reverse: bool, invariant=None):
    """``lax.scan`` over axis 1 of batch-major arrays, without moving time to the front.

    ``step(carry, x_t) -> (carry, y_t)``; ``xs`` is a pytree of [B, T, ...] arrays (``invariant``, a
    matching pytree of bools or None, marks leaves with a size-1 time axis that every step reads
    whole). Returns ``(final_carry, ys)`` with ys [B, T, ...] written in place into a preallocated
    buffer. ``reverse=True`` runs t = T-1, ..., 0.
    """
    leaves, treedef = jax.tree.flatten(xs)
    fixed = jax.tree.leaves(invariant) if invariant is not None else [False] * len(leaves)
    time = max(v.shape[1] for v, f in zip(leaves, fixed, strict=True) if not f)
    k = _steps_per_iteration(time)
    rows = [v if f else v.reshape(v.shape[0], time // k, -1) for v, f in zip(leaves, fixed, strict=True)]

    def sub_step(row_t, v, f, j):
        if f:
            return v[:, 0]
        size = row_t.shape[-1] // k
        return row_t[:, j * size:(j + 1) * size].reshape(v.shape[:1] + v.shape[2:])

    x_0 = [sub_step(r[:, 0], v, f, 0) for r, v, f in zip(rows, leaves, fixed, strict=True)]
    y_struct = jax.eval_shape(lambda c, x: step(c, x)[1], carry, jax.tree.unflatten(treedef, x_0))

    def body(i, state):
        c, out = state
        r = time // k - 1 - i if reverse else i
        row_t = [v if f else lax.dynamic_index_in_dim(v, r, axis=1, keepdims=False)
                 for v, f in zip(rows, fixed, strict=True)]
        ys = [None] * k
        for j in (range(k - 1, -1, -1) if reverse else range(k)):
            x_t = [sub_step(rt, v, f, j) for rt, v, f in zip(row_t, leaves, fixed, strict=True)]
            c, ys[j] = step(c, jax.tree.unflatten(treedef, x_t))
        flat = lambda *y: jnp.concatenate([v.reshape(v.shape[0], -1) for v in y], axis=-1)
        out = fmap(lambda o, y: lax.dynamic_update_index_in_dim(o, y, r, axis=1), out, fmap(flat, *ys))
        return c, out

    out = fmap(lambda y: jnp.empty((y.shape[0], time // k, k * int(np.prod(y.shape[1:]))), y.dtype), y_struct)
    final, out = lax.fori_loop(0, time // k, body, (carry, out))
    return final, fmap(lambda o, y: o.reshape(y.shape[0], time, *y.shape[1:]), out, y_struct)


def _forward(a, b, h0, drop, reverse: bool):
    def step(h, x_t):
        a_t, b_t, d_t = x_t
        if d_t is not None:
            h = zero_where(d_t, h)
        h = fmap(jnp.add, mul(a_t, h), b_t)
        return h, h

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
        a_t, dh_t, d_t = x_t
        g = fmap(jnp.add, dh_t, c)
        c = mul(conj(a_t), g)
        if d_t is not None:
            c = zero_where(d_t, c)
        return c, g

    invariant = (fmap(lambda v: not varying, a), fmap(lambda v: False, dh), None if drop is None else False)
    d_h0, g = loop_over_time(step, d_final, (a, dh, drop), not reverse, invariant)

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
