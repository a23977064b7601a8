"""Benchmark: zoo's RG-LRU layer against recurrentgemma's ``RGLRU`` layer, forward and backward.

    .venv/bin/python experiments/bench/rglru.py                        # B=8, T=4096, width 256, float32
    .venv/bin/python experiments/bench/rglru.py --time 512 --repeats 3 --out /tmp/quick.json

Both layers get the same parameters (recurrentgemma's initialisation, converted with
``zoo.convert.from_recurrentgemma_rglru``) and the same inputs, one segment (recurrentgemma's
``segment_pos = arange(T)``). Timed under ``jax.jit``: the forward pass, and forward+backward as the
gradient of a random linear read-out of the outputs with respect to the inputs and all parameters.
recurrentgemma runs each CPU scan it offers (``LINEAR_NATIVE``, a ``lax.scan``, and
``ASSOCIATIVE_NATIVE``; ``LINEAR_PALLAS`` runs only on TPU/GPU), and the fastest is the baseline;
zoo runs ``mode="auto"`` (the sequential pass on CPU) and its other modes. The implementations are
timed interleaved (one call of each per round, after two warm-up calls each), so that a change in
the machine's load hits all of them alike; the table gives medians and the baseline/zoo ratio
(above 1: zoo is faster). The same numbers go to a JSON file under experiments/bench/results/.

Needs recurrentgemma (the ``refs`` extra; see pyproject.toml).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _timing import write_result  # noqa: E402  (experiments/bench is the script's directory)

from zoo.convert import from_recurrentgemma_rglru  # noqa: E402
from zoo.models import rglru  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _recurrentgemma_cases(width, heads, x, positions):
    import recurrentgemma.jax as rg

    cases, params = {}, None
    for scan in ("LINEAR_NATIVE", "ASSOCIATIVE_NATIVE"):
        layer = rg.RGLRU(width=width, num_heads=heads, scan_type=getattr(rg.ScanType, scan))
        if params is None:
            params = layer.init(jax.random.key(0), x[:, :8], positions[:, :8])

        def run(p, x, layer=layer):
            return layer.apply(p, x, positions)[0]

        cases[f"recurrentgemma {scan}"] = run
    return cases, params


def _zoo_cases(batch, width):
    state = rglru.layer_initial_state(batch, width)
    cases = {}
    for mode in ("auto", "sequential", "associative", "chunked"):
        def run(p, x, mode=mode):
            return rglru.layer_apply(from_recurrentgemma_rglru(p), x, state, mode=mode)[0]

        cases[f"zoo {mode}"] = run
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4, help="blocks of the block-diagonal gates")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=os.path.join(RESULTS, "rglru.json"))
    args = parser.parse_args(argv)

    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (args.batch, args.time, args.width), jnp.float32)
    w = jax.random.normal(keys[1], x.shape, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(args.time, dtype=jnp.int32), (args.batch, args.time))
    rg_cases, params = _recurrentgemma_cases(args.width, args.heads, x, positions)
    cases = {**rg_cases, **_zoo_cases(args.batch, args.width)}

    programs = {}
    reference = None
    errors = {}
    for name, fn in cases.items():
        forward = jax.jit(fn)
        # w is an argument, not a closed-over constant, so XLA cannot fold the cotangent into the program.
        backward = jax.jit(jax.grad(lambda p, x, w, fn=fn: jnp.sum(fn(p, x) * w), argnums=(0, 1)))
        y = forward(params, x)
        reference = y if reference is None else reference
        errors[name] = float(jnp.max(jnp.abs(y - reference)))
        programs[name] = {"fwd": (forward, (params, x)), "fwd_bwd": (backward, (params, x, w))}
        for fn_, fn_args in programs[name].values():
            for _ in range(2):                                   # compile, then warm up
                jax.block_until_ready(fn_(*fn_args))
        print(f"  compiled {name}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    times = {name: {"fwd": [], "fwd_bwd": []} for name in cases}
    for _ in range(args.repeats):
        for name, kinds in programs.items():
            for kind, (fn, fn_args) in kinds.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                times[name][kind].append(1e3 * (time.perf_counter() - start))
    load_after = os.getloadavg()

    rows = [{"impl": name, "fwd_ms": statistics.median(t["fwd"]), "fwd_min_ms": min(t["fwd"]),
             "fwd_bwd_ms": statistics.median(t["fwd_bwd"]), "fwd_bwd_min_ms": min(t["fwd_bwd"]),
             "max_abs_diff_vs_recurrentgemma": errors[name]} for name, t in times.items()]
    baseline = min((r for r in rows if r["impl"].startswith("recurrentgemma")), key=lambda r: r["fwd_bwd_ms"])
    for r in rows:
        r["fwd_speedup_vs_baseline"] = baseline["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup_vs_baseline"] = baseline["fwd_bwd_ms"] / r["fwd_bwd_ms"]

    print(f"RG-LRU layer, B={args.batch} T={args.time} width={args.width} heads={args.heads} float32, "
          f"{jax.default_backend()}, median of {args.repeats} interleaved rounds")
    busy = max(load_before[0], load_after[0]) > 0.75 * (os.cpu_count() or 1)
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on "
          f"{os.cpu_count()} cores" + ("; the machine was busy: re-run before comparing" if busy else ""))
    print(f"baseline: {baseline['impl']} (the faster recurrentgemma scan, forward+backward)")
    print(f"{'implementation':34s} {'fwd ms':>8s} {'x base':>7s} {'fwd+bwd ms':>11s} {'x base':>7s} "
          f"{'max diff':>9s}")
    for r in rows:
        print(f"{r['impl']:34s} {r['fwd_ms']:8.1f} {r['fwd_speedup_vs_baseline']:7.2f} "
              f"{r['fwd_bwd_ms']:11.1f} {r['fwd_bwd_speedup_vs_baseline']:7.2f} "
              f"{r['max_abs_diff_vs_recurrentgemma']:9.1e}")

    import recurrentgemma

    record = {
        "benchmark": "RG-LRU layer: zoo.models.rglru.layer_apply vs recurrentgemma.jax.RGLRU",
        "shape": {"B": args.batch, "T": args.time, "width": args.width, "heads": args.heads},
        "dtype": "float32", "repeats": args.repeats, "interleaved": True, "baseline": baseline["impl"],
        "rows": rows, "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
        "recurrentgemma": getattr(recurrentgemma, "__version__", "1.0.1"),
        "when_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python experiments/bench/rglru.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    write_result(args.out, record)


if __name__ == "__main__":
    main()
