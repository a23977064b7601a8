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
