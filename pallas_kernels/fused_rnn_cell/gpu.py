"""Fused RNN cells in Pallas on the Triton backend: grid (batch tiles,), each program walks all time
steps in a ``lax.fori_loop`` with its state in registers (GPU programs of one grid cannot hand a
carry to each other). Layouts (prepared by ``__init__``; all sizes powers of two inside the kernel)::

    x [Tp, G, Bp, Dp]   w [G, Dp, Dp]   params [P, 1, Dp]   state [S, Bp, Dp]   keep [Tp, Bp, 1]
    hs [Tp, Bp, Dp]     states (the state entering each step, after its reset) [Tp, S, Bp, Dp]

The recurrent weight is loaded once, before the time loop, when it fits the per-program budget
(``RESIDENT_BYTES``); above it each step reads W_g from global memory (L2) instead. The backward
program walks time in reverse carrying the state cotangent and, when W is resident, the float32 dW
in registers (written once at the end); otherwise dW accumulates into its output block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fused_rnn_cell._math import BACKWARD, FORWARD, SPECS, dot

F32 = jnp.float32
# W (weight dtype) plus, in the backward pass, dW (float32) held by one program: an H100 SM has
# 256 KiB of registers and 228 KiB of shared memory; half of that is left for the rest.
RESIDENT_BYTES = 128 * 1024


def resident(cell: str, dp: int, itemsize: int) -> bool:
    """Whether W (and dW, float32) are held across the time loop rather than re-read each step."""
    return SPECS[cell].gates * dp * dp * (itemsize + 4) <= RESIDENT_BYTES


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _weights(w_ref, gates, hold):
    """rec, rec_t on a resident W (values loaded now) or on the ref (loaded at each use)."""
    held = [w_ref[g] for g in range(gates)] if hold else None
    w = (lambda g: held[g]) if hold else (lambda g: w_ref[g])
    dtype = w_ref.dtype
    rec = lambda a, g: dot(a.astype(dtype), w(g))
    rec_t = lambda d, g: dot(d.astype(dtype), w(g), 1, 1)
    return rec, rec_t


def forward(x, w, params, state0, keep, *, cell: str, time: int, save: bool, forget_gate: str = "sigmoid",
            batch_block: int, interpret: bool = False):
    tp, gates, bp, dp = x.shape
    states, n_params = SPECS[cell].states, SPECS[cell].params
    bb = batch_block
    hold = resident(cell, dp, w.dtype.itemsize)
    step = functools.partial(FORWARD[cell], forget_gate=forget_gate)

    def kernel(x_ref, w_ref, p_ref, s0_ref, keep_ref, hs_ref, sf_ref, *st_ref):
        rec, _ = _weights(w_ref, gates, hold)
        par = [p_ref[k] for k in range(n_params)]

        def body(t, state):
            kept = keep_ref[t] > 0.0
            state = tuple(jnp.where(kept, s, 0.0) for s in state)
            if save:
                for k in range(states):
                    st_ref[0][t, k] = state[k]
            new, y = step([x_ref[t, g].astype(F32) for g in range(gates)], state, par, rec)
            hs_ref[t] = y.astype(hs_ref.dtype)
            return new

        final = lax.fori_loop(0, time, body, tuple(s0_ref[k] for k in range(states)))
        for k in range(states):
            sf_ref[k] = final[k]

    s_spec = pl.BlockSpec((states, bb, dp), lambda i: (0, i, 0))
    out_specs = [pl.BlockSpec((tp, bb, dp), lambda i: (0, i, 0)), s_spec]
    out_shape = [jax.ShapeDtypeStruct((tp, bp, dp), x.dtype), jax.ShapeDtypeStruct((states, bp, dp), F32)]
    if save:
        out_specs.append(pl.BlockSpec((tp, states, bb, dp), lambda i: (0, 0, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((tp, states, bp, dp), F32))
    out = pl.pallas_call(
        kernel,
        grid=(bp // bb,),
        in_specs=[pl.BlockSpec((tp, gates, bb, dp), lambda i: (0, 0, i, 0)),
                  pl.BlockSpec((gates, dp, dp), lambda i: (0, 0, 0)),
                  pl.BlockSpec((n_params, 1, dp), lambda i: (0, 0, 0)), s_spec,
                  pl.BlockSpec((tp, bb, 1), lambda i: (0, i, 0))],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
        name=f"fused_{cell}_fwd",
    )(x, w, params, state0, keep)
    return out if save else (*out, None)


def backward(x, w, params, states_in, keep, dhs, dstate_final, *, cell: str, time: int,
             forget_gate: str = "sigmoid", batch_block: int, interpret: bool = False):
    """Returns dx [Tp, G, Bp, Dp] (x's dtype), dW [G, Dp, Dp], dparams [P, 1, Dp] (float32, summed
    over batch tiles) and the entering state's cotangent [S, Bp, Dp]."""
    tp, gates, bp, dp = x.shape
    states, n_params = SPECS[cell].states, SPECS[cell].params
    bb = batch_block
    nb = bp // bb
    hold = resident(cell, dp, w.dtype.itemsize)
    step = functools.partial(BACKWARD[cell], forget_gate=forget_gate)
    wdt = w.dtype

    def kernel(x_ref, w_ref, p_ref, st_ref, keep_ref, dhs_ref, dsf_ref, dx_ref, dw_ref, dp_ref, ds0_ref):
        rec, rec_t = _weights(w_ref, gates, hold)
        par = [p_ref[k] for k in range(n_params)]
        if not hold:
            for g in range(gates):
                dw_ref[g] = jnp.zeros((dp, dp), F32)

        def body(s, carry):
            d_state, dw, d_par = carry
            t = time - 1 - s
            state = tuple(st_ref[t, k] for k in range(states))
            d_new = (d_state[0] + dhs_ref[t],) + tuple(d_state[1:])
            da, d_in, pairs, dpar_t = step([x_ref[t, g].astype(F32) for g in range(gates)], state, par,
                                         d_new, rec, rec_t)
            for g in range(gates):
                dx_ref[t, g] = da[g].astype(dx_ref.dtype)
            outer = [dot(a.astype(wdt), e.astype(wdt), 0, 0) for a, e in pairs]
            if hold:
                dw = tuple(a + b for a, b in zip(dw, outer, strict=True))
            else:
                for g in range(gates):
                    dw_ref[g] = dw_ref[g] + outer[g]
            kept = keep_ref[t] > 0.0
            d_in = tuple(jnp.where(kept, d, 0.0) for d in d_in)
            return d_in, dw, tuple(a + b for a, b in zip(d_par, dpar_t, strict=True))

        dw0 = tuple(jnp.zeros((dp, dp), F32) for _ in range(gates)) if hold else ()
        dpar0 = tuple(jnp.zeros((1, dp), F32) for _ in range(n_params))
        d_final = tuple(dsf_ref[k] for k in range(states))
        d_state, dw, d_par = lax.fori_loop(0, time, body, (d_final, dw0, dpar0))
        for k in range(states):
            ds0_ref[k] = d_state[k]
        for k in range(n_params):
            dp_ref[k] = d_par[k]
        if hold:
            for g in range(gates):
                dw_ref[g] = dw[g]

    s_spec = pl.BlockSpec((states, bb, dp), lambda i: (0, i, 0))
    dx, dw, dpar, ds0 = pl.pallas_call(
        kernel,
        grid=(nb,),
        in_specs=[pl.BlockSpec((tp, gates, bb, dp), lambda i: (0, 0, i, 0)),
                  pl.BlockSpec((gates, dp, dp), lambda i: (0, 0, 0)),
                  pl.BlockSpec((n_params, 1, dp), lambda i: (0, 0, 0)),
                  pl.BlockSpec((tp, states, bb, dp), lambda i: (0, 0, i, 0)),
                  pl.BlockSpec((tp, bb, 1), lambda i: (0, i, 0)),
                  pl.BlockSpec((tp, bb, dp), lambda i: (0, i, 0)), s_spec],
        out_specs=[pl.BlockSpec((tp, gates, bb, dp), lambda i: (0, 0, i, 0)),
                   pl.BlockSpec((None, gates, dp, dp), lambda i: (i, 0, 0, 0)),
                   pl.BlockSpec((None, n_params, 1, dp), lambda i: (i, 0, 0, 0)), s_spec],
        out_shape=[jax.ShapeDtypeStruct((tp, gates, bp, dp), x.dtype),
                   jax.ShapeDtypeStruct((nb, gates, dp, dp), F32),
                   jax.ShapeDtypeStruct((nb, n_params, 1, dp), F32),
                   jax.ShapeDtypeStruct((states, bp, dp), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name=f"fused_{cell}_bwd",
    )(x, w, params, states_in, keep, dhs, dstate_final)
    # The batch tiles' shares of dW and of the per-channel parameters.
    return dx, dw.sum(0), dpar.sum(0), ds0
