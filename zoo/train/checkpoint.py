"""Orbax checkpoints of an NNX model and its optimizer, so an interrupted run can resume exactly.

A checkpoint at step ``s`` (directory ``<checkpoint_dir>/<s>``) holds three items:

* ``model``: ``nnx.state(model)``, every variable of the model. Any ``nnx.Rngs`` the model keeps
  (a dropout key and its counter) is part of that state, so it is saved and restored with it.
* ``optimizer``: ``nnx.state(optimizer)``, the optax state and the update counter.
* ``meta``: JSON ``{"step": s, "data_step": s, "run": {...}}``. ``data_step`` is the position of the
  data iterator: batch ``k`` is ``task.batch(k)``, a pure function of ``k`` (``zoo.data.task``), so
  the position is the step itself and the stream needs no state of its own. ``run`` is whatever
  description of the run the caller passed (the CLI stores its config), checked on resume.

A run that keeps its best evaluation (``train(..., keep_best=...)``) adds a fourth item, ``best``:
the model's state at that evaluation, and ``meta["best"] = {"step": ..., "metrics": {...}}`` (None
until there is one). Without it a resumed run could not know which model its best evaluation had.

The training loop draws no random numbers; the initial parameters come from the caller's seed.
Restoring fills freshly built objects in place; their structure (and so the abstract target that
orbax restores into) comes from them, which keeps loading free of pickle.

Every failure to read a checkpoint raises ``CheckpointError`` naming the step directory, the item
and what went wrong; a checkpoint that exists is never skipped in favour of starting from scratch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

ITEMS = ("model", "optimizer", "meta")
_SHOWN = 6    # mismatched arrays listed in an error; the rest are counted
_REMEDY = "Delete {where} to resume from the checkpoint before it, or the whole directory to start over."
_MAX_CAUSE = 800    # characters of orbax's own message kept in an error (some print whole trees)


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be restored into this run (corrupt, incomplete, mismatched)."""


@dataclasses.dataclass(frozen=True)
class Best:
    """The model at its best evaluation so far: the step, that evaluation's metrics, and the model's
    state then (a snapshot: fresh containers around the arrays of that step, which later updates
    replace rather than modify)."""

    step: int
    metrics: dict[str, float]
    state: nnx.State


def snapshot(model: nnx.Module) -> nnx.State:
    """``nnx.state(model)`` detached from the model: ``nnx.state`` shares its Variables with the model,
    so a later update would show through; mapping over it copies the containers, not the arrays."""
    return jax.tree.map(lambda leaf: leaf, nnx.state(model))


def manager(directory: str | os.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
         run: Mapping[str, Any] | None = None, *, keep_best: bool = False, best: Best | None = None) -> None:
    """Start saving (asynchronously; the arrays are immutable, so training can go on meanwhile).

    ``keep_best``: the run keeps its best evaluation; ``best`` is it (None while there is none)."""
    meta = {"step": int(step), "data_step": int(step), "run": dict(run) if run is not None else None}
    items = {"model": ocp.args.StandardSave(nnx.state(model)),
             "optimizer": ocp.args.StandardSave(nnx.state(optimizer))}
    if keep_best:
        meta["best"] = None if best is None else {"step": int(best.step), "metrics": dict(best.metrics)}
        if best is not None:
            items["best"] = ocp.args.StandardSave(best.state)
    mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))


def _cause(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_CAUSE else text[:_MAX_CAUSE] + " [...]"


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(mngr.directory), str(step))


def _path_name(path) -> str:
    """``blocks/params/0/mixer/w_in`` for a jax key path; the trailing ``value`` of a Variable is dropped."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def describe_mismatch(item: str, stored: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
    """Lines naming the arrays whose shapes differ, and those present on one side only."""
    differ = [name for name in sorted(stored.keys() & wanted.keys()) if stored[name] != wanted[name]]
    lines = [f"{item}/{name}: checkpoint has shape {stored[name]}, this run has {wanted[name]}"
             for name in differ[:_SHOWN]]
    if len(differ) > _SHOWN:
        lines.append(f"and {len(differ) - _SHOWN} more array(s) of other shapes in {item}")
    for names, where in ((wanted.keys() - stored.keys(), "this run has, the checkpoint lacks"),
                         (stored.keys() - wanted.keys(), "the checkpoint has, this run lacks")):
        if names:
            shown = ", ".join(f"{item}/{n}" for n in sorted(names)[:_SHOWN])
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            lines.append(f"{len(names)} array(s) {where}: {shown}{more}")
    return lines


def stored_shapes(item_dir: str) -> dict[str, tuple[int, ...]]:
    """The shape of every array saved in one item's directory, read from its metadata alone."""
    try:
        return _shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)).tree)
    except Exception as error:      # orbax, tensorstore and json raise many types; report them all
        remedy = _REMEDY.format(where=os.path.dirname(item_dir))
        raise CheckpointError(f"cannot read the array metadata of the checkpoint item {item_dir}: "
                              f"{_cause(error)}. {remedy}") from error


def check_run(where: str, stored: Mapping[str, Any] | None, run: Mapping[str, Any] | None) -> None:
    """CheckpointError naming each field of the run description that differs from the checkpoint's."""
    if stored is None or run is None:
        return
    differ = [f"{key}: checkpoint {stored.get(key)!r}, this run {run.get(key)!r}"
              for key in sorted(stored.keys() | run.keys()) if stored.get(key) != run.get(key)]
    if differ:
        raise CheckpointError(
            f"the checkpoint {where} was written by a different run configuration:\n  " + "\n  ".join(differ)
            + "\nUse another checkpoint directory, or delete this one to start from scratch.")


def _load(mngr: ocp.CheckpointManager, step: int, item: str, args):
    """One item of the checkpoint at ``step``; any failure becomes a CheckpointError naming its file."""
    where = step_dir(mngr, step)
    try:
        return mngr.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as error:      # orbax, tensorstore and json raise many types; report them all
        raise CheckpointError(
            f"cannot restore item {item!r} of the checkpoint {os.path.join(where, item)}: "
            f"{_cause(error)}. {_REMEDY.format(where=where)}") from error


def restore_latest(mngr: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer,
                   run: Mapping[str, Any] | None = None) -> int:
    """Load the latest checkpoint into ``model`` and ``optimizer``; return its step (0 if there is none).

    ``run``, if given, must equal the run description stored with the checkpoint (when it has one).
    Raises ``CheckpointError`` (a ``ValueError``) naming the step directory and the item when the
    checkpoint is incomplete or unreadable, or when its arrays do not fit the model and optimizer
    (listing the arrays and both shapes). A half-written step left by a kill mid-save is not a
    checkpoint yet (orbax commits a step by renaming its temporary directory) and is ignored.
    """
    step = mngr.latest_step()
    if step is None:
        return 0
    where = step_dir(mngr, step)
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(where, item))]
    if missing:
        raise CheckpointError(f"the checkpoint {where} is incomplete: no {', '.join(missing)} "
                              f"(it has {sorted(os.listdir(where))})")

    meta = _load(mngr, step, "meta", ocp.args.JsonRestore())
    if not isinstance(meta, Mapping) or meta.get("step") != step:
        raise CheckpointError(f"the checkpoint {os.path.join(where, 'meta')} holds {meta!r}, not the "
                              f"metadata of step {step}")
    check_run(where, meta.get("run"), run)

    targets = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(obj))
               for name, obj in (("model", model), ("optimizer", optimizer))}
    problems = [line for name, target in targets.items()
                for line in describe_mismatch(name, stored_shapes(os.path.join(where, name)),
                                              _shapes(target))]
    if problems:
        raise CheckpointError(f"the checkpoint {where} does not fit this model/optimizer (another model "
                              f"configuration?):\n  " + "\n  ".join(problems))

    restored = {name: _load(mngr, step, name, ocp.args.StandardRestore(target))
                for name, target in targets.items()}
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    return step


def restore_best(mngr: ocp.CheckpointManager, step: int, model: nnx.Module) -> Best | None:
    """The best evaluation stored with the checkpoint at ``step`` (None if the run had none yet), its
    state shaped like ``model``'s. Raises ``CheckpointError`` naming the file when the checkpoint was
    written without ``keep_best`` or its ``best`` item is missing, unreadable or of other shapes."""
    where = step_dir(mngr, step)

    meta = _load(mngr, step, "meta", ocp.args.JsonRestore())
    if "best" not in meta:
        raise CheckpointError(f"the checkpoint {os.path.join(where, 'meta')} was written by a run without "
                              f"keep_best, so it holds no best model to go on from. Resume without "
                              f"keep_best, or use another checkpoint directory.")
    if meta["best"] is None:
        return None
    item_dir = os.path.join(where, "best")
    if not os.path.isdir(item_dir):
        raise CheckpointError(f"the checkpoint {where} is incomplete: its meta names a best model at step "
                              f"{meta['best'].get('step')} but there is no {item_dir}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model))
    problems = describe_mismatch("best", stored_shapes(item_dir), _shapes(target))
    if problems:
        raise CheckpointError(f"the checkpoint {where} does not fit this model:\n  " + "\n  ".join(problems))
    state = _load(mngr, step, "best", ocp.args.StandardRestore(target))
    return Best(int(meta["best"]["step"]), dict(meta["best"]["metrics"]), state)
