"""The nonlinear engine: any cell ``h_t, y_t = f(params, h_{t-1}, x_t)`` run over time.

The state enters a nonlinearity, so the only exact parallel form is an iterative solve (a later
``mode="newton"``); ``mode="sequential"`` is ``lax.scan`` over time-major inputs.

Shapes: ``xs`` is a pytree whose leaves are [B, T, ...]; the cell sees [B, ...] slices and the
state ``h`` is a pytree of float32 arrays with leading axis B. ``reset[b, t] = True`` replaces the
state before step ``t`` by ``reset_state`` (zeros unless given), in every mode and direction.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from zoo.ops._time import reset_for_reverse

Cell = Callable[[Any, Any, Any], tuple[Any, Any]]

MODES = ("sequential",)


def _select_state(flag_b, fresh, h):
    """Per-sequence choice between the fresh state and the carried one (flag_b: bool [B])."""
    def pick(f, c):
        mask = flag_b.reshape(flag_b.shape + (1,) * (c.ndim - 1))
        return jnp.where(mask, f.astype(c.dtype), c)

    return jax.tree.map(pick, fresh, h)


def _to_float32(h):
    return jax.tree.map(lambda x: x.astype(jnp.float32), h)


def step(cell: Cell, params, h, x_t):
    """One time step; the state stays float32."""
    h_new, y_t = cell(params, h, x_t)
    return _to_float32(h_new), y_t


def apply(cell: Cell, params, xs, *, initial_state, reset=None, reverse: bool = False,
          mode: str = "auto", unroll: int = 1, reset_state=None):
    """Run ``cell`` over the time axis (axis 1) of ``xs``. Returns ``(ys [B, T, ...], final_state)``."""
    if mode not in ("auto", *MODES):
        raise ValueError(f"nonlinear.apply: mode={mode!r}; choose one of {('auto', *MODES)}")
    h0 = _to_float32(initial_state)
    fresh = jax.tree.map(jnp.zeros_like, h0) if reset_state is None else _to_float32(reset_state)
    xs_tm = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs)      # [T, B, ...]
    if reverse:
        xs_tm = jax.tree.map(lambda x: jnp.flip(x, 0), xs_tm)
        reset = reset_for_reverse(reset)
    reset_tm = None if reset is None else jnp.swapaxes(reset, 0, 1)  # [T, B]

    def body(h, inputs):
        x_t, r_t = inputs
        if r_t is not None:
            h = _select_state(r_t, fresh, h)
        return step(cell, params, h, x_t)

    final, ys_tm = lax.scan(body, h0, (xs_tm, reset_tm), unroll=unroll)
    if reverse:
        ys_tm = jax.tree.map(lambda y: jnp.flip(y, 0), ys_tm)
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), ys_tm), final


def reference(cell: Cell, params, xs, *, initial_state, reset=None, reverse: bool = False,
              reset_state=None):
    """A plain Python loop over time: the independent check for every mode."""
    h = _to_float32(initial_state)
    fresh = jax.tree.map(jnp.zeros_like, h) if reset_state is None else _to_float32(reset_state)
    time = jax.tree.leaves(xs)[0].shape[1]
    order = range(time - 1, -1, -1) if reverse else range(time)
    outputs = [None] * time
    for t in order:
        if reset is not None:
            # Forward: a segment starts at t. Backward: the carry from t + 1 ends its segment.
            flag = reset[:, t + 1] if reverse else reset[:, t]
            if not (reverse and t == time - 1):
                h = _select_state(flag, fresh, h)
        h, outputs[t] = step(cell, params, h, jax.tree.map(lambda x: x[:, t], xs))
    ys = jax.tree.map(lambda *ys_t: jnp.stack(ys_t, axis=1), *outputs)
    return ys, h
