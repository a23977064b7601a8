"""The RG-LRU layer and the recurrent block against the paper's equations written as a plain loop.

``naive_rglru`` and ``naive_recurrent_block`` are independent of zoo's code: a Python loop over time
in float64 (``jax.enable_x64``) with the block-diagonal gates as one product per head, the
convolution as explicit taps, and segment starts handled by the definition (a reset replaces the
state by the fresh one, whose first step is not scaled by sqrt(1 - a²)). Every mode agrees with
them to 1e-10 in values and gradients: they differ only in the order of float operations. The
``refs`` tests compare with recurrentgemma's own RGLRU layer in float32 at 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models import rglru
from zoo.ops import diagonal

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D, HEADS, D_IN, K_CONV = 2, 10, 8, 2, 5, 4


# --------------------------------------------------------------------------------------------
# Naive references.


def _flags(reset, time, reverse):
    """The reset flag that applies before each step, in time order (None: no flag)."""
    if reset is None:
        return [None] * time
    if not reverse:
        return [reset[:, t] for t in range(time)]
    return [reset[:, t + 1] if t + 1 < time else None for t in range(time)]


def _rglru_step(p, h, start, x_t, c):
    heads, block = p["w_a_gate"].shape[:2]
    xs = [x_t[:, i * block:(i + 1) * block] for i in range(heads)]
    gate_x = jnp.concatenate([xs[i] @ p["w_input_gate"][i] + p["b_input_gate"][i] for i in range(heads)], -1)
    gate_a = jnp.concatenate([xs[i] @ p["w_a_gate"][i] + p["b_a_gate"][i] for i in range(heads)], -1)
    a = (1 / (1 + jnp.exp(p["a_param"]))) ** (c / (1 + jnp.exp(-gate_a)))   # sigmoid(-Λ)^(c r)
    m = jnp.sqrt(1 - a**2)
    m = m + start[:, None] * (1 - m)
    return a * h + m * x_t / (1 + jnp.exp(-gate_x))


def naive_rglru(p, x, h0, start0, reset=None, reverse=False, c=8.0):
    """y [B, T, D], (h_T, start_T) by the paper's loop; a reset gives h = 0, start = 1."""
    time = x.shape[1]
    h, start = h0, start0
    ys = [None] * time
    order = range(time - 1, -1, -1) if reverse else range(time)
    flags = _flags(reset, time, reverse)
    for t in order:
        if flags[t] is not None:
            h = jnp.where(flags[t][:, None], 0.0, h)
            start = jnp.where(flags[t], 1.0, start)
        h = _rglru_step(p, h, start, x[:, t], c)
        start = jnp.zeros_like(start)
        ys[t] = h
    return jnp.stack(ys, 1), {"h": h, "start": start}


def naive_recurrent_block(p, x, state, reset=None, reverse=False):
    """The block with its conv written as taps over an explicit window of past inputs."""
    gelu = lambda z: 0.5 * z * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    gate = gelu(x @ p["w_y"] + p["b_y"])
    u = x @ p["w_x"] + p["b_x"]
    time, taps = x.shape[1], p["conv_w"].shape[0]
    window = state["conv"]                                              # last K-1 inputs, oldest first
    conv = [None] * time
    order = range(time - 1, -1, -1) if reverse else range(time)
    flags = _flags(reset, time, reverse)
    for t in order:
        if flags[t] is not None:
            window = jnp.where(flags[t][:, None, None], 0.0, window)
        full = jnp.concatenate([window, u[:, t:t + 1]], axis=1)          # [B, K, C]
        conv[t] = sum(full[:, k] * p["conv_w"][k] for k in range(taps)) + p["conv_b"]
        window = full[:, 1:]
    h, lru = naive_rglru(p["rglru"], jnp.stack(conv, 1), state["rglru"]["h"], state["rglru"]["start"],
                         reset, reverse)
    return (h * gate) @ p["w_out"] + p["b_out"], {"conv": window, "rglru": lru}


# --------------------------------------------------------------------------------------------
# Data.


def _layer_data(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = rglru.layer_init(jax.random.key(seed), D, HEADS)
    params = jax.tree.map(lambda p: np.asarray(p, np.float64) + 0.3 * rng.normal(size=p.shape), params)
    reset = rng.random((B, T)) < 0.2
    reset[0, 4] = True
    reset[1, [0, T - 1]] = True
    data = {"params": params, "x": rng.normal(size=(B, T, D)),
            "state": {"h": rng.normal(size=(B, D)), "start": np.array([1.0, 0.3])},
            "reset": reset, "w": rng.normal(size=(B, T, D))}
    return jax.tree.map(lambda v: v if v.dtype == bool else v.astype(dtype), data)


def _loss(fn, w):
    def loss(params, x, state):
        y, final = fn(params, x, state)
        return jnp.sum(y * w) + jnp.sum(jnp.cos(final["h"])) + jnp.sum(final["start"])

    return loss


def _values_and_grads(fn, data):
    args = (data["params"], data["x"], data["state"])
    return fn(*args), jax.grad(_loss(fn, data["w"]), argnums=(0, 1, 2))(*args)


def _assert_tree_close(got, want, rtol, atol=0.0):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# The layer.


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
# The slow-marked cases repeat what the others and the harness check; `pytest -m slow` runs them.
@pytest.mark.parametrize("with_reset", [pytest.param(False, id="no_reset", marks=pytest.mark.slow),
                                        pytest.param(True, id="reset")])
@pytest.mark.parametrize("mode", diagonal.MODES)
def test_layer_matches_the_papers_loop_in_values_and_gradients(mode, with_reset, reverse):
    with jax.enable_x64(True):
        data = _layer_data(0)
        reset = data["reset"] if with_reset else None

        def zoo_layer(p, x, s):
            return rglru.layer_apply(p, x, s, reset, mode, reverse, chunk_size=4)

        want = _values_and_grads(lambda p, x, s: naive_rglru(p, x, s["h"], s["start"], reset, reverse), data)
        _assert_tree_close(_values_and_grads(zoo_layer, data), want, rtol=1e-10, atol=1e-12)


def test_layer_step_matches_the_papers_step():
    with jax.enable_x64(True):
        data = _layer_data(1)
        state, y = rglru.layer_step(data["params"], data["state"], data["x"][:, 0])
        want = _rglru_step(data["params"], data["state"]["h"], data["state"]["start"], data["x"][:, 0], 8.0)
        _assert_tree_close((y, state["h"], state["start"]), (want, want, np.zeros(B)), rtol=1e-12)


def test_first_token_of_a_segment_is_gated_input_without_normalisation():
    """Closed form from h = 0: y_0 = σ(W_x x_0 + b_x) ⊙ x_0 at a segment start, sqrt(1 - a²) times
    that when the same zero state continues a segment."""
    with jax.enable_x64(True):
        data = _layer_data(2)
        p, x = data["params"], data["x"]
        fresh = rglru.layer_initial_state(B, D)
        y, _ = rglru.layer_apply(p, x, jax.tree.map(lambda s: s.astype(jnp.float64), fresh))
        x0 = np.asarray(x[:, 0])
        gate_x = np.concatenate([x0[:, i * 4:(i + 1) * 4] @ p["w_input_gate"][i] + p["b_input_gate"][i]
                                 for i in range(HEADS)], -1)
        np.testing.assert_allclose(y[:, 0], x[:, 0] / (1 + np.exp(-gate_x)), rtol=1e-12)
        carried = {"h": jnp.zeros((B, D)), "start": jnp.zeros(B)}
        y_carried, _ = rglru.layer_apply(p, x, carried)
        assert np.all(np.abs(y_carried[:, 0]) < np.abs(y[:, 0]))


def test_registered_rglru_reads_other_widths_through_w_in():
    with jax.enable_x64(True):
        rec = zoo.get("rglru", d_model=D, n_heads=HEADS)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), rec.init(jax.random.key(3), D_IN))
        assert params["w_in"].shape == (D_IN, D)
        assert "w_in" not in rec.init(jax.random.key(3))          # d_in = d_model: the paper's layer
        x = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, D_IN)))
        y, final = rec.apply(params, x, mode="sequential")
        layer = {k: v for k, v in params.items() if k != "w_in"}
        want, want_final = naive_rglru(layer, x @ params["w_in"], jnp.zeros((B, D)), jnp.ones(B))
        _assert_tree_close(y, want, rtol=1e-10, atol=1e-12)
        _assert_tree_close(final, want_final, rtol=1e-7)          # the contract returns float32 states


def test_sqrt_normaliser_has_a_bounded_derivative():
    g = jax.vmap(jax.grad(lambda x: rglru._bounded_sqrt(x, rglru.MAX_SQRT_GRADIENT)))
    x = jnp.asarray([0.0, 1e-12, 1e-6, 0.25, 1.0], jnp.float32)
    np.testing.assert_allclose(g(x), [1000.0, 1000.0, 500.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(rglru._bounded_sqrt(x, 1000.0), np.sqrt(x), rtol=1e-7)


def test_decay_init_is_uniform_in_area_on_the_ring():
    radius = np.exp(-jax.nn.softplus(rglru.a_param_init(jax.random.key(4), 50_000, 0.9, 0.999)))
    assert radius.min() >= 0.9 - 1e-6 and radius.max() <= 0.999 + 1e-6
    # r² uniform on [0.81, 0.998]: mean and quartiles of a uniform law (n = 50 000: errors ~ 1e-3).
    r2 = radius.astype(np.float64) ** 2
    np.testing.assert_allclose(r2.mean(), (0.81 + 0.999**2) / 2, atol=2e-3)
    np.testing.assert_allclose(np.quantile(r2, [0.25, 0.75]),
                               [0.81 + q * (0.999**2 - 0.81) for q in (0.25, 0.75)], atol=3e-3)


def test_bfloat16_compute_keeps_the_decay_in_float32():
    data = _layer_data(5, np.float32)
    p = data["params"]
    y32, _ = rglru.layer_apply(p, data["x"], data["state"], data["reset"])
    y16, final16 = rglru.layer_apply(p, data["x"].astype(jnp.bfloat16), data["state"], data["reset"])
    assert y16.dtype == jnp.bfloat16 and final16["h"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=1e-2 * float(np.max(np.abs(y32))))


# --------------------------------------------------------------------------------------------
# The recurrent block.


def _block_data(seed):
    rng = np.random.default_rng(seed)
    params = rglru.recurrent_block_init(jax.random.key(seed), D_IN, D, D_IN, HEADS, K_CONV)
    params = jax.tree.map(lambda p: np.asarray(p, np.float64) + 0.3 * rng.normal(size=p.shape), params)
    reset = rng.random((B, T)) < 0.2
    reset[0, 3] = True
    state = {"conv": rng.normal(size=(B, K_CONV - 1, D)),
             "rglru": {"h": rng.normal(size=(B, D)), "start": np.array([0.0, 1.0])}}
    return {"params": params, "x": rng.normal(size=(B, T, D_IN)), "state": state, "reset": reset,
            "w": rng.normal(size=(B, T, D_IN))}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", ["sequential", "chunked"])
def test_recurrent_block_matches_the_naive_block_in_values_and_gradients(mode, reverse):
    with jax.enable_x64(True):
        data = _block_data(6)
        reset = data["reset"]

        def block(p, x, s):
            return rglru.recurrent_block_apply(p, x, s, reset, mode, reverse, chunk_size=4)

        def loss(fn):
            def value(p, x, s):
                y, final = fn(p, x, s)
                return jnp.sum(y * data["w"]) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(final))
            return jax.grad(value, argnums=(0, 1, 2))

        args = (data["params"], data["x"], data["state"])
        naive = functools.partial(naive_recurrent_block, reset=reset, reverse=reverse)
        # zoo.ops.conv1d keeps its window state float32 even for float64 inputs: 1e-7, not 1e-10.
        _assert_tree_close(block(*args), naive(*args), rtol=1e-7, atol=1e-7)
        _assert_tree_close(loss(block)(*args), loss(naive)(*args), rtol=1e-6, atol=1e-7)


def test_recurrent_block_step_fold_equals_apply():
    with jax.enable_x64(True):
        data = _block_data(7)
        state, ys = data["state"], []
        for t in range(T):
            state, y = rglru.recurrent_block_step(data["params"], state, data["x"][:, t])
            ys.append(y)
        want = rglru.recurrent_block_apply(data["params"], data["x"], data["state"])
        _assert_tree_close((jnp.stack(ys, 1), state), want, rtol=1e-7, atol=1e-7)   # float32 conv window


@pytest.mark.parametrize("bad", [dict(d_model=10, n_heads=4), dict(min_rad=0.99, max_rad=0.9), dict(c=0.0),
                                 dict(chunk_size=0)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError, match="rglru"):
        zoo.get("rglru", **bad)


# --------------------------------------------------------------------------------------------
# recurrentgemma's RGLRU layer (refs).


@pytest.mark.refs
@pytest.mark.parametrize("with_reset", [False, True], ids=["one_segment", "packed"])
def test_layer_matches_recurrentgemma_rglru_in_values_and_gradients(with_reset):
    rg = pytest.importorskip("recurrentgemma.jax")
    from zoo.convert import from_recurrentgemma_rglru

    rng = np.random.default_rng(8)
    layer = rg.RGLRU(width=16, num_heads=4, scan_type=rg.ScanType.LINEAR_NATIVE)
    x = jnp.asarray(rng.normal(size=(B, T, 16)), jnp.float32)
    reset = np.zeros((B, T), bool)
    if with_reset:
        reset[0, [3, 4]] = True
        reset[1, 7] = True
    positions = np.zeros((B, T), np.int32)
    for t in range(1, T):
        positions[:, t] = np.where(reset[:, t], 0, positions[:, t - 1] + 1)
    params = layer.init(jax.random.key(8), x, jnp.asarray(positions))
    params = jax.tree.map(lambda p: p + 0.2 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    w = jnp.asarray(rng.normal(size=(B, T, 16)), jnp.float32)

    def theirs(p, x):
        y, h = layer.apply(p, x, jnp.asarray(positions))
        return jnp.sum(y * w) + jnp.sum(jnp.sin(h)), (y, h)

    def ours(p, x):
        state = rglru.layer_initial_state(B, 16)
        y, final = rglru.layer_apply(from_recurrentgemma_rglru(p), x, state, jnp.asarray(reset))
        return jnp.sum(y * w) + jnp.sum(jnp.sin(final["h"])), (y, final["h"])

    (_, want), want_grads = jax.value_and_grad(theirs, argnums=(0, 1), has_aux=True)(params, x)
    (_, got), got_grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(params, x)
    _assert_tree_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_tree_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)
