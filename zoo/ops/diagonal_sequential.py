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


def _at(x, t, time_varying: bool = True):
    """Slice t of axis 1 (or the only slice of a time-invariant array)."""
    if not time_varying:
        return fmap(lambda v: v[:, 0], x)
    return fmap(lambda v: lax.dynamic_index_in_dim(v, t, axis=1, keepdims=False), x)


def _put(buf, value, t):
    return fmap(lambda o, v: lax.dynamic_update_index_in_dim(o, v, t, axis=1), buf, value)


def _sum_to(x, shape):
    """Sum x over the axes where ``shape`` has size 1 (undoing a broadcast)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _order(time: int, i, backwards: bool):
    return time - 1 - i if backwards else i


def loop_over_time(step, h0, xs, reverse: bool, invariant=None):
    """Fold ``h_t = step(h_{t-1}, x_t)`` over axis 1 of the batch-major pytree ``xs``.

    Returns ``(h [B, T, ...], h_last)``: every state is written into a preallocated output at its own
    time index, so nothing is transposed. ``invariant`` (a pytree like ``xs`` of bools, or None)
    marks leaves with a size-1 time axis that every step reads whole.
    """
    leaves = jax.tree.leaves(xs)
    time = max(v.shape[1] for v in leaves)
    flags = jax.tree.leaves(invariant) if invariant is not None else [False] * len(leaves)
    treedef = jax.tree.structure(xs)

    def body(i, carry):
        h, out = carry
        t = _order(time, i, reverse)
        x_t = [v[:, 0] if fixed else lax.dynamic_index_in_dim(v, t, axis=1, keepdims=False)
               for v, fixed in zip(leaves, flags, strict=True)]
        h = step(h, jax.tree.unflatten(treedef, x_t))
        return h, _put(out, h, t)

    out = fmap(lambda v: jnp.empty((v.shape[0], time, *v.shape[1:]), v.dtype), h0)
    final, out = lax.fori_loop(0, time, body, (h0, out))
    return out, final


def _forward(a, b, h0, drop, reverse: bool):
    def step(h, x_t):
        a_t, b_t, d_t = x_t
        if d_t is not None:
            h = zero_where(d_t, h)
        return fmap(jnp.add, mul(a_t, h), b_t)

    invariant = (fmap(lambda v: v.shape[1] == 1, a), fmap(lambda v: False, b),
                 None if drop is None else False)
    return loop_over_time(step, h0, (a, b, drop), reverse, invariant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan(a, b, h0, drop, reverse):
    return _forward(a, b, h0, drop, reverse)


def _scan_fwd(a, b, h0, drop, reverse):
    out, final = _forward(a, b, h0, drop, reverse)
    return (out, final), (a, out, h0, drop)


def _scan_bwd(reverse, residuals, cotangents):
    a, h, h0, drop = residuals
    dh, d_final = cotangents
    time = real_part(h).shape[1]
    varying = real_part(a).shape[1] != 1

    # The loop computes only g (which is db); writing a second [B, T, ...] output from the same
    # loop measured about as slow as a second loop, so da is one fused element-wise pass after it.
    def body(i, carry):
        c, g_buf = carry
        t = _order(time, i, not reverse)             # the opposite order to the forward pass
        g = fmap(jnp.add, _at(dh, t), c)
        c = mul(conj(_at(a, t, varying)), g)
        if drop is not None:
            c = zero_where(lax.dynamic_index_in_dim(drop, t, axis=1, keepdims=False), c)
        return c, _put(g_buf, g, t)

    d_h0, g = lax.fori_loop(0, time, body, (d_final, fmap(jnp.empty_like, h)))

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
