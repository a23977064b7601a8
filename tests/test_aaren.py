"""The aaren model against a float64 numpy loop written from the paper (no zoo.ops inside).

For each output t and head h the loop takes the tokens of t's segment up to t, their scores
s_i = q_h·k_{i,h} / sqrt(K) with the layer's learned query, and forms softmax(s)·v directly (max
subtracted, exponentiated, normalised); the layer around it (residual, LayerNorm, feed-forward) is
written out too. The model runs in float32, so it must agree to float32 rounding (1e-5 of each
array's scale). The final state is checked against the same loop: m the max score of the last
segment, u = Σ e^{s_i - m}, w = Σ e^{s_i - m} v_i.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN = 2, 10, 5
CONFIGS = {
    "post_norm_relu": {},
    "pre_norm_gelu_2_layers": {"n_layers": 2, "norm_first": True, "activation": "gelu", "n_heads": 4},
}


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _layer_norm(x, p, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _aaren(p, x, starts):
    """The Aaren module over x [B, T, D] with segment starts [B, T]; returns (out, final (m, u, w))."""
    heads, width = p["query"].shape
    k = (x @ p["w_k"]).reshape(B, -1, heads, width)
    v = (x @ p["w_v"] + p["b_v"]).reshape(B, -1, heads, width)
    time = x.shape[1]
    o = np.zeros_like(v)
    m, u, w = np.zeros((B, heads)), np.zeros((B, heads)), np.zeros((B, heads, width))
    for b in range(B):
        for t in range(time):
            first = max([i for i in range(t + 1) if starts[b, i]], default=0)
            for h in range(heads):
                keys = k[b, first:t + 1, h]
                scores = np.array([p["query"][h] @ key for key in keys]) / math.sqrt(width)
                e = np.exp(scores - scores.max())
                o[b, t, h] = e @ v[b, first:t + 1, h] / e.sum()
                if t == time - 1:
                    m[b, h], u[b, h], w[b, h] = scores.max(), e.sum(), e @ v[b, first:t + 1, h]
    return o.reshape(B, time, -1) @ p["w_o"] + p["b_o"], {"max": m, "denominator": u, "numerator": w}


def _feed_forward(p, h, activation):
    z = h @ p["w_ff1"] + p["b_ff1"]
    z = np.maximum(z, 0) if activation == "relu" else 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return z @ p["w_ff2"] + p["b_ff2"]


def numpy_aaren_model(params, config, xs, reset):
    """The registered stack, in float64 numpy loops."""
    p = _np(params)
    starts = np.zeros(xs.shape[:2], bool) if reset is None else np.asarray(reset)
    h = np.asarray(xs, np.float64) @ p["w_in"]
    eps, finals = config.norm_eps, []
    for layer in p["layers"]:
        if config.norm_first:
            a, final = _aaren(layer["aaren"], _layer_norm(h, layer["norm_1"], eps), starts)
            h = h + a
            h = h + _feed_forward(layer, _layer_norm(h, layer["norm_2"], eps), config.activation)
        else:
            a, final = _aaren(layer["aaren"], h, starts)
            h = _layer_norm(h + a, layer["norm_1"], eps)
            h = _layer_norm(h + _feed_forward(layer, h, config.activation), layer["norm_2"], eps)
        finals.append(final)
    if config.norm_first:
        h = _layer_norm(h, p["final_norm"], eps)
    return h, tuple(finals)


def _close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=what)


def _setup(name):
    rec = zoo.get("aaren", **CONFIGS[name])
    config = zoo.list_models()["aaren"].make_config(**CONFIGS[name])
    params = rec.init(jax.random.key(0), D_IN)
    xs = jax.random.normal(jax.random.key(1), (B, T, D_IN), jnp.float32)
    reset = np.zeros((B, T), bool)
    reset[0, 6] = True
    reset[1, 3] = True
    return rec, config, params, xs, reset


@pytest.mark.parametrize("name", CONFIGS)
def test_apply_in_every_mode_and_the_step_loop_match_the_float64_loop(name):
    rec, config, params, xs, reset = _setup(name)
    want = numpy_aaren_model(params, config, xs, reset)
    for mode in rec.modes:
        _close(rec.apply(params, xs, reset=jnp.asarray(reset), mode=mode), want, f"apply {mode}")
    state, outputs = rec.initial_state(params, B), []
    fresh = rec.initial_state(params, B)
    rows = lambda flag, s: flag.reshape((-1,) + (1,) * (s.ndim - 1))
    for t in range(T):
        state = jax.tree.map(lambda f, s, t=t: jnp.where(rows(reset[:, t], s), f, s), fresh, state)
        state, y = rec.step(params, state, xs[:, t])
        outputs.append(y)
    _close((jnp.stack(outputs, axis=1), state), want, "step loop")


def test_carried_state_continues_attention_over_the_whole_history_in_constant_memory():
    """apply on the last tokens, from the state of the first ones, attends over all of them (the
    float64 loop sees the whole sequence), and the state's shapes do not grow with the length."""
    rec, config, params, xs, _ = _setup("pre_norm_gelu_2_layers")
    longer = jax.random.normal(jax.random.key(2), (B, 3 * T, D_IN), jnp.float32)
    want_ys, want_final = numpy_aaren_model(params, config, longer, None)
    _, mid = rec.apply(params, longer[:, :2 * T], mode="associative")
    ys, final = rec.apply(params, longer[:, 2 * T:], state=mid, mode="sequential")
    _close((ys, final), (want_ys[:, 2 * T:], want_final), "continued apply")
    short = rec.apply(params, xs[:, :1])[1]
    assert jax.tree.map(jnp.shape, short) == jax.tree.map(jnp.shape, final)
    assert zoo.list_models()["aaren"].state_size(**CONFIGS["pre_norm_gelu_2_layers"]) == 2 * (2 * 4 + 16)


def test_the_query_is_a_learned_parameter_with_a_gradient():
    rec, _, params, xs, _ = _setup("post_norm_relu")
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(rec.apply(p, xs)[0])))(params)
    g = np.asarray(grads["layers"][0]["aaren"]["query"])
    assert g.shape == (2, 8) and np.all(np.isfinite(g)) and np.abs(g).max() > 0


@pytest.mark.parametrize("bad,match", [
    ({"n_heads": 3}, "d_model = 16 must be a multiple of n_heads = 3"),
    ({"activation": "tanh"}, "activation must be one of"),
    ({"n_layers": 0}, "n_layers must be a positive int"),
    ({"norm_eps": 0.0}, "norm_eps must be a positive number"),
    ({"norm_first": "yes"}, "norm_first must be a bool"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("aaren", **bad)
