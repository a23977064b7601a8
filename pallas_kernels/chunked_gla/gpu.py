"""Chunked GLA (scalar decay) in Pallas on the Triton backend: grid (batch·head, V tiles), each
program walks the chunks in a ``fori_loop`` carrying the [K, V-tile] float32 state in registers (GPU
programs of one grid cannot pass a carry to each other). Same layouts as ``tpu.py``; Triton needs
power-of-two shapes inside the kernel, which the caller's padding (Kp, Vp, C powers of two) gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunked_gla._math import backward_chunk, forward_chunk

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
