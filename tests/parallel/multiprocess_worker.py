"""One process of the two-process data-parallel run in test_multiprocess.py (not a test itself).

Run as a script with ZOO_COORDINATOR, ZOO_NUM_PROCESSES and ZOO_PROCESS_ID set: it joins the job
through ``zoo.parallel.distributed.initialize``, trains a tiny LSTM model for STEPS steps on a mesh
over every process's devices (data parallel across processes, FSDP over each one's own devices),
each process feeding its own rows of the global batch, and prints one line ``RESULT {json}`` with
the losses and a digest of the final params.
``model_and_optimizer`` and ``global_batches`` are imported by the test for the single-process run.
"""

import json
import os
import sys

import numpy as np

VOCAB, GLOBAL_BATCH, T, STEPS, D_MODEL = 8, 4, 8, 3, 16


def model_and_optimizer():
    import optax
    from flax import nnx

    from zoo.nn import SequenceModel

    model = SequenceModel("lstm", vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, d_output=VOCAB,
                          mlp_ratio=2, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def global_batches():
    rng = np.random.default_rng(0)
    return [{"inputs": rng.integers(0, VOCAB, (GLOBAL_BATCH, T)).astype(np.int32),
             "targets": rng.integers(0, VOCAB, (GLOBAL_BATCH, T)).astype(np.int32),
             "mask": rng.random((GLOBAL_BATCH, T)) < 0.8,
             "reset": rng.random((GLOBAL_BATCH, T)) < 0.1} for _ in range(STEPS)]


def param_digest(model):
    """Sum and sum of squares over every param: equal runs give equal digests."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)
              for x in params]
    return [float(sum(x.sum() for x in leaves)), float(sum((x * x).sum() for x in leaves))]


def main():
    import jax
    from flax import nnx

    # Before any computation: gloo carries the cross-process collectives on CPU (ENV-NOTES §11).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")      # as tests/conftest.py
    jax.config.update("jax_disable_most_optimizations", True)         # tiny shapes: compile time dominates

    from zoo.parallel.distributed import initialize
    from zoo.parallel.mesh import make_mesh
    from zoo.parallel.rules import default_rules
    from zoo.parallel.train import shard_train_step
    from zoo.train import make_train_step

    assert initialize(initialization_timeout=60), "initialize() did not start jax.distributed"
    n_proc, pid = jax.process_count(), jax.process_index()
    # Data parallel across the processes, FSDP over each process's own devices (params sharded
    # however small: min_size=0): the batch spans the processes, each param is split over a process's
    # devices and replicated across processes.
    mesh = make_mesh(data=n_proc, fsdp=jax.local_device_count())
    model, optimizer = model_and_optimizer()
    step = shard_train_step(make_train_step(), mesh, default_rules(min_size=0))
    rows = GLOBAL_BATCH // n_proc
    losses = []
    for batch in global_batches():
        local = {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}
        metrics = step(model, optimizer, local)
        losses.append(float(metrics["loss"]))       # replicated, so readable in every process; blocks
    n_fsdp = sum("fsdp" in x.sharding.spec for x in jax.tree.leaves(nnx.state(model)))
    result = {"process": pid, "processes": n_proc, "devices": jax.device_count(),
              "local_devices": jax.local_device_count(), "losses": losses, "digest": param_digest(model),
              "fsdp_sharded_params": n_fsdp}
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
