"""Shared by the benchmarks: timing (compile, one warm-up call, then the median and minimum of N runs)
and writing the JSON record."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax


def timed(fn, args, repeats: int) -> dict[str, float]:
    """``{"median_ms", "min_ms"}`` of ``fn(*args)`` over ``repeats`` runs after compile and warm-up."""
    jax.block_until_ready(fn(*args))            # compile
    jax.block_until_ready(fn(*args))            # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def write_result(path: str, record: dict) -> None:
    """Write a benchmark's record as indented JSON (creating the folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


def record(benchmark: str, argv, load_before, load_after, **fields) -> dict:
    """A result record: the benchmark's name, date, the command that reproduces it, the machine (CPU
    count, platform, jax version and the load average before and after), then ``fields``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "benchmark": benchmark, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": f"python experiments/bench/{benchmark}.py " + " ".join(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "load_before": load_before, "load_after": load_after},
        **fields,
    }


def matmul_probe(rows: int = 4096, inner: int = 512, cols: int = 512):
    """A same-run yardstick: a jitted [rows, inner] @ [inner, cols] float32 matmul (compiled and run
    once) and its FLOP count."""
    a = jax.random.normal(jax.random.key(1), (rows, inner), jax.numpy.float32)
    b = jax.random.normal(jax.random.key(2), (inner, cols), jax.numpy.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    return (lambda: matmul(a, b)), 2 * rows * inner * cols


def chunked_against_sequential(cases: dict, inputs: tuple, weights, repeats: int, flops, default_chunk: int):
    """Forward+backward timings of ``cases`` ({name: (fn, family, chunk or None)}, each family with a
    "<family> sequential" case) and their speed-ups over the sequential case of their family.

    Each case's gradient of sum(fn(*inputs) * weights) is compiled and warmed up, then the cases and
    a matmul probe run interleaved, one call each per round, so that a change in the machine's load
    hits all alike. ``flops(chunk)`` is a chunked case's algorithmic FLOP count. Returns
    (rows, matmul GFLOP/s, load before, load after)."""
    programs, outputs = {}, {}
    argnums = tuple(range(len(inputs)))
    for name, (fn, family, _) in cases.items():
        loss = lambda *xs, fn=fn: jax.numpy.sum(fn(*xs[:-1]) * xs[-1])  # noqa: E731
        programs[name] = jax.jit(jax.grad(loss, argnums=argnums))
        outputs[name] = (family, jax.jit(fn)(*inputs))
        for _ in range(2):                                       # compile, then warm up
            jax.block_until_ready(programs[name](*inputs, weights))
        print(f"  compiled {name}", file=sys.stderr, flush=True)
    matmul, matmul_flops = matmul_probe()

    load_before = os.getloadavg()
    times = {name: [] for name in programs}
    matmul_times = []
    for _ in range(repeats):
        for name, fn in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs, weights))
            times[name].append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        jax.block_until_ready(matmul())
        matmul_times.append(time.perf_counter() - start)
    load_after = os.getloadavg()
    matmul_gflops = matmul_flops / statistics.median(matmul_times) / 1e9

    rows = []
    for name, t in times.items():
        family, out = outputs[name]
        row = {"impl": name, "fwd_bwd_ms": statistics.median(t), "fwd_bwd_min_ms": min(t)}
        if "sequential" not in name:
            row["gflops"] = flops(cases[name][2] or default_chunk) / (row["fwd_bwd_ms"] / 1e3) / 1e9
            row["fraction_of_matmul"] = row["gflops"] / matmul_gflops
        if f"{family} sequential" in outputs:
            seq = outputs[f"{family} sequential"][1]
            row["max_rel_diff_vs_sequential"] = float(jax.numpy.max(jax.numpy.abs(out - seq))
                                                      / jax.numpy.max(jax.numpy.abs(seq)))
        rows.append(row)
    by_name = {r["impl"]: r for r in rows}
    for r in rows:
        family = outputs[r["impl"]][0]
        if f"{family} sequential" in by_name:
            r["speedup_vs_sequential"] = by_name[f"{family} sequential"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows, matmul_gflops, load_before, load_after
