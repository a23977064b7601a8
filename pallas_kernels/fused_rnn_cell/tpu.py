"""Fused RNN cells on Mosaic TPU: grid (batch tiles "parallel", time blocks "arbitrary"); the state
(its cotangent in the backward pass) lives in VMEM scratch across the time axis, and W_rec's block is
the whole array with a constant index map, so it is copied into VMEM once per batch tile and stays
there. Layouts as in ``gpu.py``::

    x [Tp, G, Bp, Dp]   w [G, Dp, Dp]   params [P, 1, Dp]   state [S, Bp, Dp]   keep [Tp, Bp, 1]

Blocks: x [Tc, G, bb, Dp], hs [Tc, bb, Dp], keep [Tc, bb, 1]: the last two dims are (bb, Dp) with bb a
multiple of 8 and Dp the whole (padded) width, and time a leading axis indexed inside the block by a
``fori_loop``. Steps past the true length (padding of the last block) leave the state unchanged and
contribute nothing to the gradients. The backward pass walks the time blocks in reverse through the
index maps and accumulates dW [G, Dp, Dp] float32 in VMEM scratch, written once per batch tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.fused_rnn_cell._math import BACKWARD, FORWARD, SPECS, dot

F32 = jnp.float32


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _weights(w_ref):
    dtype = w_ref.dtype
    rec = lambda a, g: dot(a.astype(dtype), w_ref[g])
    rec_t = lambda d, g: dot(d.astype(dtype), w_ref[g], 1, 1)
    return rec, rec_t


def forward(x, w, params, state0, keep, *, cell: str, time: int, save: bool, forget_gate: str = "sigmoid",
            batch_block: int, time_block: int, interpret: bool = False):
    tp, gates, bp, dp = x.shape
    states, n_params = SPECS[cell].states, SPECS[cell].params
    bb, tc = batch_block, time_block
    nt = tp // tc
    step = functools.partial(FORWARD[cell], forget_gate=forget_gate)

    def kernel(x_ref, w_ref, p_ref, s0_ref, keep_ref, hs_ref, sf_ref, *rest):
        *st_ref, s_scr = rest
        n = pl.program_id(1)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        rec, _ = _weights(w_ref)
        par = [p_ref[k] for k in range(n_params)]

        def body(t, state):
            kept = keep_ref[t] > 0.0
            state = tuple(jnp.where(kept, s, 0.0) for s in state)
            if save:
                for k in range(states):
                    st_ref[0][t, k] = state[k]
            new, y = step([x_ref[t, g].astype(F32) for g in range(gates)], state, par, rec)
            hs_ref[t] = y.astype(hs_ref.dtype)
            valid = n * tc + t < time
            return tuple(jnp.where(valid, a, b) for a, b in zip(new, state, strict=True))

        final = lax.fori_loop(0, tc, body, tuple(s_scr[k] for k in range(states)))
        for k in range(states):
            s_scr[k] = final[k]

        @pl.when(n == nt - 1)
        def _():
            sf_ref[...] = s_scr[...]

    s_spec = pl.BlockSpec((states, bb, dp), lambda i, n: (0, i, 0))
    out_specs = [pl.BlockSpec((tc, bb, dp), lambda i, n: (n, i, 0)), s_spec]
    out_shape = [jax.ShapeDtypeStruct((tp, bp, dp), x.dtype), jax.ShapeDtypeStruct((states, bp, dp), F32)]
    if save:
        out_specs.append(pl.BlockSpec((tc, states, bb, dp), lambda i, n: (n, 0, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((tp, states, bp, dp), F32))
    out = pl.pallas_call(
        kernel,
        grid=(bp // bb, nt),
        in_specs=[pl.BlockSpec((tc, gates, bb, dp), lambda i, n: (n, 0, i, 0)),
                  pl.BlockSpec((gates, dp, dp), lambda i, n: (0, 0, 0)),
                  pl.BlockSpec((n_params, 1, dp), lambda i, n: (0, 0, 0)), s_spec,
                  pl.BlockSpec((tc, bb, 1), lambda i, n: (n, i, 0))],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((states, bb, dp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name=f"fused_{cell}_fwd",
    )(x, w, params, state0, keep)
    return out if save else (*out, None)


def backward(x, w, params, states_in, keep, dhs, dstate_final, *, cell: str, time: int,
             forget_gate: str = "sigmoid", batch_block: int, time_block: int, interpret: bool = False):
    """Same results as ``gpu.backward``."""
    tp, gates, bp, dp = x.shape
    states, n_params = SPECS[cell].states, SPECS[cell].params
    bb, tc = batch_block, time_block
    nb, nt = bp // bb, tp // tc
    step = functools.partial(BACKWARD[cell], forget_gate=forget_gate)
    wdt = w.dtype

    def kernel(x_ref, w_ref, p_ref, st_ref, keep_ref, dhs_ref, dsf_ref, dx_ref, dw_ref, dp_ref, ds0_ref,
               ds_scr, dw_scr, dp_scr):
        n = pl.program_id(1)
        block = nt - 1 - n

        @pl.when(n == 0)
        def _():
            ds_scr[...] = dsf_ref[...]
            dw_scr[...] = jnp.zeros_like(dw_scr)
            dp_scr[...] = jnp.zeros_like(dp_scr)

        rec, rec_t = _weights(w_ref)
        par = [p_ref[k] for k in range(n_params)]

        def body(s, d_state):
            t = tc - 1 - s
            valid = block * tc + t < time
            state = tuple(st_ref[t, k] for k in range(states))
            d_new = (d_state[0] + dhs_ref[t].astype(F32),) + tuple(d_state[1:])
            da, d_in, pairs, dpar_t = step([x_ref[t, g].astype(F32) for g in range(gates)], state, par,
                                         d_new, rec, rec_t)
            da = [jnp.where(valid, d, 0.0) for d in da]
            for g in range(gates):
                dx_ref[t, g] = da[g].astype(dx_ref.dtype)
                a, e = pairs[g]
                e = jnp.where(valid, e, 0.0)
                dw_scr[g] = dw_scr[g] + dot(a.astype(wdt), e.astype(wdt), 0, 0)
            for k in range(n_params):
                dp_scr[k] = dp_scr[k] + jnp.where(valid, dpar_t[k], 0.0)
            kept = keep_ref[t] > 0.0
            return tuple(jnp.where(valid, jnp.where(kept, d, 0.0), old)
                         for d, old in zip(d_in, d_state, strict=True))

        d_state = lax.fori_loop(0, tc, body, tuple(ds_scr[k] for k in range(states)))
        for k in range(states):
            ds_scr[k] = d_state[k]

        @pl.when(n == nt - 1)
        def _():
            ds0_ref[...] = ds_scr[...]
            dw_ref[...] = dw_scr[...]
            dp_ref[...] = dp_scr[...]

    rev = lambda n: nt - 1 - n
    s_spec = pl.BlockSpec((states, bb, dp), lambda i, n: (0, i, 0))
    x_spec = pl.BlockSpec((tc, gates, bb, dp), lambda i, n: (rev(n), 0, i, 0))
    dx, dw, dpar, ds0 = pl.pallas_call(
        kernel,
        grid=(nb, nt),
        in_specs=[x_spec,
                  pl.BlockSpec((gates, dp, dp), lambda i, n: (0, 0, 0)),
                  pl.BlockSpec((n_params, 1, dp), lambda i, n: (0, 0, 0)),
                  pl.BlockSpec((tc, states, bb, dp), lambda i, n: (rev(n), 0, i, 0)),
                  pl.BlockSpec((tc, bb, 1), lambda i, n: (rev(n), i, 0)),
                  pl.BlockSpec((tc, bb, dp), lambda i, n: (rev(n), i, 0)), s_spec],
        out_specs=[x_spec,
                   pl.BlockSpec((None, gates, dp, dp), lambda i, n: (i, 0, 0, 0)),
                   pl.BlockSpec((None, n_params, 1, dp), lambda i, n: (i, 0, 0, 0)), s_spec],
        out_shape=[jax.ShapeDtypeStruct((tp, gates, bp, dp), x.dtype),
                   jax.ShapeDtypeStruct((nb, gates, dp, dp), F32),
                   jax.ShapeDtypeStruct((nb, n_params, 1, dp), F32),
                   jax.ShapeDtypeStruct((states, bp, dp), F32)],
        scratch_shapes=[pltpu.VMEM((states, bb, dp), F32), pltpu.VMEM((gates, dp, dp), F32),
                        pltpu.VMEM((n_params, 1, dp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name=f"fused_{cell}_bwd",
    )(x, w, params, states_in, keep, dhs, dstate_final)
    return dx, dw.sum(0), dpar.sum(0), ds0
