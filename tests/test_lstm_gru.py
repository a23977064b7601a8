"""LSTM (the nine variants of "LSTM: A Search Space Odyssey") and GRU (both conventions).

Every check is against something the model does not share: a per-step loop written here in numpy
float64 from the papers' equations, a closed form that isolates one variant's change, or
torch.nn.LSTM / torch.nn.GRU when the refs extra is installed. Tolerances: the model runs in
float32, so 1e-5 relative (plus 1e-5 absolute for values near zero) over a few steps.
The registry-wide contracts (step fold, jit, vmap, bf16, resets) live in tests/test_harness.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models import lstm as lstm_module

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN, D = 3, 6, 5, 4
TOL = dict(rtol=1e-5, atol=1e-5)
VARIANTS = lstm_module.VARIANTS

# The documented layout, restated here rather than imported, so a change to it fails loudly.
COLUMNS = {"nig": "fzo", "nfg": "izo", "nog": "ifz", "cifg": "izo"}


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def random_params(params, seed, scale=0.6):
    """Every leaf replaced by random values (peepholes and gate recurrence included)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=l.shape) * scale, jnp.float32)
                                        for l in leaves])


def random_state(state, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, jnp.float32), state)


def inputs(seed, time=T):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, time, D_IN)), jnp.float32)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------------------------
# LSTM


def naive_lstm(params, xs, state, variant):
    """Greff et al. (2017), one step at a time in float64."""
    p, s, xs = f64(params), f64(state), np.asarray(xs, np.float64)
    cols = COLUMNS.get(variant, "ifzo")
    h, c = s["h"], s["c"]
    gates_prev = s.get("gates")
    ys = []
    for t in range(xs.shape[1]):
        a = xs[:, t] @ p["w_in"] + h @ p["w_rec"] + p["bias"]
        pre = {g: a[:, k * D:(k + 1) * D] for k, g in enumerate(cols)}
        if variant == "fgr":
            for k, g in enumerate("ifo"):
                pre[g] = pre[g] + gates_prev @ p["w_gate_rec"][:, k * D:(k + 1) * D]
        peep = (lambda g, cell: p[f"peep_{g}"] * cell) if variant != "np" else (lambda g, cell: 0.0)
        i = sigmoid(pre["i"] + peep("i", c)) if "i" in cols else 1.0
        if variant == "cifg":
            f = 1 - i
        else:
            f = sigmoid(pre["f"] + peep("f", c)) if "f" in cols else 1.0
        z = pre["z"] if variant == "niaf" else np.tanh(pre["z"])
        c = z * i + c * f
        o = sigmoid(pre["o"] + peep("o", c)) if "o" in cols else 1.0
        h = o * (c if variant == "noaf" else np.tanh(c))
        if variant == "fgr":
            gates_prev = np.concatenate([i, f, o], axis=-1)
        ys.append(h)
    final = {"h": h, "c": c}
    if variant == "fgr":
        final["gates"] = gates_prev
    return np.stack(ys, axis=1), final


def make_lstm(variant, seed=0):
    rec = zoo.get("lstm", d_model=D, variant=variant)
    params = random_params(rec.init(jax.random.key(seed), D_IN), seed)
    return rec, params


@pytest.mark.parametrize("variant", VARIANTS)
def test_lstm_variant_matches_naive_float64_loop(variant):
    rec, params = make_lstm(variant)
    state = random_state(rec.initial_state(params, B), 1)
    xs = inputs(2)
    ys, final = rec.apply(params, xs, state)
    ys_ref, final_ref = naive_lstm(params, xs, state, variant)
    np.testing.assert_allclose(ys, ys_ref, **TOL)
    for key in final_ref:
        np.testing.assert_allclose(final[key], final_ref[key], **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lstm_gradients_match_float64_loop_gradients(variant):
    """The engine's hand-written backward pass against autodiff of the plain step loop in float64."""
    rec, params = make_lstm(variant, seed=3)
    state = random_state(rec.initial_state(params, B), 4)
    xs = inputs(5)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, D)), jnp.float32)

    def loss_apply(params, xs, state):
        ys, final = rec.apply(params, xs, state)
        return jnp.sum(ys * weights) + jnp.sum(final["c"] ** 2)

    def loss_loop(params, xs, state):
        for t in range(T):
            state, y = rec.step(params, state, xs[:, t])
            if t == 0:
                total = jnp.sum(y * weights[:, t])
            else:
                total = total + jnp.sum(y * weights[:, t])
        return total + jnp.sum(state["c"] ** 2)

    got = jax.grad(loss_apply, argnums=(0, 1, 2))(params, xs, state)
    want = jax.grad(loss_loop, argnums=(0, 1, 2))(params, xs, state)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lstm_parameter_shapes_follow_the_documented_gate_order(variant):
    rec = zoo.get("lstm", d_model=D, variant=variant)
    params = rec.init(jax.random.key(0), D_IN)
    n = len(COLUMNS.get(variant, "ifzo"))
    assert params["w_in"].shape == (D_IN, n * D)
    assert params["w_rec"].shape == (D, n * D)
    assert params["bias"].shape == (n * D,)
    peeps = {k for k in params if k.startswith("peep_")}
    if variant == "np":
        assert peeps == set()
    else:
        assert peeps == {f"peep_{g}" for g in "ifo" if g in COLUMNS.get(variant, "ifzo")}
    assert ("w_gate_rec" in params) == (variant == "fgr")
    cols = COLUMNS.get(variant, "ifzo")
    if "f" in cols:
        k = cols.index("f")
        np.testing.assert_array_equal(params["bias"][k * D:(k + 1) * D], 1.0)
        np.testing.assert_array_equal(np.delete(np.asarray(params["bias"]), np.s_[k * D:(k + 1) * D]), 0.0)
    state_size = zoo.list_models()["lstm"].state_size(d_model=D, variant=variant)
    assert state_size == (5 if variant == "fgr" else 2) * D


def feedforward_gates(variant, seed=0):
    """A model whose gates see only the input (w_rec = 0, peepholes = 0) and a constant input, so
    every gate is one known constant per unit and the cell follows a closed form."""
    rec, params = make_lstm(variant, seed)
    params = {k: (jnp.zeros_like(v) if k == "w_rec" or k.startswith("peep_") else v)
              for k, v in params.items()}
    x = np.random.default_rng(seed + 1).normal(size=(B, D_IN))
    xs = jnp.asarray(np.repeat(x[:, None], T, axis=1), jnp.float32)
    a = x @ np.asarray(params["w_in"], np.float64) + np.asarray(params["bias"], np.float64)
    cols = COLUMNS.get(variant, "ifzo")
    pre = {g: a[:, k * D:(k + 1) * D] for k, g in enumerate(cols)}
    state = random_state(rec.initial_state(params, B), seed + 2)
    return rec, params, xs, state, pre


def test_nfg_cell_accumulates_without_forgetting():
    rec, params, xs, state, pre = feedforward_gates("nfg")
    _, final = rec.apply(params, xs, state)
    # f = 1: c_T = c_0 + T i z.
    expected = np.asarray(state["c"], np.float64) + T * sigmoid(pre["i"]) * np.tanh(pre["z"])
    np.testing.assert_allclose(final["c"], expected, **TOL)


def test_cifg_forget_gate_is_one_minus_input_gate():
    rec, params, xs, state, pre = feedforward_gates("cifg")
    _, final = rec.apply(params, xs, state)
    # c_t = (1 - i) c_{t-1} + i z  ->  c_T = (1 - i)^T c_0 + (1 - (1 - i)^T) z.
    i, z = sigmoid(pre["i"]), np.tanh(pre["z"])
    keep = (1 - i) ** T
    expected = keep * np.asarray(state["c"], np.float64) + (1 - keep) * z
    np.testing.assert_allclose(final["c"], expected, **TOL)


def test_nig_adds_the_whole_block_input():
    rec, params, xs, state, pre = feedforward_gates("nig")
    _, final = rec.apply(params, xs, state)
    # i = 1: c_T = f^T c_0 + z (1 - f^T) / (1 - f).
    f, z = sigmoid(pre["f"]), np.tanh(pre["z"])
    expected = f ** T * np.asarray(state["c"], np.float64) + z * (1 - f ** T) / (1 - f)
    np.testing.assert_allclose(final["c"], expected, **TOL)


def test_niaf_block_input_is_linear_and_unbounded():
    rec, params, xs, state, _ = feedforward_gates("niaf")
    params = dict(params, w_in=params["w_in"] * 8)             # block inputs well outside [-1, 1]
    x = np.asarray(xs[:, 0], np.float64)
    a = x @ np.asarray(params["w_in"], np.float64) + np.asarray(params["bias"], np.float64)
    i, f, z = (sigmoid(a[:, :D]), sigmoid(a[:, D:2 * D]), a[:, 2 * D:3 * D])
    assert np.abs(z).max() > 2
    _, final = rec.apply(params, xs, state)
    expected = f ** T * np.asarray(state["c"], np.float64) + i * z * (1 - f ** T) / (1 - f)
    np.testing.assert_allclose(final["c"], expected, **TOL)


def test_nog_output_is_tanh_of_cell():
    rec, params = make_lstm("nog")
    _, final = rec.apply(params, inputs(7), random_state(rec.initial_state(params, B), 8))
    np.testing.assert_allclose(final["h"], np.tanh(np.asarray(final["c"], np.float64)), **TOL)


@pytest.mark.parametrize("variant", ["vanilla", "noaf"])
def test_output_gate_peeks_at_the_new_cell(variant):
    """o_T = σ(W_o x_T + b_o + p_o ⊙ c_T) with the new cell c_T; "noaf" drops the tanh on c_T."""
    rec, params = make_lstm(variant)
    params = dict(params, w_rec=jnp.zeros_like(params["w_rec"]))
    xs = inputs(9)
    _, final = rec.apply(params, xs, random_state(rec.initial_state(params, B), 10))
    c_T = np.asarray(final["c"], np.float64)
    p = f64(params)
    a = np.asarray(xs[:, -1], np.float64) @ p["w_in"] + p["bias"]
    o = sigmoid(a[:, 3 * D:] + np.asarray(params["peep_o"], np.float64) * c_T)
    phi = c_T if variant == "noaf" else np.tanh(c_T)
    np.testing.assert_allclose(final["h"], o * phi, **TOL)


def test_fgr_without_gate_recurrence_equals_vanilla():
    rec_fgr, params = make_lstm("fgr")
    rec_v = zoo.get("lstm", d_model=D, variant="vanilla")
    xs = inputs(11)
    state = random_state(rec_v.initial_state(params, B), 12)
    ys_v, _ = rec_v.apply({k: v for k, v in params.items() if k != "w_gate_rec"}, xs, state)
    zero_gr = dict(params, w_gate_rec=jnp.zeros_like(params["w_gate_rec"]))
    fgr_state = dict(state, gates=jnp.zeros((B, 3 * D), jnp.float32))
    ys_0, _ = rec_fgr.apply(zero_gr, xs, fgr_state)
    ys_1, final = rec_fgr.apply(params, xs, fgr_state)
    np.testing.assert_allclose(ys_0, ys_v, **TOL)
    assert np.abs(np.asarray(ys_1 - ys_v)).max() > 1e-3
    # The carried gates are the last step's (i, f, o), each in (0, 1).
    assert final["gates"].shape == (B, 3 * D) and np.all((final["gates"] > 0) & (final["gates"] < 1))


@pytest.mark.refs
def test_np_variant_equals_torch_lstm():
    torch = pytest.importorskip("torch")
    rec, params = make_lstm("np")
    layer = torch.nn.LSTM(D_IN, D, batch_first=True).double()
    rng = np.random.default_rng(13)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.tensor(rng.normal(size=tuple(p.shape)) * 0.5))
    params = {"w_in": jnp.asarray(layer.weight_ih_l0.detach().numpy().T, jnp.float32),
              "w_rec": jnp.asarray(layer.weight_hh_l0.detach().numpy().T, jnp.float32),
              "bias": jnp.asarray((layer.bias_ih_l0 + layer.bias_hh_l0).detach().numpy(), jnp.float32)}
    xs = inputs(14)
    state = random_state(rec.initial_state(params, B), 15)
    ys, final = rec.apply(params, xs, state)
    h0 = torch.tensor(np.asarray(state["h"], np.float64))[None]
    c0 = torch.tensor(np.asarray(state["c"], np.float64))[None]
    ys_t, (h_t, c_t) = layer(torch.tensor(np.asarray(xs, np.float64)), (h0, c0))
    np.testing.assert_allclose(ys, ys_t.detach().numpy(), **TOL)
    np.testing.assert_allclose(final["c"], c_t[0].detach().numpy(), **TOL)


# --------------------------------------------------------------------------------------------
# GRU


def naive_gru(params, xs, h, reset_after):
    p, h, xs = f64(params), np.asarray(h, np.float64), np.asarray(xs, np.float64)
    w_r, w_z, w_n = (p["w_rec"][:, k * D:(k + 1) * D] for k in range(3))
    b_in = p["bias_in"] if reset_after else p["bias"]
    ys = []
    for t in range(xs.shape[1]):
        a = xs[:, t] @ p["w_in"] + b_in
        a_r, a_z, a_n = a[:, :D], a[:, D:2 * D], a[:, 2 * D:]
        if reset_after:
            b_r, b_z, b_n = (p["bias_rec"][k * D:(k + 1) * D] for k in range(3))
            r = sigmoid(a_r + h @ w_r + b_r)
            z = sigmoid(a_z + h @ w_z + b_z)
            n = np.tanh(a_n + r * (h @ w_n + b_n))
        else:
            r = sigmoid(a_r + h @ w_r)
            z = sigmoid(a_z + h @ w_z)
            n = np.tanh(a_n + (r * h) @ w_n)
        h = (1 - z) * n + z * h
        ys.append(h)
    return np.stack(ys, axis=1), h


def make_gru(reset_after, seed=0):
    rec = zoo.get("gru", d_model=D, reset_after=reset_after)
    return rec, random_params(rec.init(jax.random.key(seed), D_IN), seed)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_matches_naive_float64_loop(reset_after):
    rec, params = make_gru(reset_after)
    h0 = random_state(rec.initial_state(params, B), 1)
    xs = inputs(2)
    ys, final = rec.apply(params, xs, h0)
    ys_ref, final_ref = naive_gru(params, xs, h0, reset_after)
    np.testing.assert_allclose(ys, ys_ref, **TOL)
    np.testing.assert_allclose(final, final_ref, **TOL)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_gradients_match_step_loop_gradients(reset_after):
    rec, params = make_gru(reset_after, seed=3)
    h0 = random_state(rec.initial_state(params, B), 4)
    xs = inputs(5)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, D)), jnp.float32)

    def loss_apply(params, xs, h0):
        ys, h = rec.apply(params, xs, h0)
        return jnp.sum(ys * weights) + jnp.sum(h ** 2)

    def loss_loop(params, xs, h):
        total = 0.0
        for t in range(T):
            h, y = rec.step(params, h, xs[:, t])
            total = total + jnp.sum(y * weights[:, t])
        return total + jnp.sum(h ** 2)

    got = jax.grad(loss_apply, argnums=(0, 1, 2))(params, xs, h0)
    want = jax.grad(loss_loop, argnums=(0, 1, 2))(params, xs, h0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_update_gate_keeps_the_old_state(reset_after):
    """With w_rec = 0 and a constant input, z and n are constants: h_T = z^T h_0 + (1 - z^T) n."""
    rec, params = make_gru(reset_after)
    params = dict(params, w_rec=jnp.zeros_like(params["w_rec"]))
    x = np.random.default_rng(7).normal(size=(B, D_IN))
    xs = jnp.asarray(np.repeat(x[:, None], T, axis=1), jnp.float32)
    h0 = random_state(rec.initial_state(params, B), 8)
    p = f64(params)
    a = x @ p["w_in"] + (p["bias_in"] if reset_after else p["bias"])
    z = sigmoid(a[:, D:2 * D] + (p["bias_rec"][D:2 * D] if reset_after else 0))
    r = sigmoid(a[:, :D] + (p["bias_rec"][:D] if reset_after else 0))
    n = np.tanh(a[:, 2 * D:] + (r * p["bias_rec"][2 * D:] if reset_after else 0))
    _, final = rec.apply(params, xs, h0)
    np.testing.assert_allclose(final, z ** T * np.asarray(h0, np.float64) + (1 - z ** T) * n, **TOL)


def test_gru_conventions_differ_only_through_the_reset_gate_position():
    """Same weights, zero recurrent biases: the two layouts agree when h_0 = 0 for one step (r
    multiplies zero either way) and disagree afterwards."""
    rec_c, params = make_gru(False)
    rec_a = zoo.get("gru", d_model=D, reset_after=True)
    params_a = {"w_in": params["w_in"], "w_rec": params["w_rec"], "bias_in": params["bias"],
                "bias_rec": jnp.zeros_like(params["bias"])}
    xs = inputs(9)
    ys_c, _ = rec_c.apply(params, xs)
    ys_a, _ = rec_a.apply(params_a, xs)
    np.testing.assert_allclose(ys_c[:, 0], ys_a[:, 0], **TOL)
    assert np.abs(np.asarray(ys_c[:, 1:] - ys_a[:, 1:])).max() > 1e-3


@pytest.mark.refs
def test_gru_reset_after_equals_torch_gru():
    torch = pytest.importorskip("torch")
    rec = zoo.get("gru", d_model=D, reset_after=True)
    layer = torch.nn.GRU(D_IN, D, batch_first=True).double()
    rng = np.random.default_rng(16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.tensor(rng.normal(size=tuple(p.shape)) * 0.5))
    params = {"w_in": layer.weight_ih_l0.T, "w_rec": layer.weight_hh_l0.T,
              "bias_in": layer.bias_ih_l0, "bias_rec": layer.bias_hh_l0}
    params = {k: jnp.asarray(v.detach().numpy(), jnp.float32) for k, v in params.items()}
    xs = inputs(17)
    h0 = random_state(rec.initial_state(params, B), 18)
    ys, final = rec.apply(params, xs, h0)
    h0_t = torch.tensor(np.asarray(h0, np.float64))[None]
    ys_t, h_t = layer(torch.tensor(np.asarray(xs, np.float64)), h0_t)
    np.testing.assert_allclose(ys, ys_t.detach().numpy(), **TOL)
    np.testing.assert_allclose(final, h_t[0].detach().numpy(), **TOL)
