"""Benchmark: one S4 training step (forward + backward) in conv mode against recurrent mode.

    .venv/bin/python experiments/bench/s4_conv_vs_recurrent.py                # B=1, T=16384, H=16, N=16
    .venv/bin/python experiments/bench/s4_conv_vs_recurrent.py --time 2048 --out /tmp/quick.json

The step is ``jax.value_and_grad`` of a random linear read-out of the layer's outputs with respect to
all params, under ``jax.jit``, through the registered ``zoo.get("s4")`` layer: conv mode computes the
kernel by S4's Cauchy/Woodbury algorithm and convolves by FFT; recurrent mode runs the same
bilinear recurrence with a dense real Ā by ``lax.scan``. Times are the median (and minimum) of
``--repeats`` runs after a compile and a warm-up call. The outputs of the two modes are compared
as a check. The table goes to stdout, the same numbers to a JSON file under
experiments/bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _timing import timed, write_result  # noqa: E402  (experiments/bench is the script's directory)

import zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--time", type=int, default=16384)
    parser.add_argument("--width", type=int, default=16, help="d_model H (channels)")
    parser.add_argument("--state", type=int, default=16, help="d_state N (N/2 complex pairs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "s4_conv_vs_recurrent.json"))
    args = parser.parse_args(argv)

    rec = zoo.get("s4", d_model=args.width, d_state=args.state)
    keys = jax.random.split(jax.random.key(0), 3)
    params = rec.init(keys[0], args.width)
    xs = jax.random.normal(keys[1], (args.batch, args.time, args.width), jnp.float32)
    w = jax.random.normal(keys[2], xs.shape, jnp.float32)

    def train_step(mode):
        def loss(params, xs, w):
            return jnp.sum(rec.apply(params, xs, mode=mode)[0] * w)

        return jax.jit(jax.value_and_grad(loss))

    load_before = os.getloadavg()
    rows = {}
    outputs = {}
    for mode in ("conv", "recurrent"):
        step = train_step(mode)
        rows[mode] = timed(step, (params, xs, w), args.repeats)
        outputs[mode] = jax.jit(lambda p, x, m=mode: rec.apply(p, x, mode=m)[0])(params, xs)
        print(f"  measured {mode}", file=sys.stderr, flush=True)
    scale = float(jnp.max(jnp.abs(outputs["recurrent"])))
    max_err = float(jnp.max(jnp.abs(outputs["conv"] - outputs["recurrent"])))
    ratio = rows["recurrent"]["median_ms"] / rows["conv"]["median_ms"]

    print(f"S4 training step (fwd+bwd, all params), B={args.batch} T={args.time} H={args.width} "
          f"N={args.state} float32, {jax.default_backend()}, median of {args.repeats}")
    print(f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on "
          f"{os.cpu_count()} cores")
    print(f"{'mode':10s} {'median ms':>10s} {'min ms':>10s}")
    for mode, r in rows.items():
        print(f"{mode:10s} {r['median_ms']:10.1f} {r['min_ms']:10.1f}")
    print(f"recurrent / conv = {ratio:.2f}x   (max |conv - recurrent| = {max_err:.1e}, "
          f"output scale {scale:.2f})")

    record = {
        "benchmark": "s4 conv vs recurrent training step",
        "shape": {"B": args.batch, "T": args.time, "H": args.width, "N": args.state},
        "dtype": "float32", "repeats": args.repeats, "rows": rows, "recurrent_over_conv": ratio,
        "max_abs_diff_outputs": max_err, "output_scale": scale,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
        "when_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python experiments/bench/s4_conv_vs_recurrent.py",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    write_result(args.out, record)


if __name__ == "__main__":
    main()
