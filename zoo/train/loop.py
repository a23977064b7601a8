"""The training loop: a jitted NNX train step, held-out evaluation, metrics log, checkpoints, plot.

``train`` takes the model and optimizer the caller built, so any ``nnx.Module`` whose
``loss_fn(model, batch)`` returns ``(loss, metrics)`` trains here. The data for update ``k`` is
``task.batch(k)``, a function of ``k`` alone, and checkpoints hold the whole model and optimizer
state, so a run killed and resumed from its checkpoint at step ``s`` repeats exactly what an
uninterrupted run does from ``s`` on (the same losses, bit for bit, on the same machine).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from zoo.data.task import Batch, Task
from zoo.train import checkpoint, metrics
from zoo.train.losses import classification_loss

LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@functools.cache
def make_train_step(loss_fn: LossFn = classification_loss):
    """``train_step(model, optimizer, batch) -> metrics``: one optax update of the model's params, jitted.

    One jitted function per ``loss_fn`` (cached), so later ``train`` calls on a model of the same
    structure reuse the compiled step instead of tracing it again.
    """

    @nnx.jit
    def train_step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (_, step_metrics), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return step_metrics

    return train_step


@functools.cache
def make_eval_step(loss_fn: LossFn = classification_loss):
    """``eval_step(model, batch) -> metrics``, jitted, without updating anything."""
    return nnx.jit(lambda model, batch: loss_fn(model, batch)[1])


def evaluate(eval_step, task: Task, n_batches: int) -> dict[str, float]:
    """Mean metrics over the first ``n_batches`` held-out batches (the same ones at every evaluation)."""
    per_batch = jax.device_get([eval_step(task.batch(i, split="eval")) for i in range(n_batches)])
    return {f"eval_{key}": float(np.mean([m[key] for m in per_batch])) for key in per_batch[0]}


@dataclasses.dataclass
class TrainResult:
    """What a call to ``train`` did: the step it started from, its records, and the last evaluation."""

    start_step: int
    records: list[dict[str, Any]]
    final: dict[str, float]
    seconds: float
    metrics_path: str | None = None
    plot_path: str | None = None

    @property
    def losses(self) -> list[float]:
        """Training loss of each update run in this call, in order."""
        return [r["loss"] for r in self.records if "loss" in r]


def train(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    task: Task,
    *,
    steps: int,
    eval_every: int = 100,
    eval_batches: int = 4,
    loss_fn: LossFn = classification_loss,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    metrics_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    log_every: int = 10,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place for ``steps`` updates in total on ``task.batch(0) … task.batch(steps - 1)``.

    With ``checkpoint_dir``, the latest checkpoint there is restored first and training goes on
    from its step; a checkpoint is written every ``checkpoint_every`` updates (default
    ``eval_every``) and at the end, so a kill loses at most one interval. Records after the
    restored step are dropped from ``metrics_path`` (they were written after that checkpoint).
    The held-out split is evaluated at step 0, every ``eval_every`` updates and at the end.
    Metrics are fetched from the device every ``log_every`` updates, which also bounds how far
    asynchronous dispatch runs ahead (keep it near 10 on multi-device CPU meshes: ENV-NOTES §4).
    """
    if steps < 0 or eval_every <= 0 or log_every <= 0 or eval_batches <= 0:
        raise ValueError(
            f"train: steps must be >= 0 and eval_every, log_every, eval_batches > 0; got steps={steps}, "
            f"eval_every={eval_every}, log_every={log_every}, eval_batches={eval_batches}"
        )
    checkpoint_every = checkpoint_every or eval_every
    began = time.perf_counter()

    mngr = checkpoint.manager(checkpoint_dir) if checkpoint_dir is not None else None
    start = checkpoint.restore_latest(mngr, model, optimizer) if mngr is not None else 0
    if start > steps:
        raise ValueError(f"train: the checkpoint in {checkpoint_dir} is at step {start}, past steps={steps}")
    if metrics_path is not None:
        if start == 0:
            open(metrics_path, "w").close()
        else:
            metrics.truncate_records(metrics_path, start)

    # cached_partial skips re-walking the model's graph on every call.
    train_step = nnx.cached_partial(make_train_step(loss_fn), model, optimizer)
    eval_step = nnx.cached_partial(make_eval_step(loss_fn), model)

    records: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, jax.Array]]] = []   # device metrics not yet fetched
    evals: dict[int, dict[str, float]] = {}
    final: dict[str, float] = {}
    bar = tqdm(total=steps, initial=start, desc=description, disable=not progress, dynamic_ncols=True)

    def flush() -> None:
        fetched = jax.device_get(pending)
        new = [{"step": s, **{k: float(v) for k, v in m.items()}, **evals.pop(s, {})} for s, m in fetched]
        new += [{"step": s, **e} for s, e in sorted(evals.items())]   # evaluations without an update
        evals.clear()
        pending.clear()
        if not new:
            return
        records.extend(new)
        if metrics_path is not None:
            metrics.append_records(metrics_path, new)
        latest = new[-1]
        postfix = {"loss": latest.get("loss"), "acc": latest.get("accuracy"),
                   "eval_acc": final.get("eval_accuracy")}
        bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items() if v is not None}, refresh=False)
        bar.update(sum(1 for r in new if "loss" in r))

    try:
        if start == 0:
            final = evals[0] = evaluate(eval_step, task, eval_batches)
            flush()
        elif start == steps:    # resumed a finished run: report the restored model, log nothing new
            final = evaluate(eval_step, task, eval_batches)
        for k in range(start, steps):
            pending.append((k + 1, train_step(task.batch(k))))
            done = k + 1
            if done % eval_every == 0 or done == steps:
                final = evals[done] = evaluate(eval_step, task, eval_batches)
            save_now = mngr is not None and (done % checkpoint_every == 0 or done == steps)
            # Flush before saving so the log holds every record up to the checkpoint it may resume from.
            if done % log_every == 0 or done in evals or save_now:
                flush()
            if save_now:
                checkpoint.save(mngr, done, model, optimizer)
        flush()
    finally:
        # On an exception (Ctrl-C included) let the checkpoint already started finish committing.
        bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()

    if plot_path is not None:
        history = metrics.read_records(metrics_path) if metrics_path is not None else records
        n_classes = getattr(task, "n_classes", None)
        metrics.plot_curves(history, plot_path, title=f"{description}: {getattr(task, 'name', '')}",
                            chance=1 / n_classes if n_classes else None)
    return TrainResult(
        start_step=start,
        records=records,
        final=final,
        seconds=time.perf_counter() - began,
        metrics_path=None if metrics_path is None else str(metrics_path),
        plot_path=None if plot_path is None else str(plot_path),
    )
