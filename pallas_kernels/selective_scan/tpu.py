"""The selective scan on Mosaic TPU: grid (batch "parallel", channel tiles "parallel", time tiles
"arbitrary"), the [Np, Dt] float32 state in VMEM scratch across the time axis. Layouts (prepared by
``__init__``)::

    u, delta, z   [B, Lp, Dp]   blocks [T, Dt]          a_t [Np, Dp] block [Np, Dt]
    bias, skip    [1, Dp]       blocks [1, Dt]          h0, final state [B, Np, Dp] blocks [Np, Dt]
    bm, cm        [B, G, NT, Np, T]  blocks [Np, T]     keep [B, NT, 1, T] blocks [1, T]
    states        [B, NT, Np, Dp] blocks [Np, Dt]       (the state entering each time tile)

Dt is Dp up to 128 channels, else 512, 256 or 128 (lanes; ``d_tile``); T is a power of two >= 8
(sublanes). Each tile's u, delta, z are first copied to float32 VMEM scratch, so that single rows
are read from an unpacked float32 buffer (dynamic sublane offsets); the output rows go to a float32
buffer cast once per tile.
The backward recomputes the tile's states into VMEM scratch [T, Np, Dt] (never to HBM), then runs
the reverse recurrence, walking time tiles in reverse through the index maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan import _math
from pallas_kernels.selective_scan._math import Config, Consts, Grads, backward_tile, forward_tile

F32 = jnp.float32


def d_tile(dp: int, per_group: int) -> int:
    """Channels per grid step: all of them up to 128, else the widest of 512, 256, 128 lanes that
    divides Dp and one group's channels. Wide tiles give the per-step chain of dependent vector ops
    several vregs each (the state is [Np, Dt]), which hides their latency."""
    if dp <= 128:
        return dp
    return next(t for t in (512, 256, 128) if dp % t == 0 and per_group % t == 0)


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _in_specs(np_, dt, tile, per_group, has_z, rev):
    row = pl.BlockSpec((None, tile, dt), lambda b, j, n: (b, rev(n), j))
    group = pl.BlockSpec((None, None, None, np_, tile),
                         lambda b, j, n: (b, lax.div(j * dt, per_group), rev(n), 0, 0))
    return ([row, row] + [row] * has_z
            + [pl.BlockSpec((np_, dt), lambda b, j, n: (0, j)), pl.BlockSpec((1, dt), lambda b, j, n: (0, j)),
               pl.BlockSpec((1, dt), lambda b, j, n: (0, j)), group, group,
               pl.BlockSpec((None, None, 1, tile), lambda b, j, n: (b, rev(n), 0, 0))])


def _stage_rows(buf, u_ref, x_ref, z_ref):
    """Copies the tile's u, delta (, z) to the float32 buffer [3, T, Dt]; returns the row reader."""
    buf[0] = u_ref[...].astype(F32)
    buf[1] = x_ref[...].astype(F32)
    if z_ref is not None:
        buf[2] = z_ref[...].astype(F32)

    def rows(t):
        at = pl.ds(t, 1)
        z = None if z_ref is None else buf[2, at, :]
        return buf[0, at, :], buf[1, at, :], z
    return rows


def _column_reader(b_tile, c_tile, keep_tile):
    """Step t's B, C columns [Np, 1] and keep flag [1, 1] from the loaded tiles (masked lane sums)."""
    def cols(t):
        return _math.column(b_tile, t), _math.column(c_tile, t), _math.column(keep_tile, t)
    return cols


def forward(u, x, z, a_t, bias, skip, bm, cm, keep, h0, *, cfg: Config, per_group: int,
            interpret: bool = False):
    """Returns (out [B, Lp, Dp] in u's dtype, final state [B, Np, Dp], states entering each tile
    [B, NT, Np, Dp])."""
    batch, lp, dp = u.shape
    np_, nt, tile = a_t.shape[0], bm.shape[2], cfg.tile
    dt = d_tile(dp, per_group)
    has_z = z is not None

    def kernel(*refs):
        u_ref, x_ref, *refs = refs
        z_ref = refs.pop(0) if has_z else None
        a_ref, bias_ref, skip_ref, b_ref, c_ref, k_ref, h0_ref, out_ref, hf_ref, st_ref, h_scr, in_buf, \
            out_buf = refs
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            h_scr[...] = h0_ref[...]

        st_ref[...] = h_scr[...]
        rows = _stage_rows(in_buf, u_ref, x_ref, z_ref)

        def write(t, y):
            out_buf[pl.ds(t, 1), :] = y

        consts = Consts(a_ref[...], bias_ref[...], skip_ref[...])
        cols = _column_reader(b_ref[...], c_ref[...], k_ref[...])
        h = forward_tile(h_scr[...], n * tile, rows, cols, write, None, consts, cfg)
        h_scr[...] = h
        out_ref[...] = out_buf[...].astype(out_ref.dtype)

        @pl.when(n == nt - 1)
        def _():
            hf_ref[...] = h

    state = pl.BlockSpec((None, np_, dt), lambda b, j, n: (b, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(batch, dp // dt, nt),
        in_specs=_in_specs(np_, dt, tile, per_group, has_z, lambda n: n) + [state],
        out_specs=[pl.BlockSpec((None, tile, dt), lambda b, j, n: (b, n, j)), state,
                   pl.BlockSpec((None, None, np_, dt), lambda b, j, n: (b, n, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((batch, lp, dp), u.dtype),
                   jax.ShapeDtypeStruct((batch, np_, dp), F32),
                   jax.ShapeDtypeStruct((batch, nt, np_, dp), F32)],
        scratch_shapes=[pltpu.VMEM((np_, dt), F32), pltpu.VMEM((3, tile, dt), F32),
                        pltpu.VMEM((tile, dt), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="selective_scan_fwd",
    )(u, x, *([z] if has_z else []), a_t, bias, skip, bm, cm, keep, h0)


def backward(u, x, z, a_t, bias, skip, bm, cm, keep, states, dout, dh_final, *, cfg: Config, per_group: int,
             interpret: bool = False):
    """Time tiles in reverse, dL/dh, dA, dD carried in VMEM. Returns du, ddelta, dz ([B, Lp, Dp] float32;
    dz None without z), dA [B, Np, Dp], dD [B, 1, Dp], dB, dC [B, G, NT, Np, T] and
    dL/dh0 [B, Np, Dp]."""
    batch, lp, dp = u.shape
    np_, nt, tile = a_t.shape[0], bm.shape[2], cfg.tile
    dt = d_tile(dp, per_group)
    nd = dp // dt
    has_z = z is not None

    def rev(n):
        return nt - 1 - n

    def kernel(*refs):
        u_ref, x_ref, *refs = refs
        z_ref = refs.pop(0) if has_z else None
        a_ref, bias_ref, skip_ref, b_ref, c_ref, k_ref, st_ref, do_ref, dhf_ref, du_ref, dx_ref, *refs = refs
        dz_ref = refs.pop(0) if has_z else None
        da_ref, dskip_ref, db_ref, dc_ref, dh0_ref, g_scr, da_scr, dskip_scr, ws, in_buf, do_buf = refs
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            g_scr[...] = dhf_ref[...]
            da_scr[...] = jnp.zeros(da_scr.shape, F32)
            dskip_scr[...] = jnp.zeros(dskip_scr.shape, F32)

        start = rev(n) * tile
        rows = _stage_rows(in_buf, u_ref, x_ref, z_ref)
        do_buf[...] = do_ref[...].astype(F32)
        consts = Consts(a_ref[...], bias_ref[...], skip_ref[...])
        cols = _column_reader(b_ref[...], c_ref[...], k_ref[...])

        def save(t, h):
            ws[t] = h

        forward_tile(st_ref[...], start, rows, cols, None, save, consts, cfg)

        def write(t, du, dx, dz):
            at = pl.ds(t, 1)
            du_ref[at, :] = du
            dx_ref[at, :] = dx
            if dz_ref is not None:
                dz_ref[at, :] = dz

        def write_cols(t, db, dc):
            # Every column of the [Np, T] output blocks is written once in the tile.
            db_ref[...] = _math.put_column(db_ref[...], t, db)
            dc_ref[...] = _math.put_column(dc_ref[...], t, dc)

        def dout_row(t):
            return do_buf[pl.ds(t, 1), :]

        carry = Grads(g_scr[...], da_scr[...], dskip_scr[...])
        grads = backward_tile(carry, start, rows, cols, dout_row, write, write_cols, lambda t: ws[t], consts,
                              cfg)
        g_scr[...] = grads.g
        da_scr[...] = grads.da
        dskip_scr[...] = grads.dskip

        @pl.when(n == nt - 1)
        def _():
            dh0_ref[...] = grads.g
            da_ref[...] = grads.da
            dskip_ref[...] = grads.dskip

    row = pl.BlockSpec((None, tile, dt), lambda b, j, n: (b, rev(n), j))
    state = pl.BlockSpec((None, np_, dt), lambda b, j, n: (b, 0, j))
    per_tile = pl.BlockSpec((None, None, None, np_, tile), lambda b, j, n: (b, j, rev(n), 0, 0))
    row_f32 = jax.ShapeDtypeStruct((batch, lp, dp), F32)
    state_f32 = jax.ShapeDtypeStruct((batch, np_, dp), F32)
    tiles_f32 = jax.ShapeDtypeStruct((batch, nd, nt, np_, tile), F32)
    outs = pl.pallas_call(
        kernel,
        grid=(batch, nd, nt),
        in_specs=_in_specs(np_, dt, tile, per_group, has_z, rev)
        + [pl.BlockSpec((None, None, np_, dt), lambda b, j, n: (b, rev(n), 0, j)), row, state],
        out_specs=[row, row] + [row] * has_z
        + [state, pl.BlockSpec((None, 1, dt), lambda b, j, n: (b, 0, j)), per_tile, per_tile, state],
        out_shape=[row_f32, row_f32] + [row_f32] * has_z
        + [state_f32, jax.ShapeDtypeStruct((batch, 1, dp), F32), tiles_f32, tiles_f32, state_f32],
        scratch_shapes=[pltpu.VMEM((np_, dt), F32), pltpu.VMEM((np_, dt), F32), pltpu.VMEM((1, dt), F32),
                        pltpu.VMEM((tile, np_, dt), F32), pltpu.VMEM((3, tile, dt), F32),
                        pltpu.VMEM((tile, dt), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="selective_scan_bwd",
    )(u, x, *([z] if has_z else []), a_t, bias, skip, bm, cm, keep, states, dout, dh_final)
    du, dx, *outs = outs
    dz = outs.pop(0) if has_z else None
    da, dskip, db, dc, dh0 = outs
    groups = bm.shape[1]
    return du, dx, dz, da, dskip, _math.group_sums(db, groups), _math.group_sums(dc, groups), dh0
