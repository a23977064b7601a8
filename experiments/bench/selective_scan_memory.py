"""Training memory of zoo.ops.selective_scan: peak resident memory of one forward + backward.

    .venv/bin/python experiments/bench/selective_scan_memory.py                 # B=1, L=65536, D=512, N=16
    .venv/bin/python experiments/bench/selective_scan_memory.py --length 8192 --out /tmp/quick.json

Each row runs in a fresh Python process, which builds the inputs with numpy in place (no temporaries),
then runs one jitted ``jax.grad`` of the selective scan with respect to every argument, as the Mamba
block calls it (D skip, z gate, delta_bias, delta_softplus=True; float32). The loss is
``0.5 · sum(out²)``, so the output's cotangent is the output itself, as an upstream layer's cotangent
would be a [B, D, L] array. The process reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the
peak RSS of the whole process: Python, jax, XLA's compiler and every buffer), the time of that first
call (compile included) and of a second call.

Two reference rows put the figures in context:

* ``floor``: the same process that only builds the inputs, runs the forward pass, and allocates
  zeros the size of every gradient: what any implementation must hold (inputs, output, gradients).
* ``associative``: the single associative scan over all L steps, which materialises [B, L, D, N]
  states (N times the inputs). It is run only at ``--associative-length`` (default L/8), since at
  full length it needs several of those 2.1 GB arrays at once; its size at full length is
  extrapolated linearly in the JSON.

The table goes to stdout and the same numbers to a JSON file under experiments/bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_MB = 1500.0


def _child(args) -> dict:
    """One measurement, in this (fresh) process. Prints nothing; returns the row."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from zoo.ops.selective import selective_scan

    b, d, length, n = args.batch, args.channels, args.length, args.state

    # numpy writes each input once, in place (no temporaries), and jax on CPU adopts the buffer.
    rng = np.random.default_rng(0)

    def normal(shape, shift=0.0, scale=1.0):
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(scale)
        x += np.float32(shift)
        return jnp.asarray(x)

    x = {"u": normal((b, d, length)), "delta": normal((b, d, length), shift=-2.0),
         "A": -jnp.exp(normal((d, n))), "B": normal((b, n, length)), "C": normal((b, n, length)),
         "D": normal((d,)), "z": normal((b, d, length)), "delta_bias": normal((d,), scale=0.1)}
    x = jax.block_until_ready(x)
    kwargs = {"mode": args.mode} if args.mode != "floor" else {"mode": "sequential"}
    if args.chunk_size:
        kwargs["chunk_size"] = args.chunk_size

    def loss(x):
        out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                             True, **kwargs)
        return 0.5 * jnp.sum(out * out)

    if args.mode == "floor":
        fn = jax.jit(lambda x: (jax.lax.stop_gradient(loss(x)), jax.tree.map(jnp.zeros_like, x)))
    else:
        fn = jax.jit(jax.grad(loss))
    start = time.perf_counter()
    grads = jax.block_until_ready(fn(x))
    first = time.perf_counter() - start
    finite = bool(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)))
    del grads  # else the second call's gradients would sit beside the first's
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    second = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # kilobytes on Linux
    return {"mode": args.mode, "chunk_size": args.chunk_size, "B": b, "L": length, "D": d, "N": n,
            "peak_rss_mb": peak_kb / 1024, "first_call_s": first, "fwd_bwd_s": second,
            "grads_finite": finite}


def _run_fresh(mode: str, length: int, chunk_size: int | None, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--length", str(length),
           "--batch", str(args.batch), "--channels", str(args.channels), "--state", str(args.state)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"mode": mode, "chunk_size": chunk_size, "L": length, "error": done.stderr.strip()[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _states_mb(args, length: int) -> float:
    return args.batch * length * args.channels * args.state * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=0)
    parser.add_argument("--associative-length", type=int, default=0, help="L of the associative row (L/8)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "selective_scan_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    short = args.associative_length or args.length // 8
    plan = [("floor", args.length, None), ("sequential", args.length, None), ("chunked", args.length, None),
            ("sequential", short, None), ("associative", short, None)]
    rows = [_run_fresh(mode, length, chunk, args) for mode, length, chunk in plan]

    print(f"selective_scan fwd+bwd, B={args.batch} D={args.channels} N={args.state} float32; "
          f"all states [B, L, D, N] would be {_states_mb(args, args.length):.0f} MB at L={args.length}")
    print(f"{'mode':<12} {'L':>7} {'chunk':>6} {'peak RSS MB':>12} {'vs floor':>9} {'fwd+bwd s':>10} "
          f"{'1st call s':>11}")
    floor = rows[0].get("peak_rss_mb")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<12} {r['L']:>7} failed: {r['error'][-200:]}")
            continue
        ratio = f"{r['peak_rss_mb'] / floor:.2f}" if floor and r["L"] == args.length else "-"
        print(f"{r['mode']:<12} {r['L']:>7} {str(r['chunk_size'] or 'default'):>6} {r['peak_rss_mb']:>12.0f} "
              f"{ratio:>9} {r['fwd_bwd_s']:>10.2f} {r['first_call_s']:>11.2f}")

    by_key = {(r["mode"], r["L"]): r for r in rows if "error" not in r}
    extrapolated = None
    if ("associative", short) in by_key and ("sequential", short) in by_key:
        extra = by_key[("associative", short)]["peak_rss_mb"] - by_key[("sequential", short)]["peak_rss_mb"]
        extrapolated = extra * args.length / short
        print(f"associative at L={short} holds {extra:.0f} MB more than sequential: "
              f"~{extrapolated:.0f} MB more at L={args.length} (linear in L)")
    result = {
        "benchmark": "zoo.ops.selective_scan training memory (peak RSS of a fresh process, fwd+bwd)",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg()},
        "target_peak_rss_mb": TARGET_MB,
        "all_states_mb": _states_mb(args, args.length),
        "associative_extra_mb_extrapolated": extrapolated,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
