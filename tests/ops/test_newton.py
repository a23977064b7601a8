"""``nonlinear.apply(mode="newton")``: DEER / ParaRNN Newton iterations against the sequential scan.

References: ``nonlinear.reference`` (a Python loop of the cell) for a generic pytree-state cell, and
``mode="sequential"`` of the models (itself tested against its loop in tests/ops/test_nonlinear.py
and by the harness). Values and gradients (params, inputs, initial state, reset state) must agree
within 1e-5 relative at convergence, with resets and reversed time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.ops import newton, nonlinear

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN, D = 2, 11, 3, 4
RESET = np.zeros((B, T), bool)
RESET[0, 5] = True
RESET[1, [0, 7, 8]] = True


def _close(got, want, rtol=1e-5, what=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=what)


# A cell whose state is a pytree of two leaves with different shapes, coupled through a matrix: its
# Jacobian is dense, and the engine must flatten and restore the state itself.
def pair_cell(params, h, x):
    a, b = h["a"], h["b"]                                      # [M, D], [M, 2, 2]
    joined = jnp.concatenate([a, b.reshape(a.shape[0], 4)], axis=-1)
    pre = x @ params["w_in"] + joined @ params["w_rec"] + params["bias"]
    a_new = jnp.tanh(pre[:, :D])
    b_new = 0.5 * b + 0.5 * jax.nn.sigmoid(pre[:, D:]).reshape(b.shape)
    return {"a": a_new, "b": b_new}, a_new * 2.0


def _pair_problem(seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    params = {"w_in": jax.random.normal(keys[0], (D_IN, D + 4)) / np.sqrt(D_IN),
              "w_rec": jax.random.normal(keys[1], (D + 4, D + 4)) * 0.6,
              "bias": 0.1 * jax.random.normal(keys[2], (D + 4,))}
    xs = jax.random.normal(keys[3], (B, T, D_IN))
    h0 = {"a": jax.random.uniform(keys[4], (B, D), minval=-0.5, maxval=0.5),
          "b": jax.random.uniform(keys[5], (B, 2, 2), minval=0.1, maxval=0.5)}
    fresh = jax.tree.map(lambda h: 0.3 + 0 * h[0], h0)
    fresh = jax.tree.map(lambda f, h: jnp.broadcast_to(f, h.shape), fresh, h0)
    return params, xs, h0, fresh


def _loss(run):
    def loss(params, xs, h0, fresh):
        ys, final = run(params, xs, h0, fresh)[:2]
        return jnp.sum(jnp.sin(ys) * jnp.arange(T)[None, :, None]) + sum(
            jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final))
    return loss


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_generic_cell_values_and_gradients_equal_the_loop(reverse, jacobian):
    params, xs, h0, fresh = _pair_problem()
    options = newton.NewtonOptions(jacobian=jacobian)

    def run_newton(p, x, h, f):
        return nonlinear.apply(pair_cell, p, x, initial_state=h, reset=RESET, reverse=reverse, mode="newton",
                               reset_state=f, newton=options)

    def run_loop(p, x, h, f):
        return nonlinear.reference(pair_cell, p, x, initial_state=h, reset=RESET, reverse=reverse,
                                   reset_state=f)

    args = (params, xs, h0, fresh)
    _close(jax.jit(run_newton)(*args), jax.jit(run_loop)(*args), what="values")
    got = jax.jit(jax.grad(_loss(run_newton), argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(_loss(run_loop), argnums=(0, 1, 2, 3)))(*args)
    _close(got, want, what="gradients")


@pytest.mark.parametrize("name, config", [
    ("elman", {"recurrence": "diagonal"}),
    ("gru", {"recurrence": "diagonal"}),
    ("gru", {"recurrence": "diagonal", "reset_after": True}),
    ("lstm", {"recurrence": "diagonal"}),
    ("lstm", {"recurrence": "diagonal", "variant": "np"}),
], ids=["elman-diag", "paragru", "paragru-reset-after", "paralstm", "paralstm-np"])
def test_diagonal_recurrence_cells_equal_sequential(name, config):
    """ParaRNN's cells declare a diagonal (or 2x2 block) Jacobian; Newton on it equals the scan."""
    rec = zoo.get(name, d_model=D, **config)
    params = rec.init(jax.random.key(1), D_IN)
    xs = jax.random.normal(jax.random.key(2), (B, T, D_IN))
    h0 = jax.tree.map(lambda h: h + 0.2, rec.initial_state(params, B))

    def loss(mode, reverse):
        def f(p, x, h):
            ys, final = rec.apply(p, x, h, reset=RESET, mode=mode, reverse=reverse)
            return jnp.sum(jnp.sin(ys) * jnp.arange(T)[None, :, None]) + sum(
                jnp.sum(jnp.cos(v)) for v in jax.tree.leaves(final))
        return f

    for reverse in (False, True):
        _close(rec.apply(params, xs, h0, reset=RESET, mode="newton", reverse=reverse),
               rec.apply(params, xs, h0, reset=RESET, mode="sequential", reverse=reverse))
        _close(jax.grad(loss("newton", reverse), argnums=(0, 1, 2))(params, xs, h0),
               jax.grad(loss("sequential", reverse), argnums=(0, 1, 2))(params, xs, h0))


@pytest.mark.parametrize("name, config", [("gru", {"recurrence": "diagonal"}),
                                          ("lstm", {"recurrence": "diagonal"}),
                                          ("slstm", {"n_heads": 2})], ids=["paragru", "paralstm", "slstm"])
def test_declared_blocks_are_the_whole_jacobian(name, config, monkeypatch):
    """A declared structure that left out a coupling would still converge (every Jacobian does, in
    at most T steps) but not quadratically. So the model's own structure must take exactly as many
    iterations as a dense solve of the same cell, and give the same trajectory."""
    iterations = {}
    original = nonlinear.apply

    def recording(structure_override):
        def apply(*args, **kwargs):
            if structure_override is not None:
                kwargs["structure"] = structure_override
            ys, final, diag = original(*args, return_diagnostics=True, **kwargs)
            jax.debug.callback(lambda it: iterations.setdefault(structure_override, int(it)), diag.iterations)
            return ys, final
        return apply

    xs = jax.random.normal(jax.random.key(4), (B, 24, D_IN))
    outputs = {}
    for override in (None, "dense"):
        monkeypatch.setattr(nonlinear, "apply", recording(override))
        rec = zoo.get(name, d_model=D if name != "slstm" else 8, **config)
        params = rec.init(jax.random.key(3), D_IN)
        outputs[override] = jax.block_until_ready(rec.apply(params, xs, mode="newton"))
    monkeypatch.setattr(nonlinear, "apply", original)
    _close(outputs[None], outputs["dense"])
    _close(outputs[None], rec.apply(params, xs, mode="sequential"))
    assert iterations[None] == iterations["dense"], iterations
    assert iterations[None] < 24 // 2, iterations       # quadratic, far from the T-step worst case


def test_diagnostics_report_convergence_and_the_trajectory():
    params, xs, h0, fresh = _pair_problem(1)
    ys, final, diag = jax.jit(lambda p, x, h: nonlinear.apply(
        pair_cell, p, x, initial_state=h, reset=RESET, mode="newton", return_diagnostics=True))(
        params, xs, h0)
    assert bool(diag.converged)
    assert 1 <= int(diag.iterations) <= T
    assert float(diag.residual) <= 1e-6
    # The trajectory is the sequence of states: its last step is the final state, and a warm start
    # from it needs no further iteration.
    _, want_final = nonlinear.reference(pair_cell, params, xs, initial_state=h0, reset=RESET)
    _close(jax.tree.map(lambda t: t[:, -1], diag.trajectory), want_final)
    _close(final, want_final)
    _, _, warm = nonlinear.apply(pair_cell, params, xs, initial_state=h0, reset=RESET, mode="newton",
                                 initial_guess=diag.trajectory, return_diagnostics=True)
    assert int(warm.iterations) == 0 and bool(warm.converged)


def test_vmap_over_an_extra_axis_equals_a_loop():
    params, xs, h0, _ = _pair_problem(6)
    stacked = jnp.stack([xs, 0.5 * xs, -xs])
    run = lambda x: nonlinear.apply(pair_cell, params, x, initial_state=h0, reset=RESET, mode="newton")
    got = jax.jit(jax.vmap(run))(stacked)
    # The loop is traced once per row inside one jit: an independent reference for each row.
    loop = jax.jit(lambda x: [nonlinear.reference(pair_cell, params, x[i], initial_state=h0, reset=RESET)
                              for i in range(3)])(stacked)
    for i in range(3):
        _close(jax.tree.map(lambda g, i=i: g[i], got), loop[i])


def test_quasi_newton_takes_more_iterations_than_full_newton_but_reaches_the_same_point():
    rec = zoo.get("gru", d_model=6)
    params = rec.init(jax.random.key(5), D_IN)
    xs = jax.random.normal(jax.random.key(6), (B, 24, D_IN))
    h0 = rec.initial_state(params, B)
    cell_apply = lambda jac: nonlinear.apply(
        _gru_cell, params, xs, initial_state=h0, mode="newton",
        newton=newton.NewtonOptions(jacobian=jac), return_diagnostics=True)
    ys_full, _, full = cell_apply("full")
    ys_quasi, _, quasi = cell_apply("diagonal")
    want, _ = rec.apply(params, xs, h0, mode="sequential")
    _close(ys_full, want)
    _close(ys_quasi, want)
    assert bool(full.converged) and bool(quasi.converged)
    assert int(full.iterations) < int(quasi.iterations), (int(full.iterations), int(quasi.iterations))


def _gru_cell(params, h, x):
    """The dense GRU (Cho form, zoo's parameter layout) as a plain callable: the engine's generic path."""
    d = h.shape[-1]
    pre_x = x @ params["w_in"] + params["bias"]
    rz = jax.nn.sigmoid(pre_x[..., :2 * d] + h @ params["w_rec"][:, :2 * d])
    r, z = rz[..., :d], rz[..., d:]
    n = jnp.tanh(pre_x[..., 2 * d:] + (r * h) @ params["w_rec"][:, 2 * d:])
    h_new = (1 - z) * n + z * h
    return h_new, h_new


def test_non_convergence_warns_and_is_reported_not_hidden():
    params, xs, h0, _ = _pair_problem(2)
    run = jax.jit(lambda p: nonlinear.apply(pair_cell, p, xs, initial_state=h0, mode="newton",
                                            newton=newton.NewtonOptions(max_iters=1),
                                            return_diagnostics=True))
    with pytest.warns(newton.NewtonWarning, match="did not converge"):
        _, _, diag = run(params)
        jax.block_until_ready(diag)
    assert not bool(diag.converged) and int(diag.iterations) == 1 and float(diag.residual) > 1e-6


def test_a_nan_parameter_stops_the_iteration_and_is_reported():
    params, xs, h0, _ = _pair_problem(3)
    params = dict(params, bias=params["bias"].at[0].set(jnp.nan))
    with pytest.warns(newton.NewtonWarning):
        ys, _, diag = nonlinear.apply(pair_cell, params, xs, initial_state=h0, mode="newton",
                                      return_diagnostics=True)
        jax.block_until_ready(ys)
    assert not bool(diag.converged)
    assert int(diag.iterations) == 0                     # no step with a non-finite residual is taken
    assert np.isnan(np.asarray(ys)).any()                # and the NaN is visible, never hidden


def test_damping_and_backtracking_reach_the_same_solution():
    params, xs, h0, _ = _pair_problem(4)
    want, _ = nonlinear.reference(pair_cell, params, xs, initial_state=h0)
    iterations = {}
    for damping, backtrack in [(1.0, 0), (0.5, 0), (1.0, 3)]:
        ys, _, diag = nonlinear.apply(pair_cell, params, xs, initial_state=h0, mode="newton",
                                      newton=newton.NewtonOptions(damping=damping, backtrack=backtrack,
                                                                  max_iters=200),
                                      return_diagnostics=True)
        assert bool(diag.converged)
        _close(ys, want)
        iterations[damping, backtrack] = int(diag.iterations)
    assert iterations[0.5, 0] > iterations[1.0, 0]       # half steps converge linearly, not quadratically


@pytest.mark.parametrize("mode", ["sequential", "associative"])
@pytest.mark.parametrize("elementwise", [True, False], ids=["diagonal", "blocks"])
def test_linear_solves_equal_a_float64_loop(mode, elementwise, reverse=False):
    rng = np.random.default_rng(0)
    shape = (B, T, 3, 1) if elementwise else (B, T, 3, 2, 2)
    a = rng.uniform(-1, 1, shape).astype(np.float32)
    b = rng.normal(size=(B, T, 3, 1 if elementwise else 2)).astype(np.float32)
    z0 = rng.normal(size=(B, 3, 1 if elementwise else 2)).astype(np.float32)
    for reverse in (False, True):
        got = newton.solve_linear(jnp.asarray(a), jnp.asarray(b), jnp.asarray(z0), elementwise=elementwise,
                                  mode=mode, reverse=reverse)
        z = z0.astype(np.float64)
        want = np.zeros(b.shape)
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            z = a[:, t] * z + b[:, t] if elementwise else np.einsum("bkij,bkj->bki", a[:, t], z) + b[:, t]
            want[:, t] = z
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_associative_linear_mode_gives_the_same_newton_solution():
    params, xs, h0, fresh = _pair_problem(5)
    got = nonlinear.apply(pair_cell, params, xs, initial_state=h0, reset=RESET, mode="newton",
                          newton=newton.NewtonOptions(linear_mode="associative"))
    _close(got, nonlinear.reference(pair_cell, params, xs, initial_state=h0, reset=RESET))


def test_newton_options_context_applies_to_model_calls():
    rec = zoo.get("elman", d_model=D)
    params = rec.init(jax.random.key(0), D_IN)
    xs = jax.random.normal(jax.random.key(1), (B, T, D_IN))
    seen = []
    with nonlinear.newton_options(max_iters=1, warn=False, callback=lambda *stats: seen.append(stats)):
        ys_one, _ = jax.jit(lambda p: rec.apply(p, xs, mode="newton"))(params)
        jax.block_until_ready(ys_one)
    ys, _ = rec.apply(params, xs, mode="newton")
    want, _ = rec.apply(params, xs, mode="sequential")
    _close(ys, want)
    assert float(jnp.max(jnp.abs(ys_one - want))) > 1e-3   # one iteration is not the solution
    (iterations, residual, converged), = seen
    assert int(iterations) == 1 and not bool(converged) and float(residual) > 1e-6


def test_bad_arguments_raise_clear_errors():
    params, xs, h0, _ = _pair_problem()
    kwargs = dict(initial_state=h0)
    for bad, match in [({"max_iters": 0}, "max_iters"), ({"tol": -1.0}, "tol"),
                       ({"jacobian": "exact"}, "jacobian"),
                       ({"damping": 0.0}, "damping"), ({"backtrack": -1}, "backtrack"),
                       ({"linear_mode": "fast"}, "linear_mode")]:
        with pytest.raises(ValueError, match=match):
            newton.NewtonOptions(**bad)
    with pytest.raises(ValueError, match="mode='newton' only"):
        nonlinear.apply(pair_cell, params, xs, mode="sequential", return_diagnostics=True, **kwargs)
    with pytest.raises(ValueError, match="initial_guess"):
        nonlinear.apply(pair_cell, params, xs, mode="newton", initial_guess=h0, **kwargs)
    with pytest.raises(ValueError, match="structure"):
        nonlinear.apply(pair_cell, params, xs, mode="newton", structure="banded", **kwargs)
    with pytest.raises(TypeError, match="NewtonOptions"):
        nonlinear.apply(pair_cell, params, xs, mode="newton", newton={"max_iters": 3}, **kwargs)
