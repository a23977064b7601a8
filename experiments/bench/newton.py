"""Benchmark of ``mode="newton"`` (DEER / ParaRNN) against the sequential scan of the same cell.

    .venv/bin/python experiments/bench/newton.py                         # T = 4096 and 65536
    .venv/bin/python experiments/bench/newton.py --times 512 --repeats 2 --out /tmp/quick.json

The cell is ParaGRU (``zoo.get("gru", d_model=256, recurrence="diagonal")``: the GRU with diagonal
recurrent weights of "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large Language
Models"), whose Jacobian is diagonal, at B=8, D=256, float32. Timed: forward+backward (the gradient
of a random linear read-out of the outputs with respect to the parameters and the inputs) under
``jax.jit``, median of ``--repeats`` after compile and one warm-up, for

* ``sequential``: the nonlinear engine's time loop (T dependent steps);
* ``newton``: Newton iterations whose linear recurrences run the diagonal engine's one-pass form
  (``linear_mode="sequential"``, the fastest on CPU), plus the implicit backward pass;
* ``newton-associative``: the same with ``lax.associative_scan`` (O(log T) depth, the accelerator
  form).

It also records the iterations Newton took (through ``NewtonOptions.callback``) and the parallel
depth of each form: T steps for the scan, and iterations · (⌈log2 T⌉ + 1) for Newton with the
associative solve, plus ⌈log2 T⌉ for its backward recurrence: what an accelerator with enough cores
pays. On 2 CPU cores both forms are throughput-bound, so the wall-clock ratio says little about
an accelerator.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _timing import record, timed, write_result  # noqa: E402  (experiments/bench is the script's directory)

import zoo  # noqa: E402
from zoo.ops import nonlinear  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class _Stats(list):
    """Collects ``(iterations, residual, converged)`` from ``NewtonOptions.callback``."""

    def append_stats(self, *stats):
        self.append(stats)


def _loss(rec, mode):
    def loss(params, xs, readout):
        ys, _ = rec.apply(params, xs, mode=mode)
        return jnp.sum(ys * readout)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def run(batch: int, times: list[int], width: int, repeats: int) -> list[dict]:
    rec = zoo.get("gru", d_model=width, recurrence="diagonal")
    params = rec.init(jax.random.key(0), width)
    rows = []
    for time_steps in times:
        xs = jax.random.normal(jax.random.key(1), (batch, time_steps, width), jnp.float32)
        readout = jax.random.normal(jax.random.key(2), (batch, time_steps, width), jnp.float32) / width
        row = {"B": batch, "T": time_steps, "D": width}
        reference = None
        for label, linear_mode in [("sequential", None), ("newton", "sequential"),
                                   ("newton-associative", "associative")]:
            seen = _Stats()
            mode = "sequential" if linear_mode is None else "newton"
            with nonlinear.newton_options(linear_mode=linear_mode or "auto", callback=seen.append_stats):
                fn = _loss(rec, mode)
                row[f"{label}_ms"] = timed(fn, (params, xs, readout), repeats)["median_ms"]
                value, grads = fn(params, xs, readout)
            if reference is None:
                reference = (float(value), grads)
            else:
                scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reference[1]))
                row[f"{label}_max_grad_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                                    zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1]),
                                                        strict=True)) / scale
            if seen:
                iterations = int(seen[-1][0])
                row[f"{label}_iterations"] = iterations
                row[f"{label}_converged"] = bool(seen[-1][2])
        log_t = math.ceil(math.log2(time_steps))
        row["depth_sequential"] = time_steps
        row["depth_newton_associative"] = row["newton-associative_iterations"] * (log_t + 1) + log_t
        row["newton_over_sequential"] = row["newton_ms"] / row["sequential_ms"]
        row["associative_over_sequential"] = row["newton-associative_ms"] / row["sequential_ms"]
        rows.append(row)
        print(f"T={time_steps:6d}  sequential {row['sequential_ms']:9.1f} ms | "
              f"newton {row['newton_ms']:9.1f} ms "
              f"({row['newton_over_sequential']:.2f}x, {row['newton_iterations']} iterations) | "
              f"newton-associative {row['newton-associative_ms']:9.1f} ms "
              f"({row['associative_over_sequential']:.2f}x) | depth {row['depth_sequential']} -> "
              f"{row['depth_newton_associative']} | grad diff {row['newton_max_grad_diff']:.1e}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--times", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "newton.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = run(args.batch, args.times, args.width, args.repeats)
    write_result(args.out, record("newton", argv, load_before, os.getloadavg()[0], cell="paragru",
                                  dtype="float32", rows=rows, devices=str(np.array(jax.devices()))))


if __name__ == "__main__":
    main()
