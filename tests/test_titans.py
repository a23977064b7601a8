"""Titans (MAC, MAG, MAL) against a float64 numpy loop of the paper's equations, written token by token
from PAPERS.md §1.7 and the model docstring, without zoo's code: the memory MLP's gradient is
backpropagated by hand here, the momentum and forgetting updates run token by token, the chunk-start
weights are kept explicitly, and the attention is a plain weighted softmax.

Every parameter is random (the scales and biases too), the entering state is random and, in the
first test, partway through a chunk in one row, with resets inside the rows. The model runs in
float32 and the loop in float64 from the same float32 numbers: compared at rtol 1e-4 and atol 1e-5
of each array's scale (tests/block_loop_checks.close).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_loop_checks import close

import zoo
from zoo.models.titans import TitansConfig

pytestmark = pytest.mark.usefixtures("quick_compile")

VARIANTS = ("mac", "mag", "mal")
BATCH, T, D_IN = 2, 11, 5
RESET = np.zeros((BATCH, T), bool)
RESET[0, 6] = True
RESET[1, [0, 3, 4]] = True


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))         # no overflow for large |x|


def _silu(x):
    return x * _sigmoid(x)


def _l2(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def _rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale


# --------------------------------------------------------------------------------------------
# The memory MLP of one head: forward, and the gradient of ½‖M(k) − v‖² by hand.


def _mlp(layers, x):
    for i, w in enumerate(layers):
        x = (x if i == 0 else _silu(x)) @ w
    return x


def _mlp_grad(layers, k, v):
    zs, ins = [], []
    x = k
    for i, w in enumerate(layers):
        if i:
            zs.append(x)
            x = _silu(x)
        ins.append(x)
        x = x @ w
    err = x - v
    grads = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        grads[i] = np.outer(ins[i], err)
        if i:
            z = zs[i - 1]
            err = (layers[i] @ err) * (_sigmoid(z) * (1 + z * (1 - _sigmoid(z))))
    return grads


# --------------------------------------------------------------------------------------------
# The loop, one row at a time.


def _softmax_read(q, keys, values, weights, scale):
    """Σ w e^{q·k σ} v / Σ w e^{q·k σ} over the entries with w > 0."""
    keep = weights > 0
    s = (keys[keep] @ q) * scale
    e = weights[keep] * np.exp(s - s.max())
    return e @ values[keep] / e.sum()


def _heads(x, h):
    return x.reshape(h, -1)


def _row_state(state, b, cfg):
    """The row's state as the loop keeps it: chunk-start weights, current weights (start + delta
    inside a chunk), momentum, position, attention buffers."""
    mem = state["memory"]
    pos = int(np.floor(mem["position"][b]))
    start = [np.array(w[b], np.float64) for w in mem["weights"]]
    cur = [s + (np.array(d[b], np.float64) if pos else 0) for s, d in zip(start, mem["delta"], strict=True)]
    row = {"start": start, "cur": cur, "mom": [np.array(m[b], np.float64) for m in mem["momentum"]],
           "pos": pos}
    extra = "segment" if cfg.variant == "mac" else "window"
    row[extra] = {k: np.array(v[b], np.float64) for k, v in state[extra].items()}
    return row


def _fresh_row(p, cfg):
    h, e, w = cfg.n_heads, cfg.d_head, cfg.window
    w0 = [p[f"memory_{i}"].copy() for i in range(cfg.memory_depth)]
    row = {"start": w0, "cur": [a.copy() for a in w0], "mom": [np.zeros_like(a) for a in w0], "pos": 0}
    if cfg.variant == "mac":
        row["segment"] = {name: np.zeros((cfg.chunk_size, 2, h, e)) for name in ("keys", "values")}
    else:
        row["window"] = {"keys": np.zeros((w, h, e)), "values": np.zeros((w, h, e)), "valid": np.zeros(w)}
    return row


def _token(p, cfg, row, x):
    """One token of one row: returns the output [D] and updates ``row`` in place."""
    h, scale = cfg.n_heads, cfg.d_head ** -0.5
    pk, pv = [np.stack([_heads(t, h) for t in p["persistent"] @ p[w]]) if cfg.n_persistent
              else np.zeros((0, h, cfg.d_head)) for w in ("w_k", "w_v")]

    def attention(query, keys, values, weights):
        """Heads of query [H, E] over persistent (weight 1) and the given keys [S, H, E]."""
        out = []
        for j in range(h):
            ks = np.concatenate([pk[:, j], keys[:, j]])
            vs = np.concatenate([pv[:, j], values[:, j]])
            out.append(_softmax_read(query[j], ks, vs, np.concatenate([np.ones(len(pk)), weights]), scale))
        return np.concatenate(out)

    def window_attention(z):
        win = row["window"]
        keys = np.concatenate([win["keys"], _heads(z @ p["w_k"], h)[None]])
        values = np.concatenate([win["values"], _heads(z @ p["w_v"], h)[None]])
        weights = np.concatenate([win["valid"], [1.0]])
        out = attention(_heads(z @ p["w_q"], h), keys, values, weights)
        row["window"] = {"keys": keys[1:], "values": values[1:], "valid": weights[1:]}
        return out

    u = x @ p["w_in"]
    pos = row["pos"]
    if pos == 0:                                       # a chunk starts: gradients at these weights
        row["start"] = [w.copy() for w in row["cur"]]
    n_layers = cfg.memory_depth
    layers = lambda ws, j: [ws[i][j] for i in range(n_layers)]  # noqa: E731
    if cfg.variant == "mac":
        qx = _heads(_l2_heads(_silu(u @ p["w_mq"]), h), h)
        retrieved = np.concatenate([_mlp(layers(row["start"], j), qx[j]) for j in range(h)])
        seg = row["segment"]
        seg["keys"][pos] = [_heads(retrieved @ p["w_k"], h), _heads(u @ p["w_k"], h)]
        seg["values"][pos] = [_heads(retrieved @ p["w_v"], h), _heads(u @ p["w_v"], h)]
        keys = seg["keys"][:pos + 1].reshape(-1, h, cfg.d_head)          # h_0, x_0, h_1, x_1, ...
        values = seg["values"][:pos + 1].reshape(-1, h, cfg.d_head)
        memory_in = attention(_heads(u @ p["w_q"], h), keys, values, np.ones(len(keys)))
    else:
        memory_in = u
    # The memory: q, k, v and gates from memory_in; S = η S − θ ∇ℓ(start); M = (1 − α) M + S.
    q = _heads(_l2_heads(_silu(memory_in @ p["w_mq"]), h), h)
    k = _heads(_l2_heads(_silu(memory_in @ p["w_mk"]), h), h)
    v = _heads(_silu(memory_in @ p["w_mv"]), h)
    lr, eta, alpha = (_sigmoid(memory_in @ p[f"w_{g}"] + p[f"b_{g}"]) for g in ("lr", "momentum", "decay"))
    reads = []
    for j in range(h):
        grads = _mlp_grad(layers(row["start"], j), k[j], v[j])
        for i in range(n_layers):
            row["mom"][i][j] = eta[j] * row["mom"][i][j] - lr[j] * grads[i]
            row["cur"][i][j] = (1 - alpha[j]) * row["cur"][i][j] + row["mom"][i][j]
        reads.append(_mlp(layers(row["cur"], j), q[j]))
    m = np.concatenate(reads)

    def gate(a, mem):
        return _rms(a, p["scale_attention"]) * _sigmoid(_rms(mem, p["scale_memory"]))

    if cfg.variant == "mac":
        o = gate(memory_in, m)
    elif cfg.variant == "mag":
        o = gate(window_attention(u), m)
    else:
        o = window_attention(_rms(m, p["scale_memory"]))
    row["pos"] = (pos + 1) % cfg.chunk_size
    return o @ p["w_out"]


def _l2_heads(x, h):
    return np.concatenate([_l2(part) for part in np.split(x, h)])


def _loop(params, cfg, xs, state, reset):
    """Outputs [B, T, D] and the final state in the model's layout."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(xs, np.float64)
    state = jax.tree.map(lambda a: np.asarray(a, np.float64), state)
    ys = np.zeros((xs.shape[0], xs.shape[1], cfg.d_model))
    rows = []
    for b in range(xs.shape[0]):
        row = _row_state(state, b, cfg)
        for t in range(xs.shape[1]):
            if reset is not None and reset[b, t]:
                row = _fresh_row(p, cfg)
            ys[b, t] = _token(p, cfg, row, xs[b, t])
        rows.append(row)
    # Inside a chunk the model keeps the chunk-start weights and the displacement since; at a chunk
    # start the current weights and no displacement.
    layers = range(cfg.memory_depth)
    memory = {"weights": tuple(np.stack([r["start"][i] if r["pos"] else r["cur"][i] for r in rows])
                               for i in layers),
              "delta": tuple(np.stack([(r["cur"][i] - r["start"][i]) * (r["pos"] > 0) for r in rows])
                             for i in layers),
              "momentum": tuple(np.stack([r["mom"][i] for r in rows]) for i in range(cfg.memory_depth)),
              "position": np.array([float(r["pos"]) for r in rows])}
    extra = "segment" if cfg.variant == "mac" else "window"
    final = {"memory": memory, extra: {k: np.stack([r[extra][k] for r in rows]) for k in rows[0][extra]}}
    return ys, final


# --------------------------------------------------------------------------------------------
# Set-up and the comparisons.


def _setup(variant, positions, seed=0, **config):
    rec = zoo.get(f"titans_{variant}", **config)
    cfg = zoo.list_models()[f"titans_{variant}"].make_config(**config)
    keys = jax.random.split(jax.random.key(seed), 4)
    params = rec.init(keys[0], D_IN)
    names = sorted(params)
    draws = jax.random.split(keys[1], len(names))
    params = {n: params[n] + 0.3 * jax.random.normal(k, params[n].shape)
              for n, k in zip(names, draws, strict=True)}
    xs = jax.random.normal(keys[2], (BATCH, T, D_IN), jnp.float32)
    fresh = rec.initial_state(params, BATCH)
    leaves, tree = jax.tree.flatten(fresh)
    noise = jax.random.split(keys[3], len(leaves))
    state = jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape)
                                      for a, k in zip(leaves, noise, strict=True)])
    state["memory"]["position"] = jnp.asarray(positions, jnp.float32) + 0.3   # read with floor
    if variant != "mac":            # window weights in (0, 1], one empty slot per row
        valid = jax.random.uniform(keys[3], (BATCH, cfg.window), jnp.float32, 0.2, 1.0)
        state["window"]["valid"] = valid.at[:, 0].set(0.0)
    return rec, params, xs, state, cfg


def _compare(rec, params, xs, state, cfg, reset, mode):
    ys, final = jax.jit(rec.apply, static_argnames="mode")(
        params, xs, state=state, reset=None if reset is None else jnp.asarray(reset), mode=mode)
    want_ys, want_final = _loop(params, cfg, xs, state, reset)
    close(ys, want_ys, "outputs")
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(final)[0], jax.tree.leaves(want_final),
                                 strict=True):
        close(got, want, f"final state {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequential_apply_with_resets_and_a_state_partway_through_a_chunk_matches_a_float64_loop(variant):
    rec, params, xs, state, cfg = _setup(variant, positions=[2, 1])
    _compare(rec, params, xs, state, cfg, RESET, "sequential")


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_apply_from_a_chunk_start_matches_a_float64_loop(variant):
    """Every row enters at a chunk start and nothing resets: the chunk-parallel path (two whole chunks
    of 4, then 3 tokens)."""
    rec, params, xs, state, cfg = _setup(variant, positions=[0, 0], seed=1)
    _compare(rec, params, xs, state, cfg, None, "chunked")


def test_linear_memory_without_persistent_tokens_matches_a_float64_loop():
    """Depth 1 (a linear memory), no persistent tokens, chunk 3 and window 2."""
    config = {"memory_depth": 1, "n_persistent": 0, "chunk_size": 3, "window": 2}
    rec, params, xs, state, cfg = _setup("mag", positions=[0, 0], seed=2, **config)
    _compare(rec, params, xs, state, cfg, None, "chunked")


@pytest.mark.parametrize("field,value", [("d_model", 15), ("n_heads", 0), ("d_memory", -1),
                                         ("memory_depth", 0), ("chunk_size", 0), ("window", 0),
                                         ("n_persistent", -1), ("window", 2.5)])
def test_bad_config_raises_value_error_naming_the_field(field, value):
    match = "n_heads" if field == "d_model" else field
    with pytest.raises(ValueError, match=match):
        zoo.get("titans_mac", **{field: value})


def test_unknown_variant_raises_value_error():
    @dataclasses.dataclass(frozen=True)
    class Bad(TitansConfig):
        variant: ClassVar[str] = "mlp"

    with pytest.raises(ValueError, match="variant"):
        Bad()
