"""Plain jnp reference for diagonal_scan: a ``lax.scan`` over time with a float32 state.

    h_t = a_t ⊙ h_{t-1} + b_t,   reset[:, t]: the state is dropped before step t
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def diagonal_scan_reference(a, b, initial_state=None, *, reset=None, reverse: bool = False):
    """a (b's rank, size-1 axes broadcast), b [B, T, ...]; returns (h in b's dtype, final state)."""
    acc = jnp.promote_types(jnp.float32, b.dtype)
    a = jnp.broadcast_to(a, b.shape).astype(acc)
    state_shape = (b.shape[0], *b.shape[2:])
    h = jnp.zeros(state_shape, acc) if initial_state is None else initial_state.astype(acc)
    if reset is None:
        drop = jnp.zeros(b.shape[:2], bool)
    elif reverse:     # running backwards, the carry from t + 1 is dropped when t + 1 starts a segment
        drop = jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1)
    else:
        drop = reset
    expand = (slice(None),) + (None,) * (b.ndim - 2)

    def step(h, xs):
        a_t, b_t, drop_t = xs
        h = a_t * jnp.where(drop_t[expand], jnp.zeros((), acc), h) + b_t.astype(acc)
        return h, h

    xs = [jnp.moveaxis(x, 1, 0) for x in (a, b, drop)]
    h, hs = lax.scan(step, h, xs, reverse=reverse)
    return jnp.moveaxis(hs, 0, 1).astype(b.dtype), h
