"""Plain jnp reference for the selective_scan kernel (real A): a scan over time, float32 state.

    Δ_t = softplus(delta_t + delta_bias),  h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,
    out_t = (C_t · h_t + D u_t) · silu(z_t)

(A. Gu, T. Dao, "Mamba", 2023, Algorithm 2.) Independent of the kernels' layouts and of zoo.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                             initial_state=None, reset=None):
    """Shapes as ``selective_scan``; returns (out [B, D, L] in u's dtype, final_state [B, D, N])."""
    acc = jnp.promote_types(jnp.float32, u.dtype)
    batch, d, time = u.shape
    n = A.shape[1]
    B = B[:, None] if B.ndim == 3 else B
    C = C[:, None] if C.ndim == 3 else C
    per_channel = lambda m: jnp.repeat(m.astype(acc), d // m.shape[1], axis=1)    # [B, D, N, L]
    b_d, c_d = per_channel(B), per_channel(C)
    dt = delta.astype(acc) + (0.0 if delta_bias is None else delta_bias.astype(acc)[:, None])
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    h = jnp.zeros((batch, d, n), acc) if initial_state is None else initial_state.astype(acc)
    keep = jnp.ones((batch, time), acc) if reset is None else 1.0 - reset.astype(acc)

    def step(h, xs):
        u_t, dt_t, b_t, c_t, keep_t = xs
        h = jnp.exp(dt_t[..., None] * A.astype(acc)) * (keep_t[:, None, None] * h) \
            + (dt_t * u_t)[..., None] * b_t
        return h, jnp.sum(h * c_t, axis=-1)

    time_first = lambda x, axis: jnp.moveaxis(x, axis, 0)
    h, y = lax.scan(step, h, (time_first(u.astype(acc), 2), time_first(dt, 2), time_first(b_d, 3),
                              time_first(c_d, 3), time_first(keep, 1)))
    y = jnp.moveaxis(y, 0, 2)
    if D is not None:
        y = y + D.astype(acc)[:, None] * u.astype(acc)
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return y.astype(u.dtype), h
