"""Chunked GLA (scalar decay; per-key decays below) in Pallas on the Triton backend: grid
(batch·head, V tiles), each program walks the chunks in a ``fori_loop`` carrying the [K, V-tile]
float32 state in registers (GPU programs of one grid cannot pass a carry to each other). Same
layouts as ``tpu.py``; Triton needs power-of-two shapes inside the kernel, which the caller's padding
(Kp, Vp, C powers of two) gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunked_gla import _math_per_key as per_key
from pallas_kernels.chunked_gla import _math_stabilised as stabilised
from pallas_kernels.chunked_gla._math import backward_chunk, forward_chunk
from pallas_kernels.chunked_gla._math_per_key import SUB

F32 = jnp.float32


def v_tile(vp: int) -> int:
    return min(vp, 64)


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def forward(q, k, v, b, seg, state0, *, chunk: int, scale: float, interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    b_col, b_row = b[..., None], b[:, None, :]
    seg_col, seg_row = seg[..., None], seg[:, None, :]

    def kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, sc_ref, sr_ref, s0_ref, o_ref, sf_ref, st_ref):
        def body(n, state):
            rows = pl.ds(n * chunk, chunk)
            st_ref[pl.ds(n * kp, kp), :] = state
            o, new = forward_chunk(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], bc_ref[rows, :],
                                   br_ref[:, rows], sc_ref[rows, :], sr_ref[:, rows], state, scale)
            o_ref[rows, :] = o.astype(o_ref.dtype)
            return new

        sf_ref[...] = lax.fori_loop(0, nc, body, s0_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(bh, vp // bv),
        in_specs=[whole_qk, whole_qk, whole_v, pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0)), s_spec],
        out_specs=[whole_v, s_spec, pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_fwd",
    )(q, k, v, b_col, b_row, seg_col, seg_row, state0)


def backward(q, k, v, b, seg, states, do, dstate_final, *, chunk: int, scale: float,
             interpret: bool = False):
    """Chunks in reverse in a ``fori_loop`` carrying dS; dq, dk, db summed over V tiles."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    b_col, b_row = b[..., None], b[:, None, :]
    seg_col, seg_row = seg[..., None], seg[:, None, :]
    nv = vp // bv

    def kernel(q_ref, k_ref, v_ref, bc_ref, br_ref, sc_ref, sr_ref, st_ref, do_ref, dsf_ref,
               dq_ref, dk_ref, dv_ref, db_ref, ds0_ref):
        def body(step, dstate):
            n = nc - 1 - step
            rows = pl.ds(n * chunk, chunk)
            dq, dk, dv, db, ds_in = backward_chunk(
                q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], bc_ref[rows, :], br_ref[:, rows],
                sc_ref[rows, :], sr_ref[:, rows], st_ref[pl.ds(n * kp, kp), :], do_ref[rows, :], dstate,
                scale)
            dq_ref[rows, :] = dq
            dk_ref[rows, :] = dk
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)
            db_ref[rows, :] = db
            return ds_in

        ds0_ref[...] = lax.fori_loop(0, nc, body, dsf_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    dq, dk, dv, db, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv),
        in_specs=[whole_qk, whole_qk, whole_v, pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j)), whole_v, s_spec],
        out_specs=[pl.BlockSpec((None, None, tp, kp), lambda i, j: (j, i, 0, 0)),
                   pl.BlockSpec((None, None, tp, kp), lambda i, j: (j, i, 0, 0)), whole_v,
                   pl.BlockSpec((None, None, tp, 1), lambda i, j: (j, i, 0, 0)), s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, 1), F32),
                   jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_bwd",
    )(q, k, v, b_col, b_row, seg_col, seg_row, states, do, dstate_final)
    # The V tiles' shares of dq, dk and db (their sum; equal shapes on every platform).
    return dq.sum(0), dk.sum(0), dv, db.sum(0)[..., 0], dstate0


# ------------------------------------------------------------------------------------------------
# Log decays per key dimension (GLA): b is [BH, Tp, Kp], the chunk totals come as a column
# [BH, NC·Kp, 1]; each chunk is read and written as sub-chunks of 16 rows (``_math_per_key``).


def _sub_rows(start, n_sub):
    return [pl.ds(start + SUB * i, SUB) for i in range(n_sub)]


def forward_per_key(q, k, v, b, total_col, seg, state0, *, chunk: int, scale: float,
                    interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc, n_sub = v_tile(vp), tp // chunk, chunk // SUB
    seg_col, seg_row = seg[..., None], seg[:, None, :]

    def kernel(q_ref, k_ref, v_ref, b_ref, bt_ref, sc_ref, sr_ref, s0_ref, o_ref, sf_ref, st_ref):
        def body(n, state):
            subs = _sub_rows(n * chunk, n_sub)
            st_ref[pl.ds(n * kp, kp), :] = state
            outs, new = per_key.forward_chunk(
                [q_ref[r, :] for r in subs], [k_ref[r, :] for r in subs], [v_ref[r, :] for r in subs],
                [b_ref[r, :] for r in subs], [sc_ref[r, :] for r in subs], [sr_ref[:, r] for r in subs],
                bt_ref[pl.ds(n * kp, kp), :], state, scale)
            for r, o in zip(subs, outs, strict=True):
                o_ref[r, :] = o.astype(o_ref.dtype)
            return new

        sf_ref[...] = lax.fori_loop(0, nc, body, s0_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(bh, vp // bv),
        in_specs=[whole_qk, whole_qk, whole_v, whole_qk,
                  pl.BlockSpec((None, nc * kp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0)), s_spec],
        out_specs=[whole_v, s_spec, pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_per_key_fwd",
    )(q, k, v, b, total_col, seg_col, seg_row, state0)


def backward_per_key(q, k, v, b, total_col, seg, states, do, dstate_final, *, chunk: int, scale: float,
                     interpret: bool = False):
    """Chunks in reverse in a ``fori_loop`` carrying dS; dq, dk, db, dtotal summed over V tiles."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc, n_sub = v_tile(vp), tp // chunk, chunk // SUB
    seg_col, seg_row = seg[..., None], seg[:, None, :]
    nv = vp // bv

    def kernel(q_ref, k_ref, v_ref, b_ref, bt_ref, sc_ref, sr_ref, st_ref, do_ref, dsf_ref,
               dq_ref, dk_ref, dv_ref, db_ref, dbt_ref, ds0_ref):
        def body(step, dstate):
            n = nc - 1 - step
            subs = _sub_rows(n * chunk, n_sub)
            dq, dk, dv, db, dtotal, ds_in = per_key.backward_chunk(
                [q_ref[r, :] for r in subs], [k_ref[r, :] for r in subs], [v_ref[r, :] for r in subs],
                [b_ref[r, :] for r in subs], [sc_ref[r, :] for r in subs], [sr_ref[:, r] for r in subs],
                bt_ref[pl.ds(n * kp, kp), :], st_ref[pl.ds(n * kp, kp), :], [do_ref[r, :] for r in subs],
                dstate, scale)
            for i, r in enumerate(subs):
                dq_ref[r, :] = dq[i]
                dk_ref[r, :] = dk[i]
                dv_ref[r, :] = dv[i].astype(dv_ref.dtype)
                db_ref[r, :] = db[i]
            dbt_ref[pl.ds(n * kp, kp), :] = dtotal
            return ds_in

        ds0_ref[...] = lax.fori_loop(0, nc, body, dsf_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, tp, kp), lambda i, j: (j, i, 0, 0))
    part_total = pl.BlockSpec((None, None, nc * kp, 1), lambda i, j: (j, i, 0, 0))
    dq, dk, dv, db, dtotal, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv),
        in_specs=[whole_qk, whole_qk, whole_v, whole_qk,
                  pl.BlockSpec((None, nc * kp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0)),
                  pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j)), whole_v, s_spec],
        out_specs=[part_qk, part_qk, whole_v, part_qk, part_total, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((nv, bh, nc * kp, 1), F32), jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_per_key_bwd",
    )(q, k, v, b, total_col, seg_col, seg_row, states, do, dstate_final)
    # The V tiles' shares of dq, dk, db and the totals' gradient.
    return dq.sum(0), dk.sum(0), dv, db.sum(0), dtotal.sum(0), dstate0


# ------------------------------------------------------------------------------------------------
# mLSTM's max-stabilised form (``_math_stabilised``): query and key log weights α, β [BH, Tp] and the
# stabiliser entering each chunk, mu [BH, NC].


def forward_stabilised(q, k, v, a, beta, mu, seg, state0, *, chunk: int, scale: float,
                       interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk

    def kernel(q_ref, k_ref, v_ref, a_ref, bc_ref, br_ref, mu_ref, sc_ref, sr_ref, s0_ref, o_ref, sf_ref,
               st_ref):
        def body(n, state):
            rows = pl.ds(n * chunk, chunk)
            st_ref[pl.ds(n * kp, kp), :] = state
            o, new = stabilised.forward_chunk(
                q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], a_ref[rows, :], bc_ref[rows, :],
                br_ref[:, rows], mu_ref[pl.ds(n, 1), :], sc_ref[rows, :], sr_ref[:, rows], state, scale)
            o_ref[rows, :] = o.astype(o_ref.dtype)
            return new

        sf_ref[...] = lax.fori_loop(0, nc, body, s0_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    col = pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0))
    row = pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(bh, vp // bv),
        in_specs=[whole_qk, whole_qk, whole_v, col, col, row,
                  pl.BlockSpec((None, nc, 1), lambda i, j: (i, 0, 0)), col, row, s_spec],
        out_specs=[whole_v, s_spec, pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_stabilised_fwd",
    )(q, k, v, a[..., None], beta[..., None], beta[:, None, :], mu[..., None], seg[..., None],
      seg[:, None, :], state0)


def backward_stabilised(q, k, v, a, beta, mu, seg, states, do, dstate_final, *, chunk: int, scale: float,
                        interpret: bool = False):
    """Chunks in reverse carrying dS; dq, dk, dα, dβ, dmu summed over V tiles."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    nv = vp // bv

    def kernel(q_ref, k_ref, v_ref, a_ref, bc_ref, br_ref, mu_ref, sc_ref, sr_ref, st_ref, do_ref, dsf_ref,
               dq_ref, dk_ref, dv_ref, da_ref, dbeta_ref, dmu_ref, ds0_ref):
        def body(step, dstate):
            n = nc - 1 - step
            rows = pl.ds(n * chunk, chunk)
            dq, dk, dv, da, dbeta, dmu, ds_in = stabilised.backward_chunk(
                q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], a_ref[rows, :], bc_ref[rows, :],
                br_ref[:, rows], mu_ref[pl.ds(n, 1), :], sc_ref[rows, :], sr_ref[:, rows],
                st_ref[pl.ds(n * kp, kp), :], do_ref[rows, :], dstate, scale)
            dq_ref[rows, :] = dq
            dk_ref[rows, :] = dk
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)
            da_ref[rows, :] = da
            dbeta_ref[rows, :] = dbeta
            dmu_ref[pl.ds(n, 1), :] = dmu
            return ds_in

        ds0_ref[...] = lax.fori_loop(0, nc, body, dsf_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    col = pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0))
    row = pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, tp, kp), lambda i, j: (j, i, 0, 0))
    part_col = pl.BlockSpec((None, None, tp, 1), lambda i, j: (j, i, 0, 0))
    part_mu = pl.BlockSpec((None, None, nc, 1), lambda i, j: (j, i, 0, 0))
    dq, dk, dv, da, dbeta, dmu, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv),
        in_specs=[whole_qk, whole_qk, whole_v, col, col, row,
                  pl.BlockSpec((None, nc, 1), lambda i, j: (i, 0, 0)), col, row,
                  pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j)), whole_v, s_spec],
        out_specs=[part_qk, part_qk, whole_v, part_col, part_col, part_mu, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, 1), F32),
                   jax.ShapeDtypeStruct((nv, bh, tp, 1), F32), jax.ShapeDtypeStruct((nv, bh, nc, 1), F32),
                   jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_gla_stabilised_bwd",
    )(q, k, v, a[..., None], beta[..., None], beta[:, None, :], mu[..., None], seg[..., None],
      seg[:, None, :], states, do, dstate_final)
    return (dq.sum(0), dk.sum(0), dv, da.sum(0)[..., 0], dbeta.sum(0)[..., 0], dmu.sum(0)[..., 0],
            dstate0)
