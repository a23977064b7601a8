"""Segment-level recurrent Transformers (block_recurrent, rmt) against float64 numpy loops.

The references below are written from the papers' equations (as stated in each model's
docstring) with plain numpy: one loop over tokens or segments, attention spelled out, and no call
into zoo.ops or the models' helpers. They read only the params dict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

pytestmark = pytest.mark.usefixtures("quick_compile")

B, D_IN = 2, 5


def as64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def layer_norm(x, p, eps=1e-6):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def gelu(x):     # the tanh form, jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def mlp(p, x):
    hidden = gelu(x @ p["w_in"] + p["b_in"])
    return hidden, hidden @ p["w_out"] + p["b_out"]


def attend(q, k, v, n_heads, visible=None):
    """q [Q, D], k, v [S, D] for one sequence; heads are consecutive slices of D."""
    width = q.shape[-1] // n_heads
    out = np.zeros((q.shape[0], v.shape[-1]))
    for h in range(n_heads):
        cols = slice(h * width, (h + 1) * width)
        scores = q[:, cols] @ k[:, cols].T / np.sqrt(width)
        if visible is not None:
            scores = np.where(visible, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, cols] = (w / w.sum(-1, keepdims=True)) @ v[:, cols]
    return out


def quarters(x):
    return np.split(x, 4, axis=-1)


# --------------------------------------------------------------------------------------------
# References.


def block_recurrent_reference(p, xs, *, n_heads, block, lstm):
    """Token by token: sliding-window attention over keys t-W..t, cross-attention to the state
    of the current block; after each complete block the state update with its two gates."""
    sp = p["state"]

    def gate(g, carried, update, hidden):
        if not lstm:
            s = sigmoid(g["bias"])
            return carried * s + update * (1 - s)
        return (carried * sigmoid(hidden @ g["w_f"] + g["b_f"] + 1)
                + update * sigmoid(hidden @ g["w_i"] + g["b_i"] - 1))

    ys = np.zeros(xs.shape[:2] + (p["w_in"].shape[1],))
    for b in range(xs.shape[0]):
        memory = p["memory_init"].copy()
        keys, values = [], []
        for t in range(xs.shape[1]):
            h = xs[b, t] @ p["w_in"]
            q, k, v, q2 = quarters(layer_norm(h, p["tokens"]["norm"]) @ p["tokens"]["w_qkvq"])
            keys.append(k)
            values.append(v)
            lo = max(0, t - block)
            local = attend(q[None], np.stack(keys[lo:]), np.stack(values[lo:]), n_heads)[0]
            _, mem_k, mem_v, _ = quarters((layer_norm(memory, sp["norm"]) + sp["positions"]) @ sp["w_qkvq"])
            cross = attend(q2[None], mem_k, mem_v, n_heads)[0]
            h = h + np.concatenate([local, cross]) @ p["tokens"]["w_o"]
            ys[b, t] = h + mlp(p["tokens"]["mlp"], layer_norm(h, p["tokens"]["mlp_norm"]))[1]
            if (t + 1) % block == 0:
                mq, mk, mv, mq2 = quarters((layer_norm(memory, sp["norm"]) + sp["positions"]) @ sp["w_qkvq"])
                hidden = np.concatenate([attend(mq, mk, mv, n_heads),
                                         attend(mq2, np.stack(keys[-block:]), np.stack(values[-block:]),
                                                n_heads)], axis=-1)
                memory = gate(sp["gate_attn"], memory, hidden @ sp["w_o"] + sp["b_o"], hidden)
                hidden, out = mlp(sp["mlp"], layer_norm(memory, sp["mlp_norm"]))
                memory = gate(sp["gate_mlp"], memory, out, hidden)
    return ys


def rmt_reference(p, xs, *, n_heads, segment, n_memory):
    """Segment by segment: [M; X W_in; M] + positions through causal pre-norm layers; the write
    outputs become the next memory. A last partial segment runs as [M; X] (causal: the same)."""
    layers = p["layers"]
    n_layers = layers["w_qkv"].shape[0]
    ys = np.zeros(xs.shape[:2] + (p["w_in"].shape[1],))
    for b in range(xs.shape[0]):
        memory = p["memory_init"].copy()
        for start in range(0, xs.shape[1], segment):
            tokens = xs[b, start:start + segment] @ p["w_in"]
            n = tokens.shape[0]
            h = np.concatenate([memory, tokens, memory] if n == segment else [memory, tokens])
            h = h + p["positions"][:h.shape[0]]
            visible = np.tril(np.ones((h.shape[0], h.shape[0]), bool))
            for i in range(n_layers):
                layer = jax.tree.map(lambda a, i=i: a[i], layers)
                q, k, v = np.split(layer_norm(h, layer["attn_norm"]) @ layer["w_qkv"], 3, axis=-1)
                h = h + attend(q, k, v, n_heads, visible) @ layer["w_o"]
                h = h + mlp(layer["mlp"], layer_norm(h, layer["mlp_norm"]))[1]
            h = layer_norm(h, p["final_norm"])
            ys[b, start:start + n] = h[n_memory:n_memory + n]
            if n == segment:
                memory = h[n_memory + segment:]
    return ys


# --------------------------------------------------------------------------------------------
# Tests.


def assert_close(got, want, rtol=2e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


def data(time, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, time, D_IN), jnp.float32)


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_block_recurrent_equals_a_float64_loop(gate):
    rec = zoo.get("block_recurrent", gate=gate)
    params = rec.init(jax.random.key(1), D_IN)
    xs = data(11)
    want = block_recurrent_reference(as64(params), np.asarray(xs, np.float64), n_heads=2, block=4,
                                     lstm=gate == "lstm")
    apply = jax.jit(rec.apply, static_argnames="mode")
    assert_close(apply(params, xs, mode="chunked")[0], want)
    # Pieces that end inside a block: the second piece enters mid-block (the token path).
    ys_a, mid = apply(params, xs[:, :6], mode="chunked")
    ys_b, _ = apply(params, xs[:, 6:], state=mid, mode="chunked")
    assert_close(jnp.concatenate([ys_a, ys_b], axis=1), want)
    if gate == "lstm":
        assert_close(apply(params, xs, mode="sequential")[0], want)


def test_rmt_equals_a_float64_loop():
    rec = zoo.get("rmt")
    params = rec.init(jax.random.key(2), D_IN)
    xs = data(11)
    want = rmt_reference(as64(params), np.asarray(xs, np.float64), n_heads=2, segment=4, n_memory=2)
    apply = jax.jit(rec.apply, static_argnames="mode")
    assert_close(apply(params, xs, mode="chunked")[0], want)
    assert_close(apply(params, xs, mode="sequential")[0], want)
    ys_a, mid = apply(params, xs[:, :6], mode="chunked")
    ys_b, _ = apply(params, xs[:, 6:], state=mid, mode="chunked")
    assert_close(jnp.concatenate([ys_a, ys_b], axis=1), want)


# (model, tokens per segment, first time step whose only path to token 1 is the memory)
CARRY_CASES = [("block_recurrent", 4, 8), ("rmt", 4, 4)]


@pytest.mark.parametrize("name,segment,memory_only_from", CARRY_CASES, ids=[c[0] for c in CARRY_CASES])
def test_memory_carries_a_change_forwards_only(name, segment, memory_only_from):
    """Changing token 1 changes nothing before it, and changes the segments after its own, which
    (past the sliding window, for block_recurrent) can only hear of it through the memory."""
    rec = zoo.get(name)
    params = rec.init(jax.random.key(3), D_IN)
    xs = data(3 * segment)
    changed = xs.at[:, 1].add(1.0)
    apply = jax.jit(rec.apply)
    ys, final = apply(params, xs)
    ys2, final2 = apply(params, changed)
    np.testing.assert_array_equal(np.asarray(ys[:, :1]), np.asarray(ys2[:, :1]))
    later = np.abs(np.asarray(ys2[:, memory_only_from:] - ys[:, memory_only_from:]))
    assert later.max() > 1e-3 * np.abs(np.asarray(ys)).max()
    assert np.abs(np.asarray(final2["memory"] - final["memory"])).max() > 1e-4
    # Swapping in the unchanged run's memory at a segment start undoes the whole change.
    cut = segment * (memory_only_from // segment)
    _, mid = apply(params, xs[:, :cut])
    _, mid2 = apply(params, changed[:, :cut])
    assert np.abs(np.asarray(mid2["memory"] - mid["memory"])).max() > 1e-4
    tail, _ = apply(params, changed[:, cut:], state=dict(mid2, memory=mid["memory"]))
    assert_close(tail, ys[:, cut:], rtol=1e-6)


BAD_CONFIGS = [
    ("block_recurrent", {"d_model": 15}, "d_model"),
    ("block_recurrent", {"block_size": 0}, "block_size"),
    ("block_recurrent", {"n_states": -1}, "n_states"),
    ("block_recurrent", {"gate": "gru"}, "gate"),
    ("block_recurrent", {"mlp_ratio": 0}, "mlp_ratio"),
    ("rmt", {"n_heads": 3}, "d_model"),
    ("rmt", {"segment_size": 2.5}, "segment_size"),
    ("rmt", {"n_memory": 0}, "n_memory"),
    ("rmt", {"n_layers": True}, "n_layers"),
]


@pytest.mark.parametrize("name,config,match", BAD_CONFIGS, ids=[f"{c[0]}-{c[2]}" for c in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_field(name, config, match):
    with pytest.raises(ValueError, match=match):
        zoo.get(name, **config)
