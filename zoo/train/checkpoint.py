"""Orbax checkpoints of an NNX model and its optimizer, so an interrupted run can resume.

A checkpoint at step ``s`` holds the model's and the optimizer's state after ``s`` updates.
Restoring fills freshly built objects in place; their structure (and so the abstract target
that orbax restores into) comes from them, which keeps loading free of pickle.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


def manager(directory: str | os.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    """Start saving (asynchronously; the arrays are immutable, so training can go on meanwhile)."""
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)),
        optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
        meta=ocp.args.JsonSave({"step": int(step)}),
    ))


def restore_latest(mngr: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer) -> int:
    """Load the latest checkpoint into ``model`` and ``optimizer``; return its step (0 if there is none)."""
    step = mngr.latest_step()
    if step is None:
        return 0
    as_target = lambda obj: jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(obj))
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(as_target(model)),
        optimizer=ocp.args.StandardRestore(as_target(optimizer)),
        meta=ocp.args.JsonRestore(),
    ))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    return int(restored["meta"]["step"])
