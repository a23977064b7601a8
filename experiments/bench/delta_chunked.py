"""Benchmark: the delta-rule engine's chunked (WY / UT) form against its sequential scan, forward + backward.

    .venv/bin/python experiments/bench/delta_chunked.py                  # B=2, T=4096, H=4, K=V=64
    .venv/bin/python experiments/bench/delta_chunked.py --time 1024 --repeats 3 --out /tmp/quick.json

Rows (float32, jitted, gradient of a random linear read-out of the outputs with respect to every input:
q, k, v, β and the log decay g): ``gated_delta_rule`` (``zoo.ops.gated_delta_rule``, L2-normalised
q and k, β = σ(·), g = log σ(·) / 16) and ``delta_rule`` (no decay), each with ``mode="chunked"``
(the default chunk, 64, and 32) against ``mode="sequential"``. Target: chunked >= 5x faster.

A [4096 x 512] @ [512 x 512] float32 matmul is timed in the same run: the machine's achievable
GFLOP/s, against which each chunked row's algorithmic GFLOP/s is reported (forward FLOPs per token
and head: 2C(2K + 2V) for the solve's right-hand sides, the scores and the intra-chunk read-out,
C K for A, and 6 K V for the state's read, write and read-out; times 3 for forward + backward).

Implementations are timed interleaved (one call of each per round, after a compile and a warm-up
call), so a change in the machine's load hits all alike. The table goes to stdout and the JSON to
experiments/bench/results/delta_chunked.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from _timing import chunked_against_sequential, record, write_result  # noqa: E402  (experiments/bench is the script's directory)

from zoo.ops.delta_chunks import DEFAULT_CHUNK  # noqa: E402
from zoo.ops.delta_ops import delta_rule, gated_delta_rule  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _inputs(b, t, h, dk, dv):
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (b, t, h, dk), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, h, dk), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, h, dv), jnp.float32)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, h), jnp.float32))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, t, h)) + 3.0) / 16.0
    w = jax.random.normal(keys[5], (b, t, h, dv), jnp.float32)
    return q, k, v, beta, g, w


def _cases():
    cases = {}
    for mode, chunk in (("chunked", None), ("chunked", 32), ("sequential", None)):
        label = mode if chunk is None else f"{mode} {chunk}"
        cases[f"gated_delta_rule {label}"] = (
            lambda q, k, v, beta, g, mode=mode, chunk=chunk: gated_delta_rule(
                q, k, v, g, beta, use_qk_l2norm_in_kernel=True, mode=mode, chunk_size=chunk)[0],
            "gated_delta_rule", chunk)
        cases[f"delta_rule {label}"] = (
            lambda q, k, v, beta, g, mode=mode, chunk=chunk: delta_rule(
                q, k, v, beta, use_qk_l2norm_in_kernel=True, mode=mode, chunk_size=chunk)[0],
            "delta_rule", chunk)
    return cases


def _chunk_flops(b, t, h, dk, dv, chunk):
    return 3 * b * t * h * (2 * chunk * (2 * dk + 2 * dv) + chunk * dk + 6 * dk * dv)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--out", default=os.path.join(RESULTS, "delta_chunked.json"))
    args = parser.parse_args(argv)

    q, k, v, beta, g, w = _inputs(args.batch, args.time, args.heads, args.dk, args.dv)
    cases = {name: case for name, case in _cases().items() if args.only is None or args.only in name}
    flops = functools.partial(_chunk_flops, args.batch, args.time, args.heads, args.dk, args.dv)
    rows, matmul_gflops, load_before, load_after = chunked_against_sequential(
        cases, (q, k, v, beta, g), w, args.repeats, flops, DEFAULT_CHUNK)

    print(f"B={args.batch} T={args.time} H={args.heads} K={args.dk} V={args.dv} float32, forward+backward, "
          f"median of {args.repeats}; matmul {matmul_gflops:.1f} GFLOP/s; load {load_before[0]:.1f}->"
          f"{load_after[0]:.1f}")
    print(f"{'impl':34s} {'ms':>9s} {'min ms':>9s} {'vs seq':>7s} {'GFLOP/s':>8s} {'of mm':>6s} "
          f"{'rel diff':>9s}")
    for r in rows:
        print(f"{r['impl']:34s} {r['fwd_bwd_ms']:9.1f} {r['fwd_bwd_min_ms']:9.1f} "
              f"{r.get('speedup_vs_sequential', float('nan')):7.2f} {r.get('gflops', float('nan')):8.2f} "
              f"{r.get('fraction_of_matmul', float('nan')):6.2f} "
              f"{r.get('max_rel_diff_vs_sequential', float('nan')):9.1e}")
    shape = {"batch": args.batch, "time": args.time, "heads": args.heads, "dk": args.dk, "dv": args.dv}
    write_result(args.out, record("delta_chunked", argv, load_before, load_after, shape=shape,
                                  matmul_gflops=matmul_gflops, rows=rows))


if __name__ == "__main__":
    main()
