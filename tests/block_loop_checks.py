"""Checks shared by the block tests that compare a whole model block with a float64 numpy loop of
its equations (tests/test_mlstm.py, tests/test_rwkv6.py). Each test module supplies its own loop
(``numpy_step`` for one token, ``numpy_block`` for a sequence) and ``setup`` (random model, params,
inputs and initial state); the comparisons themselves live here once, with the float64 loop of the
short convolution that the delta-rule and GLA block tests share (``short_conv``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def sequential_then_slow(modes):
    """The harness checks every mode against the step loop; the loop of the paper's equations runs in
    the sequential mode by default, and in the other modes with -m slow."""
    return [pytest.param(m, marks=() if m == "sequential" else pytest.mark.slow) for m in modes]


def close(got, want, what):
    """float32 against the float64 loop: rtol 1e-4 and atol 1e-5 of the reference's scale."""
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def check_apply_against_loop(setup, numpy_block, state_names, reset, mode, reverse):
    rec, params, xs, state, c = setup()
    ys, final = jax.jit(rec.apply, static_argnames=("mode", "reverse"))(
        params, xs, state=state, reset=jnp.asarray(reset), mode=mode, reverse=reverse)
    want_ys, want_final = numpy_block(params, c, xs, state, reset, reverse)
    close(ys, want_ys, "outputs")
    for got, want, what in zip(final, want_final, state_names, strict=True):
        close(got, want, what)


def check_float64_apply_against_loop(setup, numpy_block, reset, mode):
    """Under x64 the block computes in float64 (states are still returned as float32): its outputs
    meet the loop's to 1e-10, so even terms as small as the eps constants are checked."""
    rec, params, xs, state, c = setup(seed=3)
    want_ys, _ = numpy_block(params, c, xs, state, reset, reverse=False)
    with jax.enable_x64(True):
        params64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        ys, _ = rec.apply(params64, jnp.asarray(xs, jnp.float64), state=state, reset=jnp.asarray(reset),
                          mode=mode)
        assert ys.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(ys), want_ys, rtol=1e-10, atol=1e-10 * np.max(np.abs(want_ys)))


def check_step_against_loop(setup, numpy_step, state_names, d_model, steps=4):
    """d_in = d_model: no w_in, the block's residual reads the input itself."""
    rec, params, xs, state, c = setup(seed=1, d_in=d_model)
    assert "w_in" not in params
    step = jax.jit(rec.step)
    want_state = tuple(np.asarray(s, np.float64) for s in state)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for t in range(steps):
        state, y_t = step(params, state, xs[:, t])
        want_state, want = numpy_step(p, c, want_state, np.asarray(xs[:, t], np.float64))
        close(y_t, want, f"step {t}")
    for got, want, what in zip(state, want_state, state_names, strict=True):
        close(got, want, what)


def numpy_block_loop(numpy_step, params, c, xs, state, reset, reverse):
    """Run ``numpy_step(p, c, state, x_t) -> (state, y_t)`` over time in float64, with segment resets
    (the fresh state is zeros) in either direction; returns (ys [B, T, c.d_model], final state)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state = tuple(np.asarray(s, np.float64) for s in state)
    xs = np.asarray(xs, np.float64)
    ys = np.zeros((xs.shape[0], xs.shape[1], c.d_model))
    order = range(xs.shape[1] - 1, -1, -1) if reverse else range(xs.shape[1])
    for t in order:
        # A segment starts at t (forwards); backwards, the carry into t belongs to the next segment
        # when t + 1 starts one.
        flag = reset[:, t + 1] if reverse and t + 1 < xs.shape[1] else (None if reverse else reset[:, t])
        if flag is not None:
            state = tuple(np.where(flag.reshape(-1, *[1] * (s.ndim - 1)), 0.0, s) for s in state)
        state, ys[:, t] = numpy_step(p, c, state, xs[:, t])
    return ys, state


def short_conv(u, kernel, bias, window, reset):
    """Causal depthwise convolution, u [B, T, C], kernel [K, C] (last tap on the current input),
    window [B, K-1, C] of the inputs before t = 0; a reset clears the window before step t."""
    ys = np.zeros_like(u)
    window = window.copy()
    for b in range(u.shape[0]):
        for t in range(u.shape[1]):
            if reset[b, t]:
                window[b] = 0.0
            full = np.concatenate([window[b], u[b, t][None]], axis=0)          # [K, C]
            ys[b, t] = np.sum(kernel * full, axis=0) + (0.0 if bias is None else bias)
            window[b] = full[1:]
    return ys, window
