"""The selective scan in Pallas on the Triton backend: grid (batch, channel tiles); each program walks
the time tiles in a ``fori_loop`` with its [Np, Dt] float32 state in registers (Triton programs of
one grid cannot hand a carry to each other). Layouts as prepared by ``__init__``::

    u, delta, z   [B, Lp, Dp]          a_t [Np, Dp]     bias, skip [1, Dp]
    bm, cm        [B, G, NT, Np, T]    keep [B, NT, 1, T]      h0 [B, Np, Dp]

The backward program recomputes each tile's states from the saved boundary state into a per-program
workspace in device memory ([T, Np, Dt], reused by every tile: L/T times smaller than all states;
Pallas Triton has no scratch memory; a barrier makes the writes visible to the program's threads),
then runs the reverse recurrence over the tile. Its traffic is that of all states (see README.md).
Triton needs power-of-two shapes inside the kernel: T, Np, Dt are powers of two (``__init__`` pads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan._math import Config, Consts, Grads, backward_tile, forward_tile, group_sums

F32 = jnp.float32


def d_tile(dp: int, per_group: int) -> int:
    """Channels per program: a power of two <= 64 dividing Dp and the channels of one group."""
    tile = 64
    while tile > 1 and (dp % tile or per_group % tile):
        tile //= 2
    return tile


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _specs(lp, np_, dt, nt, tile, per_group, has_z):
    """Input BlockSpecs over grid (batch, channel tile): whole sequences, one channel tile."""
    seq = pl.BlockSpec((None, lp, dt), lambda b, j: (b, 0, j))
    group = pl.BlockSpec((None, None, nt, np_, tile),
                         lambda b, j: (b, lax.div(j * dt, per_group), 0, 0, 0))
    return ([seq, seq] + [seq] * has_z
            + [pl.BlockSpec((np_, dt), lambda b, j: (0, j)), pl.BlockSpec((1, dt), lambda b, j: (0, j)),
               pl.BlockSpec((1, dt), lambda b, j: (0, j)), group, group,
               pl.BlockSpec((None, nt, 1, tile), lambda b, j: (b, 0, 0, 0)),
               pl.BlockSpec((None, np_, dt), lambda b, j: (b, 0, j))])


def _column_reader(n, b_ref, c_ref, k_ref):
    """Step t's B, C columns [Np, 1] and keep flag [1, 1], loaded straight from the [Np, T] blocks."""
    def cols(t):
        at = pl.ds(t, 1)
        return b_ref[n, :, at], c_ref[n, :, at], k_ref[n, :, at]
    return cols


def _row_readers(start, u_ref, x_ref, z_ref):
    def rows(t):
        at = pl.ds(start + t, 1)
        z = None if z_ref is None else z_ref[at, :].astype(F32)
        return u_ref[at, :].astype(F32), x_ref[at, :].astype(F32), z
    return rows


def forward(u, x, z, a_t, bias, skip, bm, cm, keep, h0, *, cfg: Config, per_group: int,
            interpret: bool = False):
    """Returns (out [B, Lp, Dp] in u's dtype, final state [B, Np, Dp], states entering each tile
    [B, NT, Np, Dp]), all float32 but out."""
    batch, lp, dp = u.shape
    np_, nt, tile = a_t.shape[0], bm.shape[2], cfg.tile
    dt = d_tile(dp, per_group)
    has_z = z is not None

    def kernel(*refs):
        u_ref, x_ref, *refs = refs
        z_ref = refs.pop(0) if has_z else None
        a_ref, bias_ref, skip_ref, b_ref, c_ref, k_ref, h0_ref, out_ref, hf_ref, st_ref = refs
        consts = Consts(a_ref[...], bias_ref[...], skip_ref[...])

        def tile_body(n, h):
            start = n * tile
            st_ref[n] = h

            def write(t, y):
                out_ref[pl.ds(start + t, 1), :] = y.astype(out_ref.dtype)

            return forward_tile(h, start, _row_readers(start, u_ref, x_ref, z_ref),
                                _column_reader(n, b_ref, c_ref, k_ref), write, None, consts, cfg)

        hf_ref[...] = lax.fori_loop(0, nt, tile_body, h0_ref[...])

    state = pl.BlockSpec((None, np_, dt), lambda b, j: (b, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(batch, dp // dt),
        in_specs=_specs(lp, np_, dt, nt, tile, per_group, has_z),
        out_specs=[pl.BlockSpec((None, lp, dt), lambda b, j: (b, 0, j)), state,
                   pl.BlockSpec((None, nt, np_, dt), lambda b, j: (b, 0, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((batch, lp, dp), u.dtype),
                   jax.ShapeDtypeStruct((batch, np_, dp), F32),
                   jax.ShapeDtypeStruct((batch, nt, np_, dp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="selective_scan_fwd",
    )(u, x, *([z] if has_z else []), a_t, bias, skip, bm, cm, keep, h0)


def backward(u, x, z, a_t, bias, skip, bm, cm, keep, states, dout, dh_final, *, cfg: Config, per_group: int,
             interpret: bool = False):
    """Tiles in reverse, carrying dL/dh. Returns du, ddelta, dz ([B, Lp, Dp] float32; dz None without
    z), dA [B, Np, Dp] and dD [B, 1, Dp] (per batch row), dB, dC [B, G, NT, Np, T],
    and dL/dh0 [B, Np, Dp]."""
    batch, lp, dp = u.shape
    np_, nt, tile = a_t.shape[0], bm.shape[2], cfg.tile
    dt = d_tile(dp, per_group)
    nd = dp // dt
    has_z = z is not None

    def kernel(*refs):
        u_ref, x_ref, *refs = refs
        z_ref = refs.pop(0) if has_z else None
        a_ref, bias_ref, skip_ref, b_ref, c_ref, k_ref, st_ref, do_ref, dhf_ref, *refs = refs
        du_ref, dx_ref, *refs = refs
        dz_ref = refs.pop(0) if has_z else None
        da_ref, dskip_ref, db_ref, dc_ref, dh0_ref, ws_ref = refs
        consts = Consts(a_ref[...], bias_ref[...], skip_ref[...])

        def tile_body(step, grads):
            n = nt - 1 - step
            start = n * tile
            rows = _row_readers(start, u_ref, x_ref, z_ref)
            cols = _column_reader(n, b_ref, c_ref, k_ref)

            def save(t, h):
                ws_ref[t] = h

            forward_tile(st_ref[n], start, rows, cols, None, save, consts, cfg)
            # __syncthreads: the workspace rows written above are visible to every thread of the program
            # below, whatever layouts Triton gives the stored and the loaded values (CPU has no such
            # primitive; the interpreter runs one thread).
            if not interpret:
                pltriton.debug_barrier()

            def dout_row(t):
                return do_ref[pl.ds(start + t, 1), :].astype(F32)

            def write(t, du, dx, dz):
                at = pl.ds(start + t, 1)
                du_ref[at, :] = du
                dx_ref[at, :] = dx
                if dz_ref is not None:
                    dz_ref[at, :] = dz

            def write_cols(t, db, dc):
                db_ref[n, :, pl.ds(t, 1)] = db
                dc_ref[n, :, pl.ds(t, 1)] = dc

            return backward_tile(grads, start, rows, cols, dout_row, write, write_cols, lambda t: ws_ref[t],
                                 consts, cfg)

        zeros = jnp.zeros((np_, dt), F32)
        grads = lax.fori_loop(0, nt, tile_body, Grads(dhf_ref[...], zeros, jnp.zeros((1, dt), F32)))
        dh0_ref[...] = grads.g
        da_ref[...] = grads.da
        dskip_ref[...] = grads.dskip

    seq = pl.BlockSpec((None, lp, dt), lambda b, j: (b, 0, j))
    state = pl.BlockSpec((None, np_, dt), lambda b, j: (b, 0, j))
    per_tile = pl.BlockSpec((None, None, nt, np_, tile), lambda b, j: (b, j, 0, 0, 0))
    seq_f32 = jax.ShapeDtypeStruct((batch, lp, dp), F32)
    state_f32 = jax.ShapeDtypeStruct((batch, np_, dp), F32)
    tiles_f32 = jax.ShapeDtypeStruct((batch, nd, nt, np_, tile), F32)
    outs = pl.pallas_call(
        kernel,
        grid=(batch, nd),
        in_specs=_specs(lp, np_, dt, nt, tile, per_group, has_z)[:-1]
        + [pl.BlockSpec((None, nt, np_, dt), lambda b, j: (b, 0, 0, j)), seq, state],
        out_specs=[seq, seq] + [seq] * has_z
        + [state, pl.BlockSpec((None, 1, dt), lambda b, j: (b, 0, j)), per_tile, per_tile, state,
           pl.BlockSpec((None, None, tile, np_, dt), lambda b, j: (b, j, 0, 0, 0))],
        out_shape=[seq_f32, seq_f32] + [seq_f32] * has_z
        + [state_f32, jax.ShapeDtypeStruct((batch, 1, dp), F32), tiles_f32, tiles_f32, state_f32,
           jax.ShapeDtypeStruct((batch, nd, tile, np_, dt), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="selective_scan_bwd",
    )(u, x, *([z] if has_z else []), a_t, bias, skip, bm, cm, keep, states, dout, dh_final)
    du, dx, *outs = outs
    dz = outs.pop(0) if has_z else None
    da, dskip, db, dc, dh0, _ = outs
    groups = bm.shape[1]
    return du, dx, dz, da, dskip, group_sums(db, groups), group_sums(dc, groups), dh0
