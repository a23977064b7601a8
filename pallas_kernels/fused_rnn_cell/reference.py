"""Plain jnp reference for fused_rnn_cell: a ``lax.scan`` over time in float32 with the cells written
out directly (no gate splitting, no padding), differentiated by JAX. Same arguments as
``fused_rnn_cell`` (no platform options)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _lstm(pre, state, peep):
    h, c = state
    a_i, a_f, a_z, a_o = jnp.split(pre, 4, axis=-1)
    i = jax.nn.sigmoid(a_i + peep[0] * c)
    f = jax.nn.sigmoid(a_f + peep[1] * c)
    c = f * c + i * jnp.tanh(a_z)
    h = jnp.tanh(c) * jax.nn.sigmoid(a_o + peep[2] * c)
    return (h, c)


def _slstm(pre, state, forget_gate):
    _, c, n, m = state
    a_i, a_f, a_z, a_o = (pre[..., k, :] for k in range(4))
    log_f = jax.nn.log_sigmoid(a_f) if forget_gate == "sigmoid" else a_f
    m_new = jnp.where(n == 0, a_i, jnp.maximum(log_f + m, a_i))
    i = jnp.exp(a_i - m_new)
    f = jnp.exp(log_f + m - m_new)
    c = f * c + i * jnp.tanh(a_z)
    n = f * n + i
    return (jax.nn.sigmoid(a_o) * c / n, c, n, m_new)


def fused_rnn_cell_reference(cell, x_pre, w_rec, initial_state, *, reset=None, peepholes=None, b_rec=None,
                             forget_gate="sigmoid"):
    x = x_pre.astype(F32)
    w = w_rec.astype(F32)
    d = x.shape[-1] if cell == "slstm" else x.shape[-1] // (4 if cell == "lstm" else 3)
    if cell == "lstm":
        state = (initial_state["h"], initial_state["c"])
    elif cell.startswith("gru"):
        state = (initial_state,)
    else:
        state = tuple(initial_state)
    state = tuple(s.astype(F32) for s in state)
    peep = jnp.zeros((3, d), F32) if peepholes is None else peepholes.astype(F32)
    b = jnp.zeros((3 * d,), F32) if b_rec is None else b_rec.astype(F32)
    keep = jnp.ones(x.shape[:2], bool) if reset is None else ~reset

    def step(state, inputs):
        x_t, keep_t = inputs
        state = tuple(jnp.where(keep_t[:, None], s, 0.0) for s in state)
        h = state[0]
        if cell == "lstm":
            new = _lstm(x_t + h @ w, state, peep)
        elif cell == "gru":
            r = jax.nn.sigmoid(x_t[:, :d] + h @ w[:, :d])
            z = jax.nn.sigmoid(x_t[:, d:2 * d] + h @ w[:, d:2 * d])
            n = jnp.tanh(x_t[:, 2 * d:] + (r * h) @ w[:, 2 * d:])
            new = ((1 - z) * n + z * h,)
        elif cell == "gru_reset_after":
            hw = h @ w + b
            r = jax.nn.sigmoid(x_t[:, :d] + hw[:, :d])
            z = jax.nn.sigmoid(x_t[:, d:2 * d] + hw[:, d:2 * d])
            n = jnp.tanh(x_t[:, 2 * d:] + r * hw[:, 2 * d:])
            new = ((1 - z) * n + z * h,)
        else:
            heads, dh = w.shape[0], w.shape[1]
            mixed = jnp.einsum("bka,kagc->bgkc", h.reshape(-1, heads, dh), w).reshape(-1, 4, d)
            new = _slstm(x_t + mixed, state, forget_gate)
        return new, new[0]

    final, hs = lax.scan(step, state, (jnp.swapaxes(x, 0, 1), jnp.swapaxes(keep, 0, 1)))
    hs = jnp.swapaxes(hs, 0, 1).astype(x_pre.dtype)
    if cell == "lstm":
        return hs, {"h": final[0], "c": final[1]}
    return hs, (final[0] if cell.startswith("gru") else final)
