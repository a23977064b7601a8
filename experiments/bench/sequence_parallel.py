"""Benchmark of zoo.parallel.sequence: the sequence-parallel diagonal scan on 8 fake CPU devices
against the plain engine on 1 device.

    .venv/bin/python experiments/bench/sequence_parallel.py                  # B=2, T=65536, D=16 float32
    .venv/bin/python experiments/bench/sequence_parallel.py --time 8192 --repeats 3 --out /tmp/quick.json

Both run ``h_t = a_t ⊙ h_{t-1} + b_t`` with an initial state under ``jax.jit``, forward and
forward+backward (gradients w.r.t. a, b and the initial state of a random readout of h and the final
state), as the median (and minimum) of ``--repeats`` runs after a compile and a warm-up call
(``_timing.timed``, which blocks on every call: un-awaited collectives deadlock fake CPU devices,
ENV-NOTES §4). Time is split over ``--devices`` devices; the 1-device run is ``zoo.ops.diagonal.apply``.

Bytes exchanged per shard are computed from the summary shapes and the collectives the code uses:
one ``all_gather`` of the summaries (each shard receives the other n - 1 summaries, a total decay and
a final state of [B, D] each) plus one ``psum`` that replicates the final state ([B, D]; a ring
all-reduce moves 2 (n - 1) / n of it per shard). Neither depends on T; for scale, the line prints what
exchanging one shard's activations h ([B, T/n, D]) would cost instead.

The fake devices are threads of one process sharing this machine's cores (2 here, also shared with
other jobs), so the ratio measures the overhead of the split (the summary pass, the combine, the
collectives), not the speed-up of real devices, which each bring their own cores and memory.
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: the fake CPU devices are created with the backend.
DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICES_FLAG}".strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _timing import record, timed, write_result  # noqa: E402  (experiments/bench is the script's directory)

from zoo.ops import diagonal  # noqa: E402
from zoo.parallel import sequence  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def exchanged_bytes(batch: int, width: int, time: int, shards: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes each shard receives in the combine, from the summary shapes; and, for scale, the bytes of
    one shard's activations, which an O(T) scheme would have to move."""
    summary = sequence.summary_bytes("diagonal", batch, (width,), itemsize=itemsize)["summary"]
    state = batch * width * itemsize
    all_gather = (shards - 1) * summary
    psum_final = 2 * (shards - 1) * state // shards
    return {"summary_per_shard": summary, "all_gather_received": all_gather, "psum_final_state": psum_final,
            "total_per_shard": all_gather + psum_final,
            "activations_per_shard": batch * (time // shards) * width * itemsize}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--time", type=int, default=65536)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(RESULTS, "sequence_parallel.json"))
    args = parser.parse_args(argv)

    shape = (args.batch, args.time, args.width)
    keys = jax.random.split(jax.random.key(0), 5)
    a = jax.nn.sigmoid(jax.random.normal(keys[0], shape) + 2.0)   # decays in (0, 1), mostly near 1
    b = jax.random.normal(keys[1], shape)
    h0 = jax.random.normal(keys[2], (args.batch, args.width))
    w = jax.random.normal(keys[3], shape)
    w_final = jax.random.normal(keys[4], (args.batch, args.width))
    plain = {"a": a, "b": b, "w": w, "h0": h0}
    mesh = jax.make_mesh((args.devices,), ("sequence",), devices=jax.devices()[:args.devices])

    split = lambda a, b, h0: sequence.diagonal_apply(a, b, mesh=mesh, initial_state=h0)
    # name: (function, inputs already laid out over the mesh?). In sequence-parallel training the
    # activations already live split over time; the last case adds scattering the inputs from one
    # device and gathering h back, which real devices pay over their interconnect.
    cases = {"1 device": (lambda a, b, h0: diagonal.apply(a, b, initial_state=h0), False),
             f"{args.devices} devices": (split, True),
             f"{args.devices} dev+scatter": (split, False)}
    over_time = NamedSharding(mesh, P(None, "sequence"))
    laid_out = {"a": jax.device_put(a, over_time), "b": jax.device_put(b, over_time),
                "w": jax.device_put(w, over_time), "h0": jax.device_put(h0, NamedSharding(mesh, P()))}
    load_before = os.getloadavg()
    rows, outputs = [], {}
    for name, (fn, sharded_inputs) in cases.items():
        forward = jax.jit(fn)
        a, b, w, h0 = (laid_out[x] if sharded_inputs else plain[x] for x in ("a", "b", "w", "h0"))

        def loss(a, b, h0, w, w_final, fn=fn):
            h, final = fn(a, b, h0)
            return jnp.sum(h * w) + jnp.sum(final * w_final)

        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        outputs[name] = (forward(a, b, h0), backward(a, b, h0, w, w_final))
        fwd = timed(forward, (a, b, h0), args.repeats)
        bwd = timed(backward, (a, b, h0, w, w_final), args.repeats)
        rows.append({"case": name, "fwd_ms": fwd["median_ms"], "fwd_min_ms": fwd["min_ms"],
                     "fwd_bwd_ms": bwd["median_ms"], "fwd_bwd_min_ms": bwd["min_ms"]})
        print(f"  measured {name}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    one, *many = outputs.values()
    leaves = jax.tree.leaves
    pairs = [(x, y) for other in many for x, y in zip(leaves(one), leaves(other), strict=True)]
    max_err = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)
    base, split_row = rows[0], rows[1]
    ratio_fwd = split_row["fwd_ms"] / base["fwd_ms"]
    ratio_bwd = split_row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    exchanged = exchanged_bytes(args.batch, args.width, args.time, args.devices)

    print(f"sequence-parallel diagonal scan, B={args.batch} T={args.time} D={args.width} float32, "
          f"{jax.default_backend()} ({os.cpu_count()} cores, {jax.device_count()} fake devices), median of "
          f"{args.repeats}; load {load_before[0]:.1f}->{load_after[0]:.1f}")
    print(f"{'case':16s} {'fwd ms':>9s} {'min':>9s} {'fwd+bwd ms':>11s} {'min':>9s}")
    for r in rows:
        print(f"{r['case']:16s} {r['fwd_ms']:9.2f} {r['fwd_min_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} "
              f"{r['fwd_bwd_min_ms']:9.2f}")
    print(f"time ratio {args.devices} devices (inputs laid out over time) / 1 device: forward "
          f"{ratio_fwd:.2f}, forward+backward {ratio_bwd:.2f}; max |difference| (h, final state, gradients) "
          f"{max_err:.1e}")
    print(f"bytes exchanged per shard: all_gather of summaries {exchanged['all_gather_received']} "
          f"(({args.devices} - 1) x {exchanged['summary_per_shard']} = decay + state [B, D]) + psum of the "
          f"final state {exchanged['psum_final_state']} = {exchanged['total_per_shard']} bytes, independent "
          f"of T (one shard's h would be {exchanged['activations_per_shard']} bytes)")

    write_result(args.out, record(
        "sequence_parallel", argv, load_before, load_after,
        shape={"B": args.batch, "T": args.time, "D": args.width}, dtype="float32", devices=args.devices,
        repeats=args.repeats, rows=rows, ratio_fwd=ratio_fwd, ratio_fwd_bwd=ratio_bwd,
        max_abs_difference=max_err, bytes_exchanged_per_shard=exchanged, backend=jax.default_backend()))


if __name__ == "__main__":
    main()
