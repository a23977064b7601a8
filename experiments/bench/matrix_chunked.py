"""Benchmark: the matrix engine's chunked form against its sequential scan, and zoo's mLSTM against
``mlstm_kernels``' JAX chunkwise kernel, forward + backward.

    .venv/bin/python experiments/bench/matrix_chunked.py                  # B=2, T=4096, H=4, K=V=64
    .venv/bin/python experiments/bench/matrix_chunked.py --time 1024 --repeats 3 --out /tmp/quick.json

Rows (float32, jitted, gradient of a random linear read-out of the outputs with respect to every input):

* ``gla`` (``zoo.ops.gla``, a log decay per key dimension) and ``mlstm`` (``zoo.ops.mlstm``, scalar
  sigmoid forget gate, exponential input gate, normaliser and stabiliser): ``mode="chunked"`` (each
  op's default chunk, and 64) against ``mode="sequential"``. Target: chunked >= 5x faster.
* ``mlstm_kernels chunkwise--native_autograd``: the xLSTM authors' JAX chunkwise kernel (chunk 64),
  loaded from the installed package by ``tests/refs/mlstm_kernels_reference.py``, on the same inputs
  (layout [B, H, T, D] there). Target: zoo's chunked mLSTM >= 1.0x its speed.
* a [4096 x 512] @ [512 x 512] float32 matmul, timed in the same run: the machine's achievable GFLOP/s,
  against which each chunked row's algorithmic GFLOP/s is reported (its forward FLOPs, 2C(K+V) + 4KV
  per token and head, times 3 for forward + backward).

Implementations are timed interleaved (one call of each per round, after a compile and a warm-up
call), so a change in the machine's load hits all alike. The table goes to stdout and the JSON to
experiments/bench/results/matrix_chunked.json.
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

from zoo.ops import gla, mlstm  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _inputs(b, t, h, dk, dv):
    keys = jax.random.split(jax.random.key(0), 7)
    q = jax.random.normal(keys[0], (b, t, h, dk), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, h, dk), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, h, dv), jnp.float32)
    gk = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h, dk)) + 3.0) / 16.0
    i = jax.random.normal(keys[4], (b, t, h), jnp.float32)
    f = jax.random.normal(keys[5], (b, t, h), jnp.float32) + 3.0
    w = jax.random.normal(keys[6], (b, t, h, dv), jnp.float32)
    return q, k, v, gk, i, f, w


def _cases(args):
    cases = {}
    for mode, chunk in (("chunked", None), ("chunked", 64), ("sequential", None)):
        label = mode if chunk is None else f"{mode} {chunk}"
        cases[f"gla {label}"] = (lambda q, k, v, gk, i, f, mode=mode, chunk=chunk:
                                 gla(q, k, v, gk, mode=mode, chunk_size=chunk)[0], "gla", chunk)
        cases[f"mlstm {label}"] = (lambda q, k, v, gk, i, f, mode=mode, chunk=chunk:
                                   mlstm(q, k, v, i, f, mode=mode, chunk_size=chunk)[0], "mlstm", chunk)
    try:
        from tests.refs.mlstm_kernels_reference import load_mlstm_kernels_reference
        ref = load_mlstm_kernels_reference()
    except BaseException as error:      # pytest.skip raises a BaseException when the package is absent
        print(f"  mlstm_kernels not available ({error}); its row is skipped", file=sys.stderr)
    else:
        def kernel(q, k, v, gk, i, f):
            heads_first = lambda x: jnp.moveaxis(x, 2, 1)
            h = ref.mlstm_chunkwise(heads_first(q), heads_first(k), heads_first(v), jnp.moveaxis(i, 2, 1),
                                    jnp.moveaxis(f, 2, 1), chunk_size=64)
            return jnp.moveaxis(h, 1, 2)

        cases["mlstm_kernels chunkwise--native_autograd"] = (kernel, "mlstm", 64)
    return cases


def _chunk_flops(b, t, h, dk, dv, chunk):
    return 3 * b * t * h * (2 * chunk * (dk + dv) + 4 * dk * dv)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(RESULTS, "matrix_chunked.json"))
    args = parser.parse_args(argv)

    q, k, v, gk, i, f, w = _inputs(args.batch, args.time, args.heads, args.dk, args.dv)
    flops = functools.partial(_chunk_flops, args.batch, args.time, args.heads, args.dk, args.dv)
    # Both ops default to chunks of 64.
    rows, matmul_gflops, load_before, load_after = chunked_against_sequential(
        _cases(args), (q, k, v, gk, i, f), w, args.repeats, flops, 64)
    by_name = {r["impl"]: r for r in rows}
    if "mlstm_kernels chunkwise--native_autograd" in by_name:
        base = by_name["mlstm_kernels chunkwise--native_autograd"]["fwd_bwd_ms"]
        for r in rows:
            if r["impl"].startswith("mlstm"):
                r["speedup_vs_mlstm_kernels"] = base / r["fwd_bwd_ms"]

    print(f"B={args.batch} T={args.time} H={args.heads} K={args.dk} V={args.dv} float32, forward+backward, "
          f"median of {args.repeats}; matmul {matmul_gflops:.1f} GFLOP/s; load {load_before[0]:.1f}->"
          f"{load_after[0]:.1f}")
    print(f"{'impl':44s} {'ms':>9s} {'vs seq':>7s} {'GFLOP/s':>8s} {'of mm':>6s} {'vs mlstm_k':>10s}")
    for r in rows:
        print(f"{r['impl']:44s} {r['fwd_bwd_ms']:9.1f} {r['speedup_vs_sequential']:7.2f} "
              f"{r.get('gflops', float('nan')):8.2f} {r.get('fraction_of_matmul', float('nan')):6.2f} "
              f"{r.get('speedup_vs_mlstm_kernels', float('nan')):10.2f}")
    shape = {"batch": args.batch, "time": args.time, "heads": args.heads, "dk": args.dk, "dv": args.dv}
    write_result(args.out, record("matrix_chunked", argv, load_before, load_after, shape=shape,
                                  matmul_gflops=matmul_gflops, rows=rows))

if __name__ == "__main__":
    main()
