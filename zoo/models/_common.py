"""Small pieces shared by the model files: initialisers and compute-dtype casting."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.contract import Recurrence, make_recurrence
from zoo.ops import nonlinear


def dense_init(key: jax.Array, d_in: int, d_out: int) -> jax.Array:
    """LeCun-normal [d_in, d_out]: unit-variance pre-activations for unit-variance inputs."""
    return jax.random.normal(key, (d_in, d_out), jnp.float32) / jnp.sqrt(d_in)


def orthogonal_init(key: jax.Array, d: int, n_blocks: int = 1) -> jax.Array:
    """[d, n_blocks * d] of orthogonal blocks, the usual recurrent-matrix start."""
    blocks = [jax.nn.initializers.orthogonal()(k, (d, d), jnp.float32)
              for k in jax.random.split(key, n_blocks)]
    return jnp.concatenate(blocks, axis=1)


def cast(params, dtype):
    """Params in the compute dtype (the dtype of the inputs); states stay float32 elsewhere."""
    return jax.tree.map(lambda p: p.astype(dtype), params)


def cell_recurrence(name: str, cell, *, init, initial_state, input_width, default_d_in: int,
                    fused=None, project=None, structure=None) -> Recurrence:
    """The Recurrence of a cell run by the nonlinear engine (elman, lstm, gru, ...). ``fused`` (from
    ``zoo/models/_fused.py``) may take ``apply`` to the fused Pallas cell kernel instead.
    ``project(params, x)``, when given, maps the inputs before the cell sees them (the input product
    of a cell with a diagonal recurrence, done once over all steps); ``structure`` is the layout of
    the cell's Jacobian for ``mode="newton"`` (``zoo/ops/newton.py``; None: one dense block)."""

    def step(params, h, x_t):
        return nonlinear.step(cell, params, h, x_t if project is None else project(params, x_t))

    def apply(params, xs, h, reset, mode, reverse):
        if fused is not None:
            result = fused(params, xs, h, reset, mode, reverse)
            if result is not None:
                return result
        if project is not None:
            xs = project(params, xs)
        return nonlinear.apply(cell, params, xs, initial_state=h, reset=reset, reverse=reverse, mode=mode,
                               structure=structure)

    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=input_width, modes=nonlinear.MODES, default_d_in=default_d_in)


RECURRENCES = ("dense", "diagonal")


def check_recurrence(model: str, recurrence: str) -> None:
    """Config check for the cells that offer ParaRNN's diagonal recurrent weights."""
    if recurrence not in RECURRENCES:
        raise ValueError(f"{model}: recurrence={recurrence!r}; choose one of {RECURRENCES}")


def diagonal_recurrent_init(key: jax.Array, d: int, n_blocks: int = 1) -> jax.Array:
    """[n_blocks * d] recurrent weights of a diagonal recurrence, uniform in (-1, 1): |u| < 1, as the
    rows of an orthogonal matrix have unit norm."""
    return jax.random.uniform(key, (n_blocks * d,), jnp.float32, -1.0, 1.0)


def input_projection(params, x):
    """``x @ w_in + bias``: the input part of a cell's pre-activation, over any leading axes."""
    dt = x.dtype
    return x @ params["w_in"].astype(dt) + params["bias"].astype(dt)


def check_chunk_size(model: str, chunk_size) -> None:
    """Config check for models with a chunked mode: a positive int (T need not be a multiple)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{model}: chunk_size must be a positive int, got {chunk_size!r}")


def chunk_kwargs(mode: str, chunk_size: int) -> dict:
    """``chunk_size`` goes to the engine only in chunked mode (the engine rejects it elsewhere)."""
    return {"chunk_size": chunk_size} if mode == "chunked" else {}
