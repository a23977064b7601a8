"""Chunked delta rule on Mosaic TPU: grid (batch·head, V tiles, chunks), chunk axis sequential
("arbitrary") with the [K, V-tile] float32 state in VMEM scratch (the backward carries dS there).
V tiles are independent (the delta rule acts on the state's columns separately). Layouts (prepared
by ``__init__``)::

    q, k [BH, Tp, Kp]   v [BH, Tp, Vp]   beta, b, seg: columns [BH, Tp, 1], rows [BH, NC, 1, C]
    state [BH, Kp, Vp]  states (each chunk's entering state) [BH, NC·Kp, Vp] float32

Kp, Vp are powers of two >= 16 (so multiples of 8); a V tile is Vp or 128; C a multiple of 8 (the
rows are cut per chunk so that their block's last two dims equal the array's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunked_delta._math import backward_chunk, forward_chunk

F32 = jnp.float32


def v_tile(vp: int) -> int:
    return min(vp, 128)


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _scalars(beta, b, seg, chunk):
    """(beta, b, seg) interleaved as (column [BH, Tp, 1], row [BH, NC, 1, C]) pairs."""
    bh, tp = beta.shape
    out = []
    for x in (beta, b, seg):
        out += [x[..., None], x.reshape(bh, tp // chunk, 1, chunk)]
    return out


def _scalar_specs(chunk, chunk_index):
    col = pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, chunk_index(n), 0))
    row = pl.BlockSpec((None, None, 1, chunk), lambda i, j, n: (i, chunk_index(n), 0, 0))
    return [col, row] * 3


def forward(q, k, v, beta, b, seg, state0, *, chunk: int, scale: float, interpret: bool = False):
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs, (s0_ref, o_ref, sf_ref, st_ref, s_scr) = refs[:6], refs[6:]
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        state = s_scr[...]
        st_ref[...] = state
        o, new = forward_chunk(q_ref[...], k_ref[...], v_ref[...], *(r[...] for r in scalar_refs), state,
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
        in_specs=[qk_spec, qk_spec, v_spec, *_scalar_specs(chunk, lambda n: n), s_spec],
        out_specs=[v_spec, s_spec, pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, n, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((bh, kp, vp), F32),
                   jax.ShapeDtypeStruct((bh, nc * kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_delta_fwd",
    )(q, k, v, *_scalars(beta, b, seg, chunk), state0)


def backward(q, k, v, beta, b, seg, states, do, dstate_final, *, chunk: int, scale: float,
             interpret: bool = False):
    """Reverse pass over chunks carrying dS in VMEM. dq, dk, dbeta, db come per V tile ([NV, ...]) and
    are summed here."""
    bh, tp, kp = q.shape
    vp = v.shape[-1]
    bv, nc = v_tile(vp), tp // chunk
    nv = vp // bv

    def rev(n):
        return nc - 1 - n

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs = refs[:6]
        st_ref, do_ref, dsf_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, db_ref, ds0_ref, ds_scr = refs[6:]
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            ds_scr[...] = dsf_ref[...]

        dq, dk, dv, dbeta, db, ds_in = backward_chunk(
            q_ref[...], k_ref[...], v_ref[...], *(r[...] for r in scalar_refs), st_ref[...], do_ref[...],
            ds_scr[...], scale)
        dq_ref[...] = dq
        dk_ref[...] = dk
        dv_ref[...] = dv.astype(dv_ref.dtype)
        dbeta_ref[...] = dbeta
        db_ref[...] = db
        ds_scr[...] = ds_in

        @pl.when(n == nc - 1)
        def _():
            ds0_ref[...] = ds_in

    qk_spec = pl.BlockSpec((None, chunk, kp), lambda i, j, n: (i, rev(n), 0))
    v_spec = pl.BlockSpec((None, chunk, bv), lambda i, j, n: (i, rev(n), j))
    s_spec = pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, 0, j))
    part_qk = pl.BlockSpec((None, None, chunk, kp), lambda i, j, n: (j, i, rev(n), 0))
    part_col = pl.BlockSpec((None, None, chunk, 1), lambda i, j, n: (j, i, rev(n), 0))
    dq, dk, dv, dbeta, db, dstate0 = pl.pallas_call(
        kernel,
        grid=(bh, nv, nc),
        in_specs=[qk_spec, qk_spec, v_spec, *_scalar_specs(chunk, rev),
                  pl.BlockSpec((None, kp, bv), lambda i, j, n: (i, rev(n), j)), v_spec, s_spec],
        out_specs=[part_qk, part_qk, v_spec, part_col, part_col, s_spec],
        out_shape=[jax.ShapeDtypeStruct((nv, bh, tp, kp), F32), jax.ShapeDtypeStruct((nv, bh, tp, kp), F32),
                   jax.ShapeDtypeStruct((bh, tp, vp), v.dtype), jax.ShapeDtypeStruct((nv, bh, tp, 1), F32),
                   jax.ShapeDtypeStruct((nv, bh, tp, 1), F32), jax.ShapeDtypeStruct((bh, kp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((kp, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="chunked_delta_bwd",
    )(q, k, v, *_scalars(beta, b, seg, chunk), states, do, dstate_final)
    # The V tiles' shares of dq, dk, dbeta and db (their sum; equal shapes on every platform).
    return dq.sum(0), dk.sum(0), dv, dbeta.sum(0)[..., 0], db.sum(0)[..., 0], dstate0
