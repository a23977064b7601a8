"""Benchmark of zoo.ops.diagonal: every mode through the public [B, T, D] API.

    .venv/bin/python experiments/bench/diagonal.py                      # B=8, T=4096, D=256 float32
    .venv/bin/python experiments/bench/diagonal.py --time 512 --repeats 3 --out /tmp/quick.json

For each mode it times the forward pass and forward+backward (gradients with respect to a and b of
a random linear read-out of h), under ``jax.jit``, as the median (and minimum) of ``--repeats`` runs
after two warm-up calls. Effective bandwidth counts the bytes a perfect single pass must move: a and
b read and h written, 3·B·T·D·4 bytes, for both columns (the backward pass moves more, so its figure
is a throughput, not a bandwidth). Two baselines are measured in the same run: a numpy copy of one
[B, T, D] array (memory bandwidth of this machine), and ``lax.scan`` over time behind the transposes
that the [B, T, D] layout needs (the form ENV-NOTES §3, §10 measured); and one XLA element-wise pass
``a * b + 1`` that moves the same bytes with no recurrence, the practical ceiling for XLA on this
machine (its ratio stays meaningful on a busy machine). The table goes to stdout and the same
numbers to a JSON file under experiments/bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _timing import timed, write_result  # noqa: E402  (experiments/bench is the script's directory)

from zoo.ops import diagonal  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _numpy_copy_gbps(x: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        y = x.copy()
        times.append(time.perf_counter() - start)
        del y
    return 2 * x.nbytes / statistics.median(times[1:]) / 1e9


def _scan_behind_transposes(a, b):
    def body(h, inputs):
        h = inputs[0] * h + inputs[1]
        return h, h

    h0 = jnp.zeros((b.shape[0], *b.shape[2:]), b.dtype)
    _, h = lax.scan(body, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(h, 0, 1)


def _cases(modes):
    cases = {}
    for mode in modes:
        if mode in diagonal.MODES or mode == "auto":
            cases[mode] = lambda a, b, mode=mode: diagonal.apply(a, b, mode=mode)[0]
        elif mode.startswith("log-"):
            log_mode = mode[len("log-"):]
            cases[mode] = lambda a, b, m=log_mode: diagonal.apply_log(jnp.log(a), b, mode=m)[0]
        elif mode == "scan+transposes":
            cases[mode] = _scan_behind_transposes
        elif mode == "elementwise":
            cases[mode] = lambda a, b: a * b + 1.0          # same bytes, no recurrence: the roofline
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", default="sequential,associative,chunked,auto,log-sequential,"
                        "log-associative,scan+transposes,elementwise")
    parser.add_argument("--out", default=os.path.join(RESULTS, "diagonal.json"))
    args = parser.parse_args(argv)

    shape = (args.batch, args.time, args.width)
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.nn.sigmoid(jax.random.normal(keys[0], shape) + 2.0)   # decays in (0, 1), mostly near 1
    b = jax.random.normal(keys[1], shape)
    w = jax.random.normal(keys[2], shape)
    bytes_moved = 3 * a.size * a.dtype.itemsize

    load_before = os.getloadavg()
    copy_gbps = _numpy_copy_gbps(np.asarray(b), args.repeats)
    reference = jax.jit(_scan_behind_transposes)(a, b)
    rows = []
    for name, fn in _cases(args.modes.split(",")).items():
        forward = jax.jit(fn)
        # w is an argument, not a closed-over constant, so XLA cannot fold the cotangent into the program.
        backward = jax.jit(jax.grad(lambda a, b, w, fn=fn: jnp.sum(fn(a, b) * w), argnums=(0, 1)))
        err = float(jnp.max(jnp.abs(forward(a, b) - reference)))
        fwd, bwd = timed(forward, (a, b), args.repeats), timed(backward, (a, b, w), args.repeats)
        row = {"mode": name, "fwd_ms": fwd["median_ms"], "fwd_min_ms": fwd["min_ms"],
               "fwd_bwd_ms": bwd["median_ms"], "fwd_bwd_min_ms": bwd["min_ms"],
               "fwd_gbps": bytes_moved / fwd["median_ms"] / 1e6,
               "fwd_bwd_gbps": bytes_moved / bwd["median_ms"] / 1e6, "max_abs_err_vs_scan": err}
        row["fwd_vs_numpy_copy"] = row["fwd_gbps"] / copy_gbps
        rows.append(row)
        print(f"  measured {name}", file=sys.stderr, flush=True)

    header = (f"diagonal engine, B={args.batch} T={args.time} D={args.width} float32, "
              f"{jax.default_backend()}, median of {args.repeats} (numpy copy {copy_gbps:.1f} GB/s)")
    print(header)
    busy = max(load_before[0], os.getloadavg()[0]) > 0.75 * (os.cpu_count() or 1)
    print(f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on "
          f"{os.cpu_count()} cores" + ("; the machine was busy: re-run before comparing" if busy else ""))
    print(f"{'mode':18s} {'fwd ms':>8s} {'GB/s':>6s} {'x copy':>7s} {'fwd+bwd ms':>11s} {'GB/s':>6s} "
          f"{'min fwd':>8s} {'min f+b':>8s} {'err':>8s}")
    for r in rows:
        print(f"{r['mode']:18s} {r['fwd_ms']:8.2f} {r['fwd_gbps']:6.2f} {r['fwd_vs_numpy_copy']:7.2f} "
              f"{r['fwd_bwd_ms']:11.2f} {r['fwd_bwd_gbps']:6.2f} {r['fwd_min_ms']:8.2f} "
              f"{r['fwd_bwd_min_ms']:8.2f} {r['max_abs_err_vs_scan']:8.1e}")

    record = {
        "benchmark": "zoo.ops.diagonal", "shape": {"B": args.batch, "T": args.time, "D": args.width},
        "dtype": "float32", "repeats": args.repeats, "bytes_per_pass": bytes_moved,
        "numpy_copy_gbps": copy_gbps, "rows": rows,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
        "when_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python experiments/bench/diagonal.py", *(sys.argv[1:] if argv is None
                                                                         else argv)]),
    }
    write_result(args.out, record)


if __name__ == "__main__":
    main()
