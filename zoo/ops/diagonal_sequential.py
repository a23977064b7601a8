"""The sequential mode of ``zoo.ops.diagonal``: one pass over time.

``scan_batch_major(a, b, h0, drop, reverse)`` takes the engine's normalised inputs (real arrays or
(real, imag) pairs; ``a`` has b's rank with size-1 axes where it broadcasts; ``drop`` bool [B, T]
marks the steps that must not see the carried state, already in the direction of processing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _mul(x, y):
    if isinstance(x, tuple):
        (xr, xi), (yr, yi) = x, y
        return (xr * yr - xi * yi, xr * yi + xi * yr)
    return x * y


def _map(fn, *xs):
    return jax.tree.map(fn, *xs)


def scan_batch_major(a, b, h0, drop, reverse: bool):
    tm = lambda v: jnp.swapaxes(v, 0, 1)
    time = (b[0] if isinstance(b, tuple) else b).shape[1]
    shape = (b[0] if isinstance(b, tuple) else b).shape
    a_full = _map(lambda v: jnp.broadcast_to(v, shape), a)

    def body(h, inputs):
        a_t, b_t, d_t = inputs
        if d_t is not None:
            h = _map(lambda v: jnp.where(d_t.reshape(d_t.shape + (1,) * (v.ndim - 1)), 0.0, v), h)
        h = _map(jnp.add, _mul(a_t, h), b_t)
        return h, h

    del time
    final, h = lax.scan(body, h0, (_map(tm, a_full), _map(tm, b), None if drop is None else tm(drop)),
                        reverse=reverse)
    return _map(tm, h), final
