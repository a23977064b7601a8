"""Distribution over device meshes (issue 7).

``zoo.parallel.sequence``: sequence parallelism for the linear recurrences (the diagonal, matrix and
delta engines) under ``jax.shard_map``, time split over a mesh axis."""

from zoo.parallel import sequence
from zoo.parallel.sequence import apply as sequence_parallel_apply
from zoo.parallel.sequence import check_engine as check_sequence_parallel
from zoo.parallel.sequence import delta_apply, diagonal_apply, matrix_apply, sequence_parallel

__all__ = ["check_sequence_parallel", "delta_apply", "diagonal_apply", "matrix_apply", "sequence",
           "sequence_parallel", "sequence_parallel_apply"]
