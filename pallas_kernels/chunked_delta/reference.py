"""Plain jnp reference for chunked_delta: a scan over time, float32 state (no chunks, no inverse).

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t · scale
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def chunked_delta_reference(q, k, v, beta, log_decay=None, initial_state=None, *, scale=None):
    """q, k [B, T, H, K], v [B, T, H, V], beta and log_decay [B, T, H] (log_decay None: 0); returns
    (o [B, T, H, V] in v's dtype, S [B, H, K, V])."""
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    acc = jnp.promote_types(jnp.float32, q.dtype)
    state = jnp.zeros((batch, heads, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    g = jnp.zeros(beta.shape, acc) if log_decay is None else log_decay

    def step(state, xs):
        q_t, k_t, v_t, beta_t, g_t = (x.astype(acc) for x in xs)
        state = jnp.exp(g_t)[..., None, None] * state
        error = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, state)       # the decayed memory's miss on k_t
        state = state + k_t[..., :, None] * (beta_t[..., None] * error)[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t * scale, state)

    state, o = lax.scan(step, state, [jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g)])
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), state
