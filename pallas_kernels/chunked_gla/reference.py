"""Plain jnp reference for chunked_gla (scalar decay per head): a scan over time, float32 state.

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ q_t · scale
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def chunked_gla_reference(q, k, v, g, initial_state=None, *, scale=None):
    """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H]; returns (o [B, T, H, V] in v's dtype,
    S [B, H, K, V])."""
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    acc = jnp.promote_types(jnp.float32, q.dtype)
    state = jnp.zeros((batch, heads, dk, dv), acc) if initial_state is None else initial_state.astype(acc)

    def step(state, xs):
        q_t, k_t, v_t, g_t = (x.astype(acc) for x in xs)
        state = jnp.exp(g_t)[..., None, None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t * scale, state)

    state, o = lax.scan(step, state, [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)])
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), state
