"""Shared by the benchmarks: timing (compile, one warm-up call, then the median and minimum of N runs)
and writing the JSON record."""

from __future__ import annotations

import json
import os
import statistics
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
