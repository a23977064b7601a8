"""Partition rules: a ``PartitionSpec`` for every param (and optimizer-state) leaf, from its path and shape.

A rule is ``(pattern, spec)``. ``pattern`` is a regular expression searched (``re.search``) in the
leaf's path written with "/" between keys, e.g. ``blocks/params/0/mixer/w_in`` for a model's param
or ``1/opt_state/0/mu/blocks/params/0/mixer/w_in`` for Adam's first moment of the same param, so a
rule written for a param name covers its optimizer state too. The first rule that matches decides,
as in the logical-axis rules of t5x and MaxText. ``spec`` is either

- a ``PartitionSpec``: used as it is, and checked (each sharded dimension must be divisible by the
  product of its mesh axes; a ``ValueError`` names the path, shape and spec otherwise), or
- a callable ``(shape, mesh) -> PartitionSpec``, such as ``Shard``: the automatic policy below, which
  never fails and falls back to replication wherever a dimension does not divide.

A leaf no rule matches, and every scalar, is replicated. Rules may also be given as a dict
``{pattern: spec}`` (its order is the order of the rules).

``Shard`` is the default policy: parameters with fewer than ``min_size`` elements are replicated
(their all-gathers would cost more latency than the memory they save); otherwise tensor parallelism
splits one named dimension (heads or channels) over the ``tensor`` axis (Megatron-LM, Shoeybi et al.
2019, arXiv:1909.08053), and FSDP splits the largest remaining dimension divisible by the ``fsdp``
axis size over ``fsdp`` (ZeRO-3, Rajbhandari et al. 2020, arXiv:1910.02054). Params are never split
over ``data`` or ``sequence``.

Which dimension is "heads or channels" comes from the name, following zoo's param conventions
(projections are ``x @ w`` with ``w`` [D_in, D_out]):

- input projections (``w_q``, ``w_in``, ``w_up``, ...): the output channels, the last dimension
  (column parallel);
- output projections (``w_o``, ``w_out``, ``w_down``, ...): their input channels, dimension -2
  (row parallel), so that a column-parallel projection feeding a row-parallel one needs a single
  reduction;
- per-head weights stored heads first (the RG-LRU gates, TTT's inner model, the Titans memories,
  RWKV's bonus): dimension 0;
- token embeddings [V, D]: the vocabulary (vocab-parallel embedding).

Every choice is only a layout: ``jax.jit`` over an ``Auto`` mesh computes the same function for any
valid sharding (GSPMD inserts the collectives), so a rule can cost speed but never correctness.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SpecFn = Callable[[tuple[int, ...], Mesh], P]
Rule = tuple[str, P | SpecFn]
Rules = Sequence[Rule]

DEFAULT_MIN_SIZE = 4096   # elements; below this a param is replicated


@dataclasses.dataclass(frozen=True)
class Shard:
    """The automatic spec: ``tensor`` over dimension ``tensor_dim`` (None: no tensor parallelism), then
    ``fsdp`` over the largest other dimension it divides; replicated below ``min_size`` elements.

    Tensor parallelism applies to params of rank 2 or more (a vector has no heads or channels to
    split against an input), and a dimension the axis size does not divide stays whole.
    """

    tensor_dim: int | None = -1
    min_size: int = DEFAULT_MIN_SIZE
    fsdp_axis: str = "fsdp"
    tensor_axis: str = "tensor"

    def __call__(self, shape: tuple[int, ...], mesh: Mesh) -> P:
        rank = len(shape)
        entries: list[Any] = [None] * rank
        if rank == 0 or math.prod(shape) < self.min_size:
            return P(*entries)
        tensor_size = _axis_size(mesh, self.tensor_axis)
        if self.tensor_dim is not None and rank >= 2 and tensor_size > 1 and -rank <= self.tensor_dim < rank:
            dim = self.tensor_dim % rank
            if shape[dim] % tensor_size == 0:
                entries[dim] = self.tensor_axis
        fsdp_size = _axis_size(mesh, self.fsdp_axis)
        if fsdp_size > 1:
            free = [d for d in range(rank) if entries[d] is None and shape[d] % fsdp_size == 0]
            if free:
                entries[max(free, key=lambda d: (shape[d], -d))] = self.fsdp_axis   # ties: the first
        return P(*entries)


def default_rules(min_size: int = DEFAULT_MIN_SIZE) -> tuple[Rule, ...]:
    """zoo's rules (module docstring) with replication below ``min_size`` elements."""
    return (
        (r"(^|/)embedding$", Shard(tensor_dim=0, min_size=min_size)),
        (r"(^|/)(rglru|inner|inner_norm)/[^/]+$|(^|/)(memory_\d+|bonus)$",
         Shard(tensor_dim=0, min_size=min_size)),
        (r"(^|/)(w_o|w_out|w_down|w_ff2|cm_w_v)$", Shard(tensor_dim=-2, min_size=min_size)),
        (r"", Shard(tensor_dim=-1, min_size=min_size)),
    )


DEFAULT_RULES = default_rules()


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as "a/b/0/c": dict keys, sequence indices and attribute names, in order.

    The ``value`` attribute through which an ``nnx.Variable`` holds its array is left out, so a param
    has the same name in an ``nnx.State`` as in the plain pytree that ``rec.init`` returns.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The ``PartitionSpec`` of one leaf called ``name`` (see ``path_name``) with this shape."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return P()
    for pattern, spec in rules:
        if re.search(pattern, name):
            spec = spec(shape, mesh) if callable(spec) else spec
            if not isinstance(spec, P):
                raise TypeError(f"param_specs: the rule {pattern!r} gave {spec!r} for {name} {shape}; "
                                f"a rule must give a PartitionSpec")
            check_spec(name, shape, spec, mesh)
            return spec
    return P(*([None] * len(shape)))


def check_spec(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    """``ValueError`` unless ``spec`` fits ``shape`` on ``mesh``: no more entries than dimensions, known
    axes each used once, and each dimension divisible by the product of its axes' sizes."""
    where = f"param_specs: {name} with shape {tuple(shape)} and spec {spec}"
    if len(spec) > len(shape):
        raise ValueError(f"{where}: the spec has {len(spec)} entries for {len(shape)} dimensions")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"{where}: mesh axes {unknown} are not in the mesh {dict(mesh.shape)}")
        used += axes
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
            raise ValueError(f"{where}: dimension {dim} of size {shape[dim]} is not divisible by the "
                             f"{size} devices of mesh axes {axes}")
    if len(set(used)) != len(used):
        raise ValueError(f"{where}: a mesh axis is used for more than one dimension")


def param_specs(tree: Any, mesh: Mesh, rules: Rules | Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """A ``PartitionSpec`` for every array leaf of ``tree``, in a tree of the same structure.

    ``tree`` is a params pytree (``rec.init(key, d_in)``), an ``nnx.State`` (``nnx.state(model)``,
    ``nnx.split((model, optimizer))[1]``: the specs then sit inside the same Variables) or an
    ``nnx.Module`` (its ``nnx.state``). Leaves may be arrays or ``jax.ShapeDtypeStruct``.
    """
    nnx = sys.modules.get("flax.nnx")       # only a loaded Flax can have made an nnx.Module
    if nnx is not None and isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"param_specs: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if isinstance(rules, Mapping):          # {regex: spec}, in insertion order
        rules = tuple(rules.items())
    bad = [rule for rule in rules if not (isinstance(rule, (tuple, list)) and len(rule) == 2
                                          and isinstance(rule[0], str))]
    if bad:
        raise TypeError(f"param_specs: each rule must be a (regex, PartitionSpec or callable) pair; "
                        f"got {bad[:3]}")

    def leaf_spec(path, leaf):
        return spec_for(path_name(path), tuple(getattr(leaf, "shape", None) or np.shape(leaf)), mesh, rules)

    return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    """The tree of ``PartitionSpec`` leaves as ``NamedSharding(mesh, spec)`` leaves."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def _axis_size(mesh: Mesh, axis: str) -> int:
    """The size of ``axis`` in ``mesh``; 1 for an axis the mesh does not have."""
    return int(mesh.shape.get(axis, 1))
