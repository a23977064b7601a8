"""Benchmark: per-token decode cost of Aaren (attention as an RNN) against softmax attention with a
KV cache, both as 4-layer stacks of the same width, at contexts of 1k and 64k tokens.

    .venv/bin/python experiments/bench/aaren_decode.py              # d_model 256, contexts 1024 and 65536
    .venv/bin/python experiments/bench/aaren_decode.py --contexts 1024 8192 --steps 20 --out /tmp/quick.json

Aaren is ``zoo.get("aaren", ...)`` (post-norm layers: Aaren module, residual, LayerNorm, feed-forward).
Its prompt (random embeddings, batch 1) is run through ``apply`` in the associative mode (the
prefill), and the final state, (m, u, w) per head and layer, is carried into ``step``.

The comparison is the same stack with Aaren's learned query replaced by a query projected from each
token, i.e. causal softmax self-attention, decoded the usual way: a KV cache preallocated to the
context length (static shapes under ``jit``); each step attends over the cache's filled slots (a
mask over the whole cache) and its own key, and then writes its key and value at the current
position (``dynamic_update_slice``, the cache donated so that it is updated in place). The cache is
filled with random keys and values up to ``context - steps`` (a prefill of 64k tokens by full
attention would only cost time here; the step's cost does not depend on the values), and the
decode steps fill the rest, so every step attends over about ``context`` tokens. Both steps are
jitted; the layers around the mixers (norms, feed-forward, residuals) are the same functions
(``zoo.models.aaren``).

Aaren's state is O(1) in the context, so its step time should not depend on it (target: ratio
64k/1k ≈ 1), while attention's step reads the whole cache, O(context). Contexts and models are timed
interleaved, one token of each per round, so load changes hit all alike. The state bytes are those
of the pytree the step carries (attention: the cache and its position).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from _timing import record, write_result  # noqa: E402  (experiments/bench is the script's directory)

import zoo  # noqa: E402
from zoo.models._common import dense_init  # noqa: E402
from zoo.models.aaren import layer_around  # noqa: E402
from zoo.models.rglru import dense  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------------------------
# The comparison: the same stack with KV-cache softmax self-attention in place of Aaren.


def attention_params(aaren_params, key):
    """Aaren's params with each layer's learned query swapped for a query projection w_q."""
    layers, keys = [], jax.random.split(key, len(aaren_params["layers"]))
    for layer, k in zip(aaren_params["layers"], keys, strict=True):
        mixer = {name: x for name, x in layer["aaren"].items() if name != "query"}
        d = mixer["w_k"].shape[0]
        layers.append({**layer, "aaren": {**mixer, "w_q": dense_init(k, d, d)}})
    return {**aaren_params, "layers": tuple(layers)}


def empty_cache(key, layers: int, context: int, heads: int, width: int, filled: int):
    """Per layer: keys and values [1, H, context, K] (random up to ``filled``, zero after). Heads lead,
    so that both products of the step are batched matrix products over contiguous rows."""
    def one(k):
        k_k, k_v = jax.random.split(k)
        mask = (jnp.arange(context) < filled)[None, None, :, None]
        draw = lambda kk: jnp.where(mask, jax.random.normal(kk, (1, heads, context, width), jnp.float32), 0)
        return {"keys": draw(k_k), "values": draw(k_v)}

    return {"layers": tuple(one(k) for k in jax.random.split(key, layers)), "position": jnp.int32(filled)}


def attention_mix(p, cache, position, z, heads: int):
    """One token of causal softmax self-attention: the query attends over the cache's filled slots
    (positions < ``position``) and over its own key. Returns (out, this token's key and value)."""
    batch, d = z.shape
    width = d // heads
    q = dense(z, p["w_q"]).reshape(batch, heads, width) / math.sqrt(width)
    k = dense(z, p["w_k"]).reshape(batch, heads, 1, width)
    v = dense(z, p["w_v"], p["b_v"]).reshape(batch, heads, 1, width)
    held = jnp.einsum("bhk,bhsk->bhs", q, cache["keys"])
    held = jnp.where(jnp.arange(held.shape[-1]) < position, held, -jnp.inf)
    weights = jax.nn.softmax(jnp.concatenate([held, jnp.einsum("bhk,bhsk->bhs", q, k)], axis=-1), axis=-1)
    o = jnp.einsum("bhs,bhsk->bhk", weights[..., :-1], cache["values"]) + weights[..., -1:] * v[:, :, 0]
    return dense(o.reshape(batch, d), p["w_o"], p["b_o"]), {"keys": k, "values": v}


def write_tokens(cache, new):
    """Each layer's new key and value into its cache at ``position``, in place (the cache is donated)."""
    at = (0, 0, cache["position"], 0)
    layers = tuple({name: jax.lax.dynamic_update_slice(c[name], n[name], at) for name in c}
                   for c, n in zip(cache["layers"], new, strict=True))
    return {"layers": layers, "position": cache["position"] + 1}


def make_attention_step(config):
    """``decode(params, cache, x_t) -> (cache, y_t)`` as two jitted calls: the layers (reading the
    caches) and the write of the new keys and values. (One program that both reads a donated cache and
    updates it in place gets full copies of the cache from XLA:CPU, several per layer, which would
    time memory copies rather than attention.)"""
    def layers(params, cache, x_t):
        h, new = x_t, []
        for p, c in zip(params["layers"], cache["layers"], strict=True):
            mix = lambda z, p=p, c=c: attention_mix(p["aaren"], c, cache["position"], z, config.n_heads)
            h, kv = layer_around(p, h, mix, config, x_t.dtype)
            new.append(kv)
        return tuple(new), h

    layers, write = jax.jit(layers), jax.jit(write_tokens, donate_argnums=(0,))

    def decode(params, cache, x_t):
        new, y = layers(params, cache, x_t)
        return write(cache, new), y

    return decode


# --------------------------------------------------------------------------------------------
# The run.


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 65536])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(RESULTS, "aaren_decode.json"))
    args = parser.parse_args(argv)

    d = args.d_model
    overrides = {"d_model": d, "n_heads": args.heads, "n_layers": args.layers, "d_ff": 4 * d}
    config = zoo.list_models()["aaren"].make_config(**overrides)
    model = zoo.get("aaren", **overrides)
    params = model.init(jax.random.key(0), d)
    att_params = attention_params(params, jax.random.key(1))
    prefill = jax.jit(lambda p, x: model.apply(p, x, mode="associative"))
    aaren_step = jax.jit(model.step)
    attention_step = make_attention_step(config)

    states, prefill_s = {}, {}
    for context in args.contexts:
        prompt = jax.random.normal(jax.random.key(context), (1, context, d), jnp.float32)
        start = time.perf_counter()
        _, state = jax.block_until_ready(prefill(params, prompt))
        prefill_s[context] = time.perf_counter() - start
        states[("aaren", context)] = state
        states[("attention", context)] = empty_cache(jax.random.key(context + 1), args.layers, context,
                                                     args.heads, d // args.heads, context - args.steps - 1)
        print(f"  prefilled {context} tokens in {prefill_s[context]:.1f} s (compile included)",
              file=sys.stderr)
    state_bytes = {key: tree_bytes(s) for key, s in states.items()}

    steps = {"aaren": (aaren_step, params), "attention": (attention_step, att_params)}
    tokens = jax.random.normal(jax.random.key(2), (args.steps + 1, 1, d), jnp.float32)
    for (name, context), state in states.items():                       # compile and warm up
        fn, p = steps[name]
        states[(name, context)], y = fn(p, state, tokens[-1])
        jax.block_until_ready((states[(name, context)], y))
    load_before = os.getloadavg()
    times = {key: [] for key in states}
    for i in range(args.steps):
        for key in states:
            fn, p = steps[key[0]]
            start = time.perf_counter()
            states[key], y = fn(p, states[key], tokens[i])
            jax.block_until_ready((states[key], y))
            times[key].append(1e3 * (time.perf_counter() - start))
    load_after = os.getloadavg()

    rows = []
    for name in steps:
        base = statistics.median(times[(name, args.contexts[0])])
        for context in args.contexts:
            median = statistics.median(times[(name, context)])
            rows.append({"model": name, "context": context, "step_ms_median": median,
                         "step_ms_min": min(times[(name, context)]), "ratio_to_first_context": median / base,
                         "state_bytes": state_bytes[(name, context)],
                         "prefill_s_with_compile": prefill_s[context] if name == "aaren" else None})
    print(f"{args.layers}-layer stacks, d_model {d}, {args.heads} heads, batch 1, {args.steps} decode steps "
          f"per context, load {load_before[0]:.1f}->{load_after[0]:.1f}")
    header = ("model", "context", "step ms", "min ms", "ratio", "state bytes")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(header, (9, 8, 8, 8, 6, 12), strict=True)))
    for r in rows:
        print(f"{r['model']:>9s} {r['context']:8d} {r['step_ms_median']:8.3f} {r['step_ms_min']:8.3f} "
              f"{r['ratio_to_first_context']:6.2f} {r['state_bytes']:12d}")
    config = {"d_model": d, "heads": args.heads, "layers": args.layers, "d_ff": 4 * d, "steps": args.steps}
    write_result(args.out, record("aaren_decode", argv, load_before, load_after, config=config, rows=rows))

if __name__ == "__main__":
    main()
