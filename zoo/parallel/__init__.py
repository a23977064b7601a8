"""Distribution over device meshes (issue 7). The distributed engine is JAX itself (jit with
shardings, shard_map, jax.distributed); this package adds the pieces around it:

* ``make_mesh(data=, fsdp=, tensor=, sequence=)`` (``mesh.py``): the four named axes;
* partition rules (``rules.py``): a ``PartitionSpec`` for every param of every registered model
  (FSDP over the largest dimension, tensor parallelism over heads or channels, small arrays
  replicated), first matching path regex wins, user rules welcome;
* ``shard_train_step(step_fn, mesh, rules)`` (``train.py``): a train step with batch, params and
  optimizer state sharded (imports Flax, so it loads on first use);
* ``initialize()`` (``distributed.py``): ``jax.distributed.initialize`` from the environment, TPU
  auto-detection, a no-op for one process;
* ``sequence_parallel(engine_apply, mesh, axis)`` (``sequence.py``): the diagonal, matrix and delta
  engines with time split over a mesh axis under ``jax.shard_map``, O(state) exchanged per shard;
  ``sharded_time(mesh, axis)``: a context in which whole models (their engine calls) run so.
"""

from zoo.parallel import sequence
from zoo.parallel.distributed import initialize
from zoo.parallel.mesh import AXES, BATCH_AXES, make_mesh
from zoo.parallel.rules import DEFAULT_RULES, Shard, default_rules, named_shardings, param_specs, path_name
from zoo.parallel.sequence import apply as sequence_parallel_apply
from zoo.parallel.sequence import check_engine as check_sequence_parallel
from zoo.parallel.sequence import delta_apply, diagonal_apply, matrix_apply, sequence_parallel, sharded_time

_FLAX = ("shard_train_step", "shard_batch")


def __getattr__(name):
    # train.py imports Flax (nnx.split / nnx.update); the rest of the package does not need it.
    if name in _FLAX:
        from zoo.parallel import train

        return getattr(train, name)
    raise AttributeError(f"module 'zoo.parallel' has no attribute {name!r}")


__all__ = ["AXES", "BATCH_AXES", "DEFAULT_RULES", "Shard", "check_sequence_parallel", "default_rules",
           "delta_apply", "diagonal_apply", "initialize", "make_mesh", "matrix_apply", "named_shardings",
           "param_specs", "path_name", "sequence", "sequence_parallel", "sequence_parallel_apply",
           "shard_batch", "shard_train_step", "sharded_time"]
