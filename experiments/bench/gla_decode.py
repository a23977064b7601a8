"""Benchmark: per-token decode latency of a 4-layer GLA model, with the state carried from a context of
1k tokens and of 64k tokens.

    .venv/bin/python experiments/bench/gla_decode.py                 # d_model 256, contexts 1024 and 65536
    .venv/bin/python experiments/bench/gla_decode.py --contexts 1024 8192 --steps 50 --out /tmp/quick.json

The model is ``zoo.stack`` of four ``zoo.residual(zoo.get("gla", d_model=D))`` blocks (pre-norm, GLA
token mixer, MLP). For each context length the prompt (random embeddings, batch 1) is run through
``apply`` in the chunked mode (the prefill), and its final state is carried into ``step``, which then
decodes ``--steps`` tokens one at a time, each call jitted and waited for. The state is O(1) (one
[H, K, V] matrix per layer), so the latency should not depend on the context: the target is
latency(64k) / latency(1k) <= 1.1. Contexts are timed interleaved, one token of each per round, so
load changes hit both alike. The state size in bytes is printed too, with the size a softmax
attention KV cache of the same width would have at that context, for scale.
"""

from __future__ import annotations

import argparse
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(d_model: int, layers: int):
    return zoo.stack(*[zoo.residual(zoo.get("gla", d_model=d_model, n_heads=4, chunk_size=64))
                       for _ in range(layers)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 65536])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(RESULTS, "gla_decode.json"))
    args = parser.parse_args(argv)

    model = build(args.d_model, args.layers)
    params = model.init(jax.random.key(0), args.d_model)
    prefill = jax.jit(lambda p, x: model.apply(p, x, mode="chunked"))
    step = jax.jit(model.step)

    states, prefill_s = {}, {}
    for context in args.contexts:
        prompt = jax.random.normal(jax.random.key(context), (1, context, args.d_model), jnp.float32)
        start = time.perf_counter()
        _, state = jax.block_until_ready(prefill(params, prompt))
        prefill_s[context] = time.perf_counter() - start
        states[context] = state
        print(f"  prefilled {context} tokens in {prefill_s[context]:.1f} s (compile included)",
              file=sys.stderr)

    tokens = jax.random.normal(jax.random.key(1), (args.steps, 1, args.d_model), jnp.float32)
    for context in args.contexts:                                  # compile and warm up
        jax.block_until_ready(step(params, states[context], tokens[0]))
    load_before = os.getloadavg()
    times = {context: [] for context in args.contexts}
    for i in range(args.steps):
        for context in args.contexts:
            start = time.perf_counter()
            states[context], y = step(params, states[context], tokens[i])
            jax.block_until_ready(y)
            times[context].append(1e3 * (time.perf_counter() - start))
    load_after = os.getloadavg()

    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states[args.contexts[0]]))
    base = statistics.median(times[args.contexts[0]])
    rows = []
    for context in args.contexts:
        median = statistics.median(times[context])
        kv_cache = 2 * args.layers * context * args.d_model * 4       # K and V, float32, per layer
        rows.append({"context": context, "step_ms_median": median, "step_ms_min": min(times[context]),
                     "ratio_to_first_context": median / base, "state_bytes": state_bytes,
                     "softmax_kv_cache_bytes": kv_cache, "prefill_s_with_compile": prefill_s[context]})
    print(f"{args.layers}-layer GLA, d_model {args.d_model}, batch 1, {args.steps} decode steps per context, "
          f"load {load_before[0]:.1f}->{load_after[0]:.1f}")
    header = ("context", "step ms", "min ms", "ratio", "state MB", "KV cache MB")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(header, (8, 8, 7, 6, 9, 12), strict=True)))
    for r in rows:
        print(f"{r['context']:8d} {r['step_ms_median']:8.3f} {r['step_ms_min']:7.3f} "
              f"{r['ratio_to_first_context']:6.3f} {r['state_bytes'] / 2**20:9.2f} "
              f"{r['softmax_kv_cache_bytes'] / 2**20:12.1f}")
    config = {"d_model": args.d_model, "layers": args.layers, "steps": args.steps}
    write_result(args.out, record("gla_decode", argv, load_before, load_after, config=config, rows=rows))

if __name__ == "__main__":
    main()
