"""Chunked GLA (scalar decay) on Mosaic TPU: grid (batch·head, V tiles, chunks), chunk axis sequential
("arbitrary") with the [K, V-tile] float32 state in VMEM scratch. Layouts (prepared by ``__init__``)::

    q, k [BH, Tp, Kp]   v [BH, Tp, Vp]   b_col [BH, Tp, 1]   b_row [BH, NC, 1, C]   state [BH, Kp, Vp]
    states (each chunk's entering state) [BH, NC·Kp, Vp] float32

Kp, Vp are powers of two >= 16 (so multiples of 8); a V tile is Vp or 128; C a multiple of 8
(b_row is cut per chunk so that its block's last two dims equal the array's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_gla._math import backward_chunk, forward_chunk

F32 = jnp.float32


def v_tile(vp: int) -> int:
    return min(vp, 128)


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _b_row_spec(c):
    return pl.BlockSpec((None, None, 1, c), lambda i, j, n: (i, n, 0, 0))


def forward(q, k, v, b, seg, state0, *, chunk: int, scale: float, interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    b_col, b_row = b[..., None], b.reshape(bh, nc, 1, chunk)
    seg_col, seg_row = seg[..., None], seg.reshape(bh, nc, 1, chunk)

    def kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, sc_ref, sr_ref, s0_ref, o_ref, sf_ref, st_ref, s_scr):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        st_ref[...] = s_scr[...]
        o, new = forward_chunk(q_ref[...], k_ref[...], v_ref[...], bc_ref[...], br_ref[...], sc_ref[...],
                               sr_ref[...], s_scr[...],
                               scale)
        o_ref[...] = o.astype(o_ref.dtype)
        s_scr[...] = new

        @pl.when(n == nc - 1)
        def _():
            sf_ref[...] = new

    qk_spec = pl.BlockSpec((None, chunk, kp), lambda i, j, n: (i, n, 0))
    v_spec = pl.BlockSpec((None, chunk, bv), lambda i, j, n: (i, n, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(bh, vp // bv, nc),
        in_specs=[qk_spec, qk_spec, v_spec, pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, n, 0)),
                  _b_row_spec(chunk), pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, n, 0)),
                  _b_row_spec(chunk), s_spec],
        out_specs=[v_spec, s_spec, pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, n, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_fwd",
    )(q, k, v, b_col, b_row, seg_col, seg_row, state0)


def backward(q, k, v, b, seg, states, do, dstate_final, *, chunk: int, scale: float,
             interpret: bool = False):
    """Reverse pass over chunks carrying dS in VMEM. dq, dk, db come per V tile ([NV, ...]) and are
    summed here."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    b_col, b_row = b[..., None], b.reshape(bh, nc, 1, chunk)
    seg_col, seg_row = seg[..., None], seg.reshape(bh, nc, 1, chunk)
    nv = vp // bv

    def kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, sc_ref, sr_ref, st_ref, do_ref, dsf_ref,
               dq_ref, dk_ref, dv_ref, db_ref, ds0_ref, ds_scr):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            ds_scr[...] = dsf_ref[...]

        dq, dk, dv, db, ds_in = backward_chunk(q_ref[...], k_ref[...], v_ref[...], bc_ref[...], br_ref[...],
                                               sc_ref[...], sr_ref[...], st_ref[...], do_ref[...],
                                               ds_scr[...], scale)
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv.astype(dv_ref.dtype)
        db_ref[...] = db
        ds_scr[...] = ds_in

        @pl.when(n == nc - 1)
        def _():
            ds0_ref[...] = ds_in

    rev = functools.partial(lambda n: nc - 1 - n)
    qk_spec = pl.BlockSpec((None, chunk, kp), lambda i, j, n: (i, rev(n), 0))
    v_spec = pl.BlockSpec((None, chunk, bv), lambda i, j, n: (i, rev(n), j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, chunk, kp), lambda i, j, n: (j, i, rev(n), 0))
    part_b = pl.BlockSpec((None, None, chunk, 1), lambda i, j, n: (j, i, rev(n), 0))
    dq, dk, dv, db, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv, nc),
        in_specs=[qk_spec, qk_spec, v_spec, pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, rev(n), 0)),
                  pl.BlockSpec((None, None, 1, chunk), lambda i, j, n: (i, rev(n), 0, 0)),
                  pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, rev(n), 0)),
                  pl.BlockSpec((None, None, 1, chunk), lambda i, j, n: (i, rev(n), 0, 0)),
                  pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, rev(n), j)), v_spec, s_spec],
        out_specs=[part_qk, part_qk, v_spec, part_b, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, 1), F32),
                   jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_bwd",
    )(q, k, v, b_col, b_row, seg_col, seg_row, states, do, dstate_final)
    # The V tiles' shares of dq, dk and db (their sum; equal shapes on every platform).
    return dq.sum(0), dk.sum(0), dv, db.sum(0)[..., 0], dstate0
