"""The per-tile arithmetic of the selective scan, shared by the GPU (Triton) and TPU (Mosaic) kernels.

A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), Section 3,
Algorithm 2. For one batch row, one tile of Dt channels and one time tile of T steps, with the state
``h`` laid out [Np, Dt] (state index on sublanes, channels on lanes) in float32::

    Δ_t = softplus(delta_t + bias)   (or delta_t + bias)        [1, Dt]
    h_t = exp(Δ_t A) ⊙ (keep_t h_{t-1}) + B_t (Δ_t u_t)         B_t a column [Np, 1]
    y_t = Σ_n C_t h_t + D u_t,   out_t = y_t · silu(z_t)        [1, Dt]

``keep_t`` is 0 where a reset drops the state before step t. Steps at or past ``length`` (padding)
use Δ = 0: the decay is 1 and nothing is added, so the state passes through unchanged.

Rows of u, delta, z (and the output), and the columns of B, C and the keep flags, come through
closures (``rows(t)``, ``cols(t)``, ``write(...)``) so that each platform reads its own block
layout: the Triton kernel loads a [Np, 1] column straight from its [Np, T] block, the Mosaic kernel
takes it from the loaded tile with a masked lane sum (``column``; no dynamic lane slicing) and puts
dB, dC columns back with ``put_column``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


class Config(NamedTuple):
    """Static parameters of a call."""

    tile: int        # T: steps per time tile (states are saved at tile boundaries)
    length: int      # L: real steps; later ones are padding
    softplus: bool   # delta_softplus
    has_z: bool      # out = y · silu(z)


class Consts(NamedTuple):
    """Per channel tile, loaded once per program: A transposed [Np, Dt], bias and D skip [1, Dt]."""

    a: object
    bias: object
    skip: object


def column(tile, t):
    """Column t of a [R, T] value as [R, 1]."""
    lane = lax.broadcasted_iota(jnp.int32, tile.shape, 1)
    return jnp.sum(jnp.where(lane == t, tile, 0.0), axis=1, keepdims=True)


def put_column(tile, t, col):
    """The [R, T] value with column t replaced by ``col`` [R, 1]."""
    lane = lax.broadcasted_iota(jnp.int32, tile.shape, 1)
    return jnp.where(lane == t, col, tile)


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _step_delta(x, consts: Consts, cfg: Config, valid):
    """(Δ [1, Dt], delta + bias [1, Dt]); Δ = 0 on padded steps."""
    xb = x + consts.bias
    dt = _softplus(xb) if cfg.softplus else xb
    return jnp.where(valid, dt, 0.0), xb


def forward_tile(h, start, rows, cols, write, save, consts: Consts, cfg: Config):
    """Runs one time tile from ``h`` [Np, Dt]; returns the state after it.

    ``rows(t)`` gives (u, delta, z) rows [1, Dt] in float32 (z None without a gate), ``cols(t)`` the
    (B, C) columns [Np, 1] and the keep flag [1, 1] of step t, ``write(t, out)`` (or None) stores an
    output row, ``save(t, h)`` (or None) the state entering step t. ``start`` is the tile's first
    global step (for the padding test).
    """

    def body(t, h):
        u, x, z = rows(t)
        dt, _ = _step_delta(x, consts, cfg, start + t < cfg.length)
        if save is not None:
            save(t, h)
        b_col, c_col, keep = cols(t)
        h = jnp.exp(dt * consts.a) * (keep * h) + b_col * (dt * u)
        if write is not None:
            y = jnp.sum(c_col * h, axis=0, keepdims=True) + consts.skip * u
            if cfg.has_z:
                y = y * (z * _sigmoid(z))
            write(t, y)
        return h

    return lax.fori_loop(0, cfg.tile, body, h)


class Grads(NamedTuple):
    """The carry of the reverse walk: dL/dh of the state leaving the current step, and the sums
    over time of dA [Np, Dt] and dD [1, Dt]."""

    g: object
    da: object
    dskip: object


def backward_tile(grads: Grads, start, rows, cols, dout_row, write, write_cols, load_state, consts: Consts,
                  cfg: Config):
    """The reverse recurrence over one tile, whose entering states ``load_state(t)`` [Np, Dt] were
    recomputed by ``forward_tile``. ``write(t, du, ddelta, dz)`` stores rows (dz None without z),
    ``write_cols(t, dB, dC)`` this channel tile's parts of dB and dC ([Np, 1] columns).

    Returns the grads entering the tile.
    """

    def body(i, grads):
        t = cfg.tile - 1 - i
        u, x, z = rows(t)
        valid = start + t < cfg.length
        dt, xb = _step_delta(x, consts, cfg, valid)
        b_col, c_col, keep = cols(t)
        h_prev = keep * load_state(t)
        decay = jnp.exp(dt * consts.a)
        drive = dt * u
        h = decay * h_prev + b_col * drive
        dout = dout_row(t)
        if cfg.has_z:
            y = jnp.sum(c_col * h, axis=0, keepdims=True) + consts.skip * u
            sig = _sigmoid(z)
            dy = dout * (z * sig)
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
        else:
            dy, dz = dout, None
        g = grads.g + c_col * dy                                  # dL/dh_t
        write_cols(t, jnp.sum(g * drive, axis=1, keepdims=True), jnp.sum(h * dy, axis=1, keepdims=True))
        g_drive = jnp.sum(g * b_col, axis=0, keepdims=True)     # dL/d(Δ u), [1, Dt]
        g_exponent = g * h_prev * decay                           # dL/d(Δ A), [Np, Dt]
        d_dt = jnp.sum(g_exponent * consts.a, axis=0, keepdims=True) + u * g_drive
        d_dt = jnp.where(valid, d_dt, 0.0)
        d_delta = d_dt * _sigmoid(xb) if cfg.softplus else d_dt
        write(t, dt * g_drive + consts.skip * dy, d_delta, dz)
        return Grads(g=g * decay * keep, da=grads.da + g_exponent * dt, dskip=grads.dskip + dy * u)

    return lax.fori_loop(0, cfg.tile, body, grads)


def group_sums(d, groups: int):
    """[B, ND, NT, Np, T] per channel tile -> [B, G, NT, Np, T]: the channel tiles of one group share
    its B/C, so their parts of dB/dC add up (in XLA, after the kernel)."""
    batch, nd, *rest = d.shape
    return d.reshape(batch, groups, nd // groups, *rest).sum(2)
