"""Chunked GLA (scalar decay; per-key decays below) on Mosaic TPU: grid (batch·head, V tiles,
chunks), chunk axis sequential ("arbitrary") with the [K, V-tile] float32 state in VMEM scratch.
Layouts (prepared by ``__init__``)::

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

from pallas_kernels.chunked_gla import _math_per_key as per_key
from pallas_kernels.chunked_gla import _math_stabilised as stabilised
from pallas_kernels.chunked_gla._math import backward_chunk, forward_chunk
from pallas_kernels.chunked_gla._math_per_key import SUB

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


# ------------------------------------------------------------------------------------------------
# Log decays per key dimension (GLA). Extra layouts: b [BH, Tp, Kp] float32 (block [C, Kp]); the
# chunk totals as columns [BH, NC·Kp, 1] (block [Kp, 1]); the segment numbers' row form cut per
# sub-chunk, [BH, NC·C/16, 1, 16] (block [C/16, 1, 16]: its last two dims equal the array's, and no
# lane-unaligned slicing in the kernel). Each chunk is read as sub-chunks of 16 rows (static,
# sublane-aligned ref slices).


def _sub_rows(n_sub):
    return [pl.ds(SUB * i, SUB) for i in range(n_sub)]


def _per_key_layouts(seg, chunk):
    bh, tp = seg.shape
    return seg[..., None], seg.reshape(bh, tp // SUB, 1, SUB)


def forward_per_key(q, k, v, b, total_col, seg, state0, *, chunk: int, scale: float,
                    interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc, n_sub = v_tile(vp), tp // chunk, chunk // SUB
    seg_col, seg_row = _per_key_layouts(seg, chunk)

    def kernel(q_ref, k_ref, v_ref, b_ref, bt_ref, sc_ref, sr_ref, s0_ref, o_ref, sf_ref, st_ref, s_scr):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        st_ref[...] = s_scr[...]
        subs = _sub_rows(n_sub)
        outs, new = per_key.forward_chunk(
            [q_ref[r, :] for r in subs], [k_ref[r, :] for r in subs], [v_ref[r, :] for r in subs],
            [b_ref[r, :] for r in subs], [sc_ref[r, :] for r in subs], [sr_ref[i] for i in range(n_sub)],
            bt_ref[...], s_scr[...], scale)
        for r, o in zip(subs, outs, strict=True):
            o_ref[r, :] = o.astype(o_ref.dtype)
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
        in_specs=[qk_spec, qk_spec, v_spec, qk_spec, pl.BlockSpec((None, kp, 1), lambda i, j, n: (i, n, 0)),
                  pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, n, 0)),
                  pl.BlockSpec((None, n_sub, 1, SUB), lambda i, j, n: (i, n, 0, 0)), s_spec],
        out_specs=[v_spec, s_spec, pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, n, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_per_key_fwd",
    )(q, k, v, b, total_col, seg_col, seg_row, state0)


def backward_per_key(q, k, v, b, total_col, seg, states, do, dstate_final, *, chunk: int, scale: float,
                     interpret: bool = False):
    """Reverse pass over chunks carrying dS in VMEM; dq, dk, db, dtotal per V tile, summed here."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc, n_sub = v_tile(vp), tp // chunk, chunk // SUB
    seg_col, seg_row = _per_key_layouts(seg, chunk)
    nv = vp // bv

    def kernel(q_ref, k_ref, v_ref, b_ref, bt_ref, sc_ref, sr_ref, st_ref, do_ref, dsf_ref,
               dq_ref, dk_ref, dv_ref, db_ref, dbt_ref, ds0_ref, ds_scr):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            ds_scr[...] = dsf_ref[...]

        subs = _sub_rows(n_sub)
        dq, dk, dv, db, dtotal, ds_in = per_key.backward_chunk(
            [q_ref[r, :] for r in subs], [k_ref[r, :] for r in subs], [v_ref[r, :] for r in subs],
            [b_ref[r, :] for r in subs], [sc_ref[r, :] for r in subs], [sr_ref[i] for i in range(n_sub)],
            bt_ref[...], st_ref[...], [do_ref[r, :] for r in subs], ds_scr[...], scale)
        for i, r in enumerate(subs):
            dq_ref[r, :] = dq[i]
            dk_ref[r, :] = dk[i]
            dv_ref[r, :] = dv[i].astype(dv_ref.dtype)
            db_ref[r, :] = db[i]
        dbt_ref[...] = dtotal
        ds_scr[...] = ds_in

        @pl.when(n == nc - 1)
        def _():
            ds0_ref[...] = ds_in

    rev = functools.partial(lambda n: nc - 1 - n)
    qk_spec = pl.BlockSpec((None, chunk, kp), lambda i, j, n: (i, rev(n), 0))
    v_spec = pl.BlockSpec((None, chunk, bv), lambda i, j, n: (i, rev(n), j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, chunk, kp), lambda i, j, n: (j, i, rev(n), 0))
    part_total = pl.BlockSpec((None, None, kp, 1), lambda i, j, n: (j, i, rev(n), 0))
    dq, dk, dv, db, dtotal, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv, nc),
        in_specs=[qk_spec, qk_spec, v_spec, qk_spec,
                  pl.BlockSpec((None, kp, 1), lambda i, j, n: (i, rev(n), 0)),
                  pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, rev(n), 0)),
                  pl.BlockSpec((None, n_sub, 1, SUB), lambda i, j, n: (i, rev(n), 0, 0)),
                  pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, rev(n), j)), v_spec, s_spec],
        out_specs=[part_qk, part_qk, v_spec, part_qk, part_total, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((nv, bh, nc * kp, 1), F32), jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_per_key_bwd",
    )(q, k, v, b, total_col, seg_col, seg_row, states, do, dstate_final)
    return dq.sum(0), dk.sum(0), dv, db.sum(0), dtotal.sum(0), dstate0


# ------------------------------------------------------------------------------------------------
# mLSTM's max-stabilised form (``_math_stabilised``): α, β as columns [BH, Tp, 1] (block [C, 1]),
# β also as rows cut per chunk [BH, NC, 1, C], the entering stabiliser mu [BH, NC, 1, 1].


def _stabilised_specs(chunk, rev):
    col = pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, rev(n), 0))
    row = pl.BlockSpec((None, None, 1, chunk), lambda i, j, n: (i, rev(n), 0, 0))
    one = pl.BlockSpec((None, None, 1, 1), lambda i, j, n: (i, rev(n), 0, 0))
    return col, row, one


def _stabilised_layouts(a, beta, mu, seg, chunk):
    bh, tp = a.shape
    nc = tp // chunk
    return (a[..., None], beta[..., None], beta.reshape(bh, nc, 1, chunk), mu.reshape(bh, nc, 1, 1),
            seg[..., None], seg.reshape(bh, nc, 1, chunk))


def forward_stabilised(q, k, v, a, beta, mu, seg, state0, *, chunk: int, scale: float,
                       interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk

    def kernel(q_ref, k_ref, v_ref, a_ref, bc_ref, br_ref, mu_ref, sc_ref, sr_ref, s0_ref, o_ref, sf_ref,
               st_ref, s_scr):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        st_ref[...] = s_scr[...]
        o, new = stabilised.forward_chunk(q_ref[...], k_ref[...], v_ref[...], a_ref[...], bc_ref[...],
                                          br_ref[...], mu_ref[...], sc_ref[...], sr_ref[...], s_scr[...],
                                          scale)
        o_ref[...] = o.astype(o_ref.dtype)
        s_scr[...] = new

        @pl.when(n == nc - 1)
        def _():
            sf_ref[...] = new

    col, row, one = _stabilised_specs(chunk, lambda n: n)
    qk_spec = pl.BlockSpec((None, chunk, kp), lambda i, j, n: (i, n, 0))
    v_spec = pl.BlockSpec((None, chunk, bv), lambda i, j, n: (i, n, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(bh, vp // bv, nc),
        in_specs=[qk_spec, qk_spec, v_spec, col, col, row, one, col, row, s_spec],
        out_specs=[v_spec, s_spec, pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, n, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_stabilised_fwd",
    )(q, k, v, *_stabilised_layouts(a, beta, mu, seg, chunk), state0)


def backward_stabilised(q, k, v, a, beta, mu, seg, states, do, dstate_final, *, chunk: int, scale: float,
                        interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    nv = vp // bv

    def kernel(q_ref, k_ref, v_ref, a_ref, bc_ref, br_ref, mu_ref, sc_ref, sr_ref, st_ref, do_ref, dsf_ref,
               dq_ref, dk_ref, dv_ref, da_ref, dbeta_ref, dmu_ref, ds0_ref, ds_scr):
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            ds_scr[...] = dsf_ref[...]

        dq, dk, dv, da, dbeta, dmu, ds_in = stabilised.backward_chunk(
            q_ref[...], k_ref[...], v_ref[...], a_ref[...], bc_ref[...], br_ref[...], mu_ref[...],
            sc_ref[...], sr_ref[...], st_ref[...], do_ref[...], ds_scr[...], scale)
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv.astype(dv_ref.dtype)
        da_ref[...] = da
        dbeta_ref[...] = dbeta
        dmu_ref[...] = dmu
        ds_scr[...] = ds_in

        @pl.when(n == nc - 1)
        def _():
            ds0_ref[...] = ds_in

    rev = functools.partial(lambda n: nc - 1 - n)
    col, row, one = _stabilised_specs(chunk, rev)
    qk_spec = pl.BlockSpec((None, chunk, kp), lambda i, j, n: (i, rev(n), 0))
    v_spec = pl.BlockSpec((None, chunk, bv), lambda i, j, n: (i, rev(n), j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, chunk, kp), lambda i, j, n: (j, i, rev(n), 0))
    part_col = pl.BlockSpec((None, None, chunk, 1), lambda i, j, n: (j, i, rev(n), 0))
    part_one = pl.BlockSpec((None, None, None, 1, 1), lambda i, j, n: (j, i, rev(n), 0, 0))
    dq, dk, dv, da, dbeta, dmu, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv, nc),
        in_specs=[qk_spec, qk_spec, v_spec, col, col, row, one, col, row,
                  pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, rev(n), j)), v_spec, s_spec],
        out_specs=[part_qk, part_qk, v_spec, part_col, part_col, part_one, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, 1), F32),
                   jax.ShapeDtypeStruct((nv, bh, tp, 1), F32), jax.ShapeDtypeStruct((nv, bh, nc, 1, 1), F32),
                   jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_stabilised_bwd",
    )(q, k, v, *_stabilised_layouts(a, beta, mu, seg, chunk), states, do, dstate_final)
    return (dq.sum(0), dk.sum(0), dv, da.sum(0)[..., 0], dbeta.sum(0)[..., 0],
            dmu.sum(0).reshape(bh, nc), dstate0)
