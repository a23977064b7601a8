"""Chunked delta rule in Pallas on the Triton backend: grid (batch·head, V tiles), each program walks
the chunks in a ``fori_loop`` carrying the [K, V-tile] float32 state in registers (GPU programs of one
grid cannot pass a carry to each other). The columns of the state are independent under the delta
rule (S ↦ α (I − β k kᵀ) S + β k vᵀ acts column by column), so V tiles are independent programs; each
recomputes the chunk's (I + A)⁻¹, which depends on the keys only. Triton needs power-of-two shapes
inside the kernel, which the caller's padding (Kp, Vp, C powers of two >= 16) gives.

Layouts (prepared by ``__init__``)::

    q, k [BH, Tp, Kp]   v [BH, Tp, Vp]   beta, b, seg as columns [BH, Tp, 1] and rows [BH, 1, Tp]
    state [BH, Kp, Vp]  states (each chunk's entering state) [BH, NC·Kp, Vp] float32
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunked_delta._math import backward_chunk, forward_chunk

F32 = jnp.float32


def v_tile(vp: int) -> int:
    return min(vp, 64)


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _scalars(beta, b, seg):
    """(columns, rows) of the per-step scalars: [BH, Tp, 1] and [BH, 1, Tp] each."""
    return [x[..., None] for x in (beta, b, seg)], [x[:, None, :] for x in (beta, b, seg)]


def _scalar_specs(tp):
    col = pl.BlockSpec((None, tp, 1), lambda i, j: (i, 0, 0))
    row = pl.BlockSpec((None, 1, tp), lambda i, j: (i, 0, 0))
    return [col, row] * 3


def _load_scalars(refs, rows):
    """The six per-step scalar refs (col, row) x (beta, b, seg) of one chunk, in forward_chunk's order."""
    return [ref[rows, :] if n % 2 == 0 else ref[:, rows] for n, ref in enumerate(refs)]


def forward(q, k, v, beta, b, seg, state0, *, chunk: int, scale: float, interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    cols, rows_ = _scalars(beta, b, seg)
    scalars = [x for pair in zip(cols, rows_, strict=True) for x in pair]

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs, (s0_ref, o_ref, sf_ref, st_ref) = refs[:6], refs[6:]

        def body(n, state):
            rows = pl.ds(n * chunk, chunk)
            st_ref[pl.ds(n * kp, kp), :] = state
            o, new = forward_chunk(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                   *_load_scalars(scalar_refs, rows), state, scale)
            o_ref[rows, :] = o.astype(o_ref.dtype)
            return new

        sf_ref[...] = lax.fori_loop(0, nc, body, s0_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        kernel,
        grid=(bh, vp // bv),
        in_specs=[whole_qk, whole_qk, whole_v, *_scalar_specs(tp), s_spec],
        out_specs=[whole_v, s_spec, pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_delta_fwd",
    )(q, k, v, *scalars, state0)


def backward(q, k, v, beta, b, seg, states, do, dstate_final, *, chunk: int, scale: float,
             interpret: bool = False):
    """Chunks in reverse in a ``fori_loop`` carrying dS; dq, dk, dbeta, db summed over V tiles."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    nv = vp // bv
    cols, rows_ = _scalars(beta, b, seg)
    scalars = [x for pair in zip(cols, rows_, strict=True) for x in pair]

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs = refs[:6]
        st_ref, do_ref, dsf_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, db_ref, ds0_ref = refs[6:]

        def body(step, dstate):
            n = nc - 1 - step
            rows = pl.ds(n * chunk, chunk)
            dq, dk, dv, dbeta, db, ds_in = backward_chunk(
                q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], *_load_scalars(scalar_refs, rows),
                st_ref[pl.ds(n * kp, kp), :], do_ref[rows, :], dstate, scale)
            dq_ref[rows, :] = dq
            dk_ref[rows, :] = dk
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)
            dbeta_ref[rows, :] = dbeta
            db_ref[rows, :] = db
            return ds_in

        ds0_ref[...] = lax.fori_loop(0, nc, body, dsf_ref[...])

    whole_qk = pl.BlockSpec((None, tp, kp), lambda i, j: (i, 0, 0))
    whole_v = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, tp, kp), lambda i, j: (j, i, 0, 0))
    part_col = pl.BlockSpec((None, None, tp, 1), lambda i, j: (j, i, 0, 0))
    dq, dk, dv, dbeta, db, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv),
        in_specs=[whole_qk, whole_qk, whole_v, *_scalar_specs(tp),
                  pl.BlockSpec((None, nc * kp, bv), lambda i, j: (i, 0, j)), whole_v, s_spec],
        out_specs=[part_qk, part_qk, whole_v, part_col, part_col, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, 1), F32),
                   jax.ShapeDtypeStruct((nv, bh, tp, 1), F32), jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_delta_bwd",
    )(q, k, v, *scalars, states, do, dstate_final)
    # The V tiles' shares of dq, dk, dbeta and db (their sum; equal shapes on every platform).
    return dq.sum(0), dk.sum(0), dv, dbeta.sum(0)[..., 0], db.sum(0)[..., 0], dstate0
