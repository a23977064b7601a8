"""``shard_train_step``: run an nnx train step with its batch, params and optimizer state sharded.

    mesh = zoo.parallel.make_mesh(data=2, fsdp=2, tensor=2)
    step = zoo.parallel.shard_train_step(zoo.train.make_train_step(), mesh)
    for k in range(steps):
        metrics = step(model, optimizer, task.batch(k))     # updates model and optimizer in place
        if k % 10 == 0:
            jax.block_until_ready(metrics)                  # bound the dispatch queue (ENV-NOTES §4)

The step is ``jax.jit`` of the pure function ``(state, batch) -> (state, metrics)`` obtained by
``nnx.split``-ting ``(model, optimizer)`` once: ``in_shardings`` and ``out_shardings`` give the state
the specs of the partition rules (``zoo.parallel.rules``) and the batch ``P(("data", "fsdp"))`` on its
leading dimension; the metrics come back replicated. On the ``Auto`` mesh of ``make_mesh``, GSPMD
turns these into the data-parallel all-reduce of the gradients, FSDP's all-gather of params and
reduce-scatter of gradients, and tensor parallelism's partial sums, and the step computes what the
unsharded step computes (up to the order of float additions).

One known exception, upstream: with jaxlib 0.10.2, XLA's partitioner returns wrong gradients for
``block_recurrent`` on a mesh with ``fsdp`` > 1, whose rules shard the token path's ``w_qkvq`` by
columns and ``w_o`` by rows (the forward is right; the gradients are off by O(1)).
``tests/parallel/test_train_sharding.py::test_xla_partitioner_backward_bug`` pins the pattern in plain
JAX as a strict xfail, so that a fixed jaxlib shows up as a test to update.

A loop that dispatches many steps without waiting deadlocks on fake CPU devices (ENV-NOTES §4):
block on the metrics at least every ~10 steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zoo.parallel.mesh import BATCH_AXES
from zoo.parallel.rules import DEFAULT_RULES, Rules, named_shardings, param_specs

StepFn = Callable[[nnx.Module, nnx.Optimizer, Any], Any]


def shard_train_step(step_fn: StepFn, mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
                     batch_axes: tuple[str, ...] = BATCH_AXES, donate: bool = True):
    """``sharded_step(model, optimizer, batch) -> metrics``: ``step_fn`` jitted over ``mesh``.

    ``step_fn(model, optimizer, batch)`` updates the model and optimizer in place and returns
    metrics, as ``zoo.train.make_train_step()`` does (it may be a plain function or an ``nnx.jit``
    one). The sharded step has the same signature and also updates in place; after its first call
    the model's and optimizer's arrays live on the mesh, sharded by ``rules``.

    ``batch`` is a pytree of arrays whose leading dimension is the batch, split over ``batch_axes``;
    that dimension must be divisible by their total size. In a multi-process run each process passes
    its own rows of the global batch (as a per-host data loader yields them), numpy or host arrays,
    and the global batch is their concatenation in process order. With ``donate`` the previous state
    arrays are donated to the step (their memory is reused for the new state).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"shard_train_step: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    missing = [a for a in batch_axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"shard_train_step: batch_axes {missing} are not axes of the mesh "
                         f"{dict(mesh.shape)}")
    batch_sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    replicated = NamedSharding(mesh, P())
    compiled: dict[Any, tuple[Callable, Any]] = {}   # (graphdef, leaf shapes) -> (jitted step, shardings)

    def build(graphdef, state):
        state_shardings = named_shardings(param_specs(state, mesh, rules), mesh)

        def pure_step(state, batch):
            model, optimizer = nnx.merge(graphdef, state)
            metrics = step_fn(model, optimizer, batch)
            return nnx.state((model, optimizer)), metrics

        jitted = jax.jit(pure_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,) if donate else ())
        return jitted, state_shardings

    def sharded_step(model: nnx.Module, optimizer: nnx.Optimizer, batch):
        graphdef, state = nnx.split((model, optimizer))
        key = (graphdef, tuple((np.shape(x), str(getattr(x, "dtype", ""))) for x in jax.tree.leaves(state)))
        if key not in compiled:
            compiled[key] = build(graphdef, state)
        jitted, state_shardings = compiled[key]
        state = jax.tree.map(place, state, state_shardings)
        new_state, metrics = jitted(state, shard_batch(batch, mesh, batch_axes))
        nnx.update((model, optimizer), new_state)
        return metrics

    return sharded_step


def shard_batch(batch: Any, mesh: Mesh, batch_axes: tuple[str, ...] = BATCH_AXES) -> Any:
    """``batch`` on ``mesh``, each leaf's leading dimension split over ``batch_axes``.

    With several processes each passes its own rows (``jax.make_array_from_process_local_data``).
    """
    sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    n_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    n_local = n_shards if sharding.is_fully_addressable else n_shards // jax.process_count()

    def put(path, leaf):
        if isinstance(leaf, jax.Array) and _has_sharding(leaf, sharding):
            return leaf
        shape = np.shape(leaf)
        if not shape or shape[0] % max(n_local, 1):
            raise ValueError(f"shard_batch: batch leaf {jax.tree_util.keystr(path)} has shape {shape}; its "
                             f"leading (batch) dimension must be divisible by the {n_local} shards of mesh "
                             f"axes {tuple(batch_axes)} held by this process")
        if sharding.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree_util.tree_map_with_path(put, batch)


def place(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """``leaf`` with ``sharding``, moved if needed. Across processes each must hold the same value."""
    if isinstance(leaf, jax.Array) and _has_sharding(leaf, sharding):
        return leaf
    if sharding.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _has_sharding(x: jax.Array, sharding: NamedSharding) -> bool:
    try:
        return x.sharding.is_equivalent_to(sharding, x.ndim)
    except (ValueError, TypeError, AttributeError):
        return False
