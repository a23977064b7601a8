"""The lstm, gru and slstm models' ``implementation`` config field: "pallas" runs the time loop as
``pallas_kernels.fused_rnn_cell`` (interpret mode on CPU) and equals the nonlinear engine in values
and in gradients of params, inputs and the initial state; what the kernel does not cover runs the
engine with one warning; a bad name is a ValueError."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.ops import _dispatch

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN = 2, 7, 5
CONFIGS = {
    "lstm-vanilla": ("lstm", dict(d_model=8)),
    "lstm-np": ("lstm", dict(d_model=8, variant="np")),
    "gru": ("gru", dict(d_model=8)),
    "gru-reset_after": ("gru", dict(d_model=8, reset_after=True)),
    "slstm": ("slstm", dict(d_model=8, n_heads=2)),
}


def _perturbed(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys, strict=True)])


def _setup(name, config):
    rec = zoo.get(name, **config)
    keys = jax.random.split(jax.random.key(0), 4)
    # Non-zero peepholes and biases (init leaves them zero), so that their paths are compared too.
    params = _perturbed(rec.init(keys[0], D_IN), keys[1])
    xs = jax.random.normal(keys[2], (B, T, D_IN))
    state = rec.initial_state(params, B)
    if name != "slstm":          # sLSTM's n must stay positive; its kernel tests cover n != 0
        state = _perturbed(state, keys[3])
    reset = jnp.zeros((B, T), bool).at[0, 3].set(True)
    return params, xs, state, reset


@pytest.mark.parametrize("case", list(CONFIGS))
def test_pallas_equals_the_engine_in_values_and_gradients(case):
    name, config = CONFIGS[case]
    params, xs, state, reset = _setup(name, config)
    weights = jax.random.normal(jax.random.key(5), (B, T, config["d_model"]))

    def loss(implementation, params, xs, state):
        rec = zoo.get(name, **config, implementation=implementation)
        ys, final = rec.apply(params, xs, state=state, reset=reset)
        return jnp.sum(ys * weights) + sum(jnp.sum(s ** 2) for s in jax.tree.leaves(final)), (ys, final)

    jaxpr = str(jax.make_jaxpr(lambda *a: loss("pallas", *a))(params, xs, state))
    assert "pallas_call" in jaxpr
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: loss("xla", *a))(params, xs, state))
    grad = {impl: jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2),
                                             has_aux=True))(params, xs, state)
            for impl in ("xla", "pallas")}
    (_, (ys_x, final_x)), grads_x = grad["xla"]
    (_, (ys_p, final_p)), grads_p = grad["pallas"]
    np.testing.assert_allclose(ys_p, ys_x, rtol=1e-4, atol=1e-5)
    pairs = zip(jax.tree.leaves((final_p, grads_p)), jax.tree.leaves((final_x, grads_x)), strict=True)
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(want)) + 1e-6))


def test_calls_the_kernel_does_not_cover_run_the_engine_with_one_warning():
    params, xs, state, _ = _setup("lstm", dict(d_model=8))
    _dispatch._warned.clear()
    want = zoo.get("lstm", d_model=8, implementation="xla").apply(params, xs, state=state, reverse=True)
    rec = zoo.get("lstm", d_model=8, implementation="pallas")
    with pytest.warns(UserWarning, match="reverse=True"):
        got = rec.apply(params, xs, state=state, reverse=True)
    np.testing.assert_array_equal(got[0], want[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the second call does not warn again
        rec.apply(params, xs, state=state, reverse=True)
    fgr = zoo.get("lstm", d_model=8, variant="fgr", implementation=("pallas", "xla"))
    fgr_params = fgr.init(jax.random.key(1), D_IN)
    with pytest.warns(UserWarning, match="'fgr' variant"):
        ys, _ = fgr.apply(fgr_params, xs)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda p: fgr.apply(p, xs))(fgr_params))
    assert ys.shape == (B, T, 8)


def test_default_on_cpu_is_the_engine_and_bad_names_raise():
    params, xs, state, _ = _setup("gru", dict(d_model=8))
    rec = zoo.get("gru", d_model=8)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda p: rec.apply(p, xs, state=state))(params))
    for bad in ("triton", ["pallas"], 3):
        with pytest.raises(ValueError, match="implementation"):
            zoo.get("gru", d_model=8, implementation=bad)
