"""Causal depthwise 1-D convolution with an explicit state: the short convolution of Mamba, Mamba-2,
Hawk/Griffin and the linear-attention blocks.

Each channel ``c`` has its own ``K`` taps; ``weight[K-1]`` multiplies the current input::

    y[b, t, c] = bias[c] + Σ_{k=0}^{K-1} weight[k, c] · x[b, t-(K-1)+k, c]

This is ``torch.nn.Conv1d(C, C, K, groups=C, padding=K-1)`` cut to the first T outputs, with torch's
weight ``[C, 1, K]`` stored here as ``[K, C]``. Inputs before the start of the sequence come from the
state, the last ``K - 1`` inputs oldest first (zeros for a fresh sequence), so that running a
sequence in two pieces, carrying the state, equals running it whole; that makes the window part of
a model's recurrent state in step mode.

API (shapes: x [B, T, C], weight [K, C], bias [C] or None, state [B, K-1, C] float32)::

    y, final_state = apply(x, weight, bias=None, *, initial_state=None, reset=None, reverse=False)
    state, y_t     = step(weight, bias, state, x_t)          # x_t [B, C]
    y, final_state = reference(x, weight, bias=None, *, initial_state=None, reset=None, reverse=False)

``reset[b, t] = True`` starts a new segment at ``t``: taps that would reach an input before ``t``
(or into the carried state) read zeros instead, exactly as if the segment were run alone from a
fresh state. ``reverse=True`` runs time backwards (the window then looks at later inputs), with
``reset`` keeping its meaning (``zoo/ops/_time.py``). ``y`` has x's dtype; the state is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.ops._time import reset_for_reverse


def _check(x, weight, bias, initial_state, reset):
    if np.ndim(x) != 3:
        raise ValueError(f"conv1d: x must have shape [B, T, C], got shape {np.shape(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"conv1d: x has dtype {x.dtype}; a float dtype is needed")
    batch, time, channels = x.shape
    if np.ndim(weight) != 2 or weight.shape[1] != channels or weight.shape[0] < 1:
        raise ValueError(f"conv1d: weight must have shape [K, C] with K >= 1 and C = {channels} (x has shape "
                         f"{x.shape}), got shape {np.shape(weight)}")
    if bias is not None and np.shape(bias) != (channels,):
        raise ValueError(f"conv1d: bias must have shape [C] = ({channels},), got shape {np.shape(bias)}")
    width = weight.shape[0] - 1
    if initial_state is not None and np.shape(initial_state) != (batch, width, channels):
        raise ValueError(f"conv1d: initial_state must have shape [B, K-1, C] = {(batch, width, channels)}, "
                         f"got shape {np.shape(initial_state)}")
    if reset is not None and np.shape(reset) != (batch, time):
        raise ValueError(f"conv1d: reset must have shape [B, T] = {(batch, time)}, "
                         f"got shape {np.shape(reset)}")


def _segment_starts(reset: jax.Array) -> jax.Array:
    """[B, T] int: index of the latest reset at or before t, or a large negative number if none."""
    time = reset.shape[1]
    marks = jnp.where(reset, jnp.arange(time), -time - 1)
    return jax.lax.cummax(marks, axis=1)


def _forward(x, weight, bias, state, reset):
    taps = weight.shape[0]
    time = x.shape[1]
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)          # [B, T+K-1, C]
    weight = weight.astype(x.dtype)
    if reset is not None:
        starts = _segment_starts(reset)                                   # [B, T]
    y = jnp.zeros_like(x)
    for k in range(taps):
        window = padded[:, k:k + time]
        if reset is not None:
            # Tap k of output t reads input t-(K-1)+k: keep it only if no segment starts after it.
            position = jnp.arange(time) - (taps - 1) + k
            window = jnp.where((position >= starts)[..., None], window, 0)
        y = y + weight[k] * window
    if bias is not None:
        y = y + bias.astype(x.dtype)
    final = padded[:, time:].astype(jnp.float32)                          # the last K-1 inputs
    if reset is not None and taps > 1:
        position = time - (taps - 1) + jnp.arange(taps - 1)
        final = jnp.where((position >= starts[:, -1:])[..., None], final, 0.0)
    return y, final


def apply(x, weight, bias=None, *, initial_state=None, reset=None, reverse: bool = False):
    """``(y, final_state)``: the causal depthwise convolution of x [B, T, C] (see the module docstring)."""
    _check(x, weight, bias, initial_state, reset)
    batch, _, channels = x.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch, weight.shape[0] - 1, channels), jnp.float32)
    reset = None if reset is None else jnp.asarray(reset, bool)
    if not reverse:
        return _forward(x, weight, bias, initial_state, reset)
    y, final = _forward(jnp.flip(x, axis=1), weight, bias, initial_state, reset_for_reverse(reset))
    return jnp.flip(y, axis=1), final


def step(weight, bias, state, x_t):
    """One step: ``(new_state, y_t)`` for x_t [B, C] and state [B, K-1, C]."""
    window = jnp.concatenate([state.astype(x_t.dtype), x_t[:, None]], axis=1)   # [B, K, C]
    y_t = jnp.einsum("bkc,kc->bc", window, weight.astype(x_t.dtype))
    if bias is not None:
        y_t = y_t + bias.astype(x_t.dtype)
    return window[:, 1:].astype(jnp.float32), y_t


def reference(x, weight, bias=None, *, initial_state=None, reset=None, reverse: bool = False):
    """A Python loop of ``step``, a reset replacing the state by zeros: the definition ``apply`` meets."""
    _check(x, weight, bias, initial_state, reset)
    batch, time, channels = x.shape
    fresh = jnp.zeros((batch, weight.shape[0] - 1, channels), jnp.float32)
    state = fresh if initial_state is None else jnp.asarray(initial_state, jnp.float32)
    order = range(time - 1, -1, -1) if reverse else range(time)
    outputs = [None] * time
    for t in order:
        if reset is not None:
            # Forwards a flag at t starts a segment at t; backwards the carry into t is dropped when
            # t + 1 starts one.
            flag = reset[:, t + 1] if reverse and t + 1 < time else (None if reverse else reset[:, t])
            if flag is not None:
                state = jnp.where(jnp.asarray(flag)[:, None, None], fresh, state)
        state, outputs[t] = step(weight, bias, state, x[:, t])
    return jnp.stack(outputs, axis=1), state
