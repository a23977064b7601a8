"""Timing shared by the benchmarks: compile, one warm-up call, then the median and minimum of N runs."""

from __future__ import annotations

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
