"""Benchmark: one LSTM layer, zoo against torch.nn.LSTM and flax.nnx, forward and forward+backward.

    .venv/bin/python experiments/bench/lstm.py                  # B=32, T=256, D=H=256, float32
    .venv/bin/python experiments/bench/lstm.py --time 64 --repeats 3 --out /tmp/quick.json

Contenders, all timed in one process with the same shapes:

* ``zoo lstm (np)``: ``zoo.get("lstm", variant="np")``, the torch/cuDNN LSTM, through the public
  ``apply`` ([B, T, D] in and out) under ``jax.jit``; its backward is the nonlinear engine's
  structured ``custom_vjp`` (SplitCell).
* ``lax.scan baseline``: the textbook JAX layer (transpose to time-major, one fused gate product
  per step, JAX's own scan transpose for the gradients), the form ENV-NOTES §9 measured.
* ``flax.nnx``: ``nnx.RNN(nnx.OptimizedLSTMCell(D, H))``, jitted as a pure function of its state.
* ``torch.nn.LSTM`` (CPU, ``torch.set_num_threads(--threads)``), skipped with a note if torch is
  not installed (``pip install torch==2.13.0``, the refs extra).

Forward: the outputs [B, T, H]. Forward+backward: loss = sum(outputs * R) for a fixed random R, with
gradients for all parameters and the inputs. Each number is the median of ``--repeats`` runs after
two warm-up calls; the contenders are interleaved run by run, so that load from other processes
hits them alike. Before timing, the zoo layer is loaded with torch's weights and its outputs and
input gradients are checked against torch's. Ratios are speed-ups: time of the other / time of zoo
(above 1 means zoo is faster). The table goes to stdout, the numbers to
experiments/bench/results/lstm.json.

Matmul roofline: the layer's arithmetic is its products, 2·B·T·(D+H)·4H FLOPs forward and twice
that again backward (the recurrent product, dW_in, dW_rec and dx), so each contender's fwd+bwd time
is also printed as GFLOP/s, beside one [B·T, D] x [D, 4H] product (the input projection's shape)
timed in the same run by XLA (``jnp.dot`` under jit) and by torch. It is context, not a bound: XLA's
speed varies with the shape (on 2 cores the [B·T, 4H] x [4H, D] product of dx ran at about twice
this one's GFLOP/s), so the layer's share of it says how much time goes outside the products.
"""

from __future__ import annotations

import argparse
import datetime
import json
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

from _timing import matmul_probe  # noqa: E402  (experiments/bench is the script's directory)

import zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def zoo_case(params, xs, weights):
    rec = zoo.get("lstm", d_model=params["w_rec"].shape[0], variant="np")

    def forward(params, xs):
        return rec.apply(params, xs)[0]

    def loss(params, xs):
        return jnp.sum(forward(params, xs) * weights)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1))), (params, xs)


def scan_baseline_case(params, xs, weights):
    def forward(params, xs):
        w = jnp.concatenate([params["w_in"], params["w_rec"]], axis=0)
        hidden = params["w_rec"].shape[0]

        def body(carry, x_t):
            h, c = carry
            gates = jnp.concatenate([x_t, h], axis=-1) @ w + params["bias"]
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((xs.shape[0], hidden), xs.dtype)
        _, ys = lax.scan(body, (zeros, zeros), jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1)

    def loss(params, xs):
        return jnp.sum(forward(params, xs) * weights)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1))), (params, xs)


def flax_case(d_in, hidden, xs, weights):
    from flax import nnx

    layer = nnx.RNN(nnx.OptimizedLSTMCell(d_in, hidden, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)     # differentiate the params only

    def forward(state, xs):
        zeros = jnp.zeros((xs.shape[0], hidden), xs.dtype)     # (c, h): no rng use inside jit
        return nnx.merge(graphdef, state, rest)(xs, initial_carry=(zeros, zeros))

    def loss(state, xs):
        return jnp.sum(forward(state, xs) * weights)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1))), (state, xs)


def torch_case(layer, xs, weights, torch):
    x = torch.tensor(np.asarray(xs), requires_grad=True)
    r = torch.tensor(np.asarray(weights))

    def forward():
        with torch.no_grad():
            return layer(x)[0]

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x)[0] * r).sum().backward()
        return x.grad

    return forward, forward_backward


def matmul_gflops(rows: int, inner: int, cols: int, repeats: int, torch) -> dict[str, float | None]:
    """GFLOP/s of one [rows, inner] x [inner, cols] float32 product: XLA (``_timing.matmul_probe``) and
    torch, interleaved run by run."""
    xla, flop = matmul_probe(rows, inner, cols)
    calls = {"xla": xla}
    if torch is not None:
        a_t, b_t = torch.randn(rows, inner), torch.randn(inner, cols)
        calls["torch"] = lambda: a_t @ b_t
    times = {name: [] for name in calls}
    for fn in calls.values():
        jax.block_until_ready(fn())                          # warm-up (XLA's is compiled already)
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    result = {name: flop / statistics.median(t) / 1e9 for name, t in times.items()}
    result.setdefault("torch", None)
    return result


def check_zoo_against_torch(layer, params, xs, weights, torch) -> float:
    """Max abs difference of outputs and input gradients, zoo vs torch, same weights."""
    fwd, grad, _ = zoo_case(params, xs, weights)
    x = torch.tensor(np.asarray(xs), requires_grad=True)
    y = layer(x)[0]
    (y * torch.tensor(np.asarray(weights))).sum().backward()
    dx = grad(params, xs)[1]
    return max(float(np.abs(np.asarray(fwd(params, xs)) - y.detach().numpy()).max()),
               float(np.abs(np.asarray(dx) - x.grad.numpy()).max()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=256)
    parser.add_argument("--width", type=int, default=256, help="D = H")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per contender (>= 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=os.path.join(RESULTS, "lstm.json"))
    args = parser.parse_args(argv)
    B, T, D = args.batch, args.time, args.width

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)

    try:
        import torch
    except ImportError:
        torch = None
    notes = []
    if torch is not None:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        layer = torch.nn.LSTM(D, D, batch_first=True)
        params = {"w_in": jnp.asarray(layer.weight_ih_l0.detach().numpy().T),
                  "w_rec": jnp.asarray(layer.weight_hh_l0.detach().numpy().T),
                  "bias": jnp.asarray((layer.bias_ih_l0 + layer.bias_hh_l0).detach().numpy())}
        max_diff = check_zoo_against_torch(layer, params, xs, weights, torch)
        notes.append(f"zoo vs torch, same weights: max |diff| of outputs and input grads = {max_diff:.2e}")
    else:
        params = zoo.get("lstm", d_model=D, variant="np").init(jax.random.key(0), D)
        notes.append("torch not installed: torch.nn.LSTM skipped (pip install torch==2.13.0)")

    cases = {}
    fwd, grad, inputs = zoo_case(params, xs, weights)
    cases["zoo lstm (np)"] = (lambda: fwd(*inputs), lambda: grad(*inputs))
    fwd_s, grad_s, inputs_s = scan_baseline_case(params, xs, weights)
    cases["lax.scan baseline"] = (lambda: fwd_s(*inputs_s), lambda: grad_s(*inputs_s))
    fwd_f, grad_f, inputs_f = flax_case(D, D, xs, weights)
    cases["flax.nnx OptimizedLSTMCell"] = (lambda: fwd_f(*inputs_f), lambda: grad_f(*inputs_f))
    if torch is not None:
        cases["torch.nn.LSTM"] = torch_case(layer, xs, weights, torch)

    runs = {(name, kind): [] for name in cases for kind in ("fwd", "fwd+bwd")}
    for f, g in cases.values():                             # compile + warm up
        for fn in (f, g, f, g):
            jax.block_until_ready(fn())
    for _ in range(args.repeats):                           # interleaved
        for name, (f, g) in cases.items():
            for kind, fn in (("fwd", f), ("fwd+bwd", g)):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                runs[(name, kind)].append(1e3 * (time.perf_counter() - start))

    median = {k: statistics.median(v) for k, v in runs.items()}
    matmul = matmul_gflops(B * T, D, 4 * D, args.repeats, torch)
    layer_gflop = 3 * 2 * B * T * (D + D) * 4 * D / 1e9     # fwd, plus the backward's 2x
    results = {}
    for name in cases:
        entry = {"fwd_ms": median[(name, "fwd")], "fwd_bwd_ms": median[(name, "fwd+bwd")],
                 "fwd_runs_ms": runs[(name, "fwd")], "fwd_bwd_runs_ms": runs[(name, "fwd+bwd")]}
        for kind, key in (("fwd", "fwd"), ("fwd+bwd", "fwd_bwd")):
            entry[f"zoo_speedup_{key}"] = median[(name, kind)] / median[("zoo lstm (np)", kind)]
        entry["fwd_bwd_gflops"] = layer_gflop / (entry["fwd_bwd_ms"] / 1e3)
        own = matmul["torch" if name.startswith("torch") else "xla"]
        entry["fraction_of_own_matmul"] = None if own is None else entry["fwd_bwd_gflops"] / own
        results[name] = entry

    print(f"LSTM layer B={B} T={T} D=H={D} float32, median of {args.repeats} runs "
          f"({os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform})")
    print(f"{'':28s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}   {'zoo speed-up fwd':>16s} {'fwd+bwd':>8s}")
    for name, e in results.items():
        print(f"{name:28s} {e['fwd_ms']:9.1f} {e['fwd_bwd_ms']:11.1f}   "
              f"{e['zoo_speedup_fwd']:15.2f}x {e['zoo_speedup_fwd_bwd']:7.2f}x")
    print(f"matmul [{B * T}, {D}] x [{D}, {4 * D}]: XLA {matmul['xla']:.0f} GFLOP/s"
          + ("" if matmul["torch"] is None else f", torch {matmul['torch']:.0f} GFLOP/s "
             f"(torch/XLA {matmul['torch'] / matmul['xla']:.2f}x)"))
    for name, e in results.items():
        share = e["fraction_of_own_matmul"]
        print(f"{name:28s} fwd+bwd {e['fwd_bwd_gflops']:6.1f} GFLOP/s"
              + ("" if share is None else f" = {share:.2f} of its framework's matmul"))
    for note in notes:
        print("note:", note)

    record = {
        "benchmark": "lstm layer",
        "shape": {"batch": B, "time": T, "d_in": D, "hidden": D, "dtype": "float32"},
        "repeats": args.repeats,
        "statistic": "median after 2 warm-up calls, contenders interleaved",
        "speedup": "time(other) / time(zoo); > 1 means zoo is faster",
        "results": results,
        "matmul_gflops": matmul,
        "layer_gflop_fwd_bwd": layer_gflop,
        "notes": notes,
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "when_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "torch": None if torch is None else torch.__version__,
                     "torch_threads": None if torch is None else args.threads},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", args.out)
    return record


if __name__ == "__main__":
    main()
