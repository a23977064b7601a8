"""The diagonal scan on Mosaic TPU: grid (batch "parallel", feature tiles "parallel", time tiles
"arbitrary"), the float32 state carried across time tiles in VMEM scratch.

Layout (prepared here, in XLA): each time step's feature vector is folded into whole vector
registers, ``[B, T, D] -> [B, Tp, S, L]`` with S sublanes (8 for float32, 16 when an input is
bfloat16, whose native tile is (16, 128)) and L = ceil(D / S) lanes, rounded up to a multiple of 128
when L > 128. A block is ``[Tt, S, Lt]``: its last two dims are (S, a multiple of 128) or the array's
own, and one time step ``x[t]`` (a dynamic index on the untiled leading axis) is whole vregs, so the
sequential update runs on full vector registers. Padding: time to whole tiles and features to S·L
with a = 1, b = 0, which leaves the state unchanged in either direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
# Elements per [Tt, S, Lt] block: 512 KiB in float32, so the backward pass's five double-buffered
# sequence blocks take 5 MiB of VMEM (v5e's default scoped limit is 16 MiB), and one grid step moves
# 1.5 MiB forward, long against the ~0.35 us fixed cost of a grid step.
BLOCK_ELEMENTS = 131072
MAX_TIME_TILE = 256


class Layout:
    """Tile sizes for [B, T, D] inputs of the given dtypes."""

    def __init__(self, time: int, d: int, dtypes):
        self.sublanes = 16 if any(jnp.dtype(x).itemsize == 2 for x in dtypes) else 8
        lanes = -(-d // self.sublanes)
        if lanes > 128:
            lanes = -(-lanes // 128) * 128
            self.lane_tile = next(t for t in (512, 256, 128) if lanes % t == 0)
        else:
            self.lane_tile = lanes                      # equals the array's dim: allowed
        self.lanes = lanes
        self.time_tile = max(1, min(time, MAX_TIME_TILE, BLOCK_ELEMENTS // (self.sublanes * self.lane_tile)))
        self.time = -(-time // self.time_tile) * self.time_tile

    def seq(self, x, fill: float):
        """[B, T, D] -> [B, Tp, S, L], padded with ``fill``."""
        batch, time, d = x.shape
        width = self.sublanes * self.lanes
        if self.time != time or width != d:
            x = jnp.pad(x, ((0, 0), (0, self.time - time), (0, width - d)), constant_values=fill)
        return x.reshape(batch, self.time, self.sublanes, self.lanes)

    def state(self, x):
        """[B, D] -> [B, S, L], zero-padded."""
        batch, d = x.shape
        width = self.sublanes * self.lanes
        if width != d:
            x = jnp.pad(x, ((0, 0), (0, width - d)))
        return x.reshape(batch, self.sublanes, self.lanes)

    def unseq(self, x, time: int, d: int):
        return x.reshape(x.shape[0], self.time, -1)[:, :time, :d]

    def unstate(self, x, d: int):
        return x.reshape(x.shape[0], -1)[:, :d]


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _specs(lay: Layout, time_tile_of):
    seq = pl.BlockSpec((None, lay.time_tile, lay.sublanes, lay.lane_tile),
                       lambda i, j, n: (i, time_tile_of(n), 0, j))
    state = pl.BlockSpec((None, lay.sublanes, lay.lane_tile), lambda i, j, n: (i, 0, j))
    return seq, state


def forward(a, b, h0, *, reverse: bool, interpret: bool = False):
    """a, b [B, T, D] (float32/bfloat16), h0 [B, D] f32 -> (h [B, T, D] in b's dtype, final [B, D] f32)."""
    batch, time, d = b.shape
    lay = Layout(time, d, (a.dtype, b.dtype))
    tt, nt = lay.time_tile, lay.time // lay.time_tile
    tile_of = (lambda n: nt - 1 - n) if reverse else (lambda n: n)

    def kernel(a_ref, b_ref, h0_ref, h_ref, hf_ref, carry):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            carry[...] = h0_ref[...]

        def step(s, h):
            t = tt - 1 - s if reverse else s
            h = a_ref[t].astype(F32) * h + b_ref[t].astype(F32)
            h_ref[t] = h.astype(h_ref.dtype)
            return h

        h = lax.fori_loop(0, tt, step, carry[...])
        carry[...] = h

        @pl.when(n == nt - 1)
        def _():
            hf_ref[...] = h

    seq, state = _specs(lay, tile_of)
    h, final = pl.pallas_call(
        kernel,
        grid=(batch, lay.lanes // lay.lane_tile, nt),
        in_specs=[seq, seq, state],
        out_specs=[seq, state],
        out_shape=[jax.ShapeDtypeStruct((batch, lay.time, lay.sublanes, lay.lanes), b.dtype),
                   jax.ShapeDtypeStruct((batch, lay.sublanes, lay.lanes), F32)],
        scratch_shapes=[pltpu.VMEM((lay.sublanes, lay.lane_tile), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="diagonal_scan_fwd",
    )(lay.seq(a, 1.0), lay.seq(b, 0.0), lay.state(h0))
    return lay.unseq(h, time, d), lay.unstate(final, d)


def backward(a, h, h0, dh, d_final, *, reverse: bool, interpret: bool = False):
    """The adjoint recurrence against the forward direction (g_t = dh_t + a_next g_next from d_final;
    db = g, da = g h_prev, d h0 = a_first g_first), with the carry a_next g_next in VMEM scratch.
    Returns (da, db, d h0).

    h_prev of a tile's boundary row lives in the neighbouring time tile: a second view of h with a
    one-step block fetches just that row (the initial state stands in at the sequence's edge)."""
    batch, time, d = h.shape
    lay = Layout(time, d, (a.dtype, h.dtype))
    tt, nt, tp = lay.time_tile, lay.time // lay.time_tile, lay.time
    # Backward order: forward scan -> tiles last to first; reverse scan -> first to last.
    tile_of = (lambda n: n) if reverse else (lambda n: nt - 1 - n)
    if reverse:     # the row after the tile (time order), i.e. the state processed just before it
        edge_row = lambda n: jnp.minimum((tile_of(n) + 1) * tt, tp - 1)
    else:
        edge_row = lambda n: jnp.maximum(tile_of(n) * tt - 1, 0)
    edge_tile = nt - 1 if reverse else 0           # the tile whose boundary row is the initial state
    if tp != time:
        # Padded steps are identity steps, so the forward pass would have left h0 (reverse) or the
        # final state (forward, never read as h_prev of a real step) there.
        h = jnp.concatenate([h, jnp.broadcast_to(h0.astype(h.dtype)[:, None], (batch, tp - time, d))], 1)

    def kernel(a_ref, h_ref, edge_ref, h0_ref, dh_ref, df_ref, da_ref, db_ref, dh0_ref, carry, boundary):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            carry[...] = df_ref[...]

        # h_prev of the tile's boundary row (processed last): the neighbouring tile's row, or h0.
        @pl.when(tile_of(n) == edge_tile)
        def _():
            boundary[...] = h0_ref[...]

        @pl.when(tile_of(n) != edge_tile)
        def _():
            boundary[...] = edge_ref[0].astype(F32)

        def adjoint(t, c, prev):
            # c = a_next g_next: what flows into step t from the step processed after it.
            g = dh_ref[t].astype(F32) + c
            db_ref[t] = g.astype(db_ref.dtype)
            da_ref[t] = (g * prev).astype(da_ref.dtype)
            return a_ref[t].astype(F32) * g

        def inner(s, c):                # every row but the boundary one: h_prev is in this tile
            t = s if reverse else tt - 1 - s
            return adjoint(t, c, h_ref[t + 1 if reverse else t - 1].astype(F32))

        c = lax.fori_loop(0, tt - 1, inner, carry[...])
        c = adjoint(tt - 1 if reverse else 0, c, boundary[...])
        carry[...] = c

        @pl.when(n == nt - 1)
        def _():
            dh0_ref[...] = c

    h_tiles = lay.seq(h, 0.0)
    seq, state = _specs(lay, tile_of)
    edge = pl.BlockSpec((None, 1, lay.sublanes, lay.lane_tile), lambda i, j, n: (i, edge_row(n), 0, j))
    shape = (batch, tp, lay.sublanes, lay.lanes)
    da, db, dh0 = pl.pallas_call(
        kernel,
        grid=(batch, lay.lanes // lay.lane_tile, nt),
        in_specs=[seq, seq, edge, state, seq, state],
        out_specs=[seq, seq, state],
        out_shape=[jax.ShapeDtypeStruct(shape, a.dtype), jax.ShapeDtypeStruct(shape, dh.dtype),
                   jax.ShapeDtypeStruct((batch, lay.sublanes, lay.lanes), F32)],
        scratch_shapes=[pltpu.VMEM((lay.sublanes, lay.lane_tile), F32)] * 2,
        compiler_params=_params(),
        interpret=interpret,
        name="diagonal_scan_bwd",
    )(lay.seq(a, 1.0), h_tiles, h_tiles, lay.state(h0), lay.seq(dh, 0.0), lay.state(d_final))
    return lay.unseq(da, time, d), lay.unseq(db, time, d), lay.unstate(dh0, d)
