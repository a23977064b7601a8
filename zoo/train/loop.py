"""The training loop: a jitted NNX train step, held-out evaluation, metrics log, checkpoints, plot.

``train`` takes the model and optimizer the caller built, so any ``nnx.Module`` whose
``loss_fn(model, batch)`` returns ``(loss, metrics)`` trains here. The data for update ``k`` is
``task.batch(k)``, a function of ``k`` alone, and checkpoints hold the whole model and optimizer
state, so a run killed and resumed from its checkpoint at step ``s`` repeats exactly what an
uninterrupted run does from ``s`` on (the same losses, bit for bit, on the same machine).
The data-iterator position a checkpoint needs is therefore the step itself, and the loop draws no
random numbers (any ``nnx.Rngs`` inside the model is saved with the model's state).

Length generalisation: with ``eval_lengths``, every evaluation also runs on held-out batches whose
sequences have each of these lengths, logged as ``eval_len{L}_loss`` / ``eval_len{L}_accuracy``. A
task offers this with a method ``batch_at_length(step, length, split="eval") -> Batch`` (as
``zoo.data.chomsky.ChomskyTask`` does); ``RunningParity``, whose ``length`` field is the sequence
length, is evaluated through ``dataclasses.replace(task, length=L)``. ``batch_at_length`` must be
a pure function of its arguments, like ``batch``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from zoo.data.parity import RunningParity
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


def length_metric_key(length: int, metric: str) -> str:
    """The key of ``metric`` evaluated on held-out sequences of ``length`` steps: ``eval_len<L>_<metric>``."""
    return f"eval_len{length}_{metric}"


def evaluate(eval_step, task: Task, n_batches: int, lengths: Sequence[int] = ()) -> dict[str, float]:
    """Mean metrics over the first ``n_batches`` held-out batches (the same ones at every evaluation).

    Keys are ``eval_<metric>``, and ``length_metric_key(L, metric)`` for each L of ``lengths``.
    """
    def mean_metrics(key_of, batches) -> dict[str, float]:
        per_batch = jax.device_get([eval_step(batch) for batch in batches])
        return {key_of(key): float(np.mean([m[key] for m in per_batch])) for key in per_batch[0]}

    result = mean_metrics(lambda key: f"eval_{key}", (task.batch(i, split="eval") for i in range(n_batches)))
    for length in lengths:
        result.update(mean_metrics(functools.partial(length_metric_key, length),
                                   (batch_at_length(task, i, length) for i in range(n_batches))))
    return result


def supports_lengths(task: Task) -> bool:
    """Whether ``batch_at_length`` can give this task's held-out batches at a chosen length."""
    return callable(getattr(task, "batch_at_length", None)) or isinstance(task, RunningParity)


def check_eval_lengths(task: Task, lengths: Sequence[int]) -> tuple[int, ...]:
    """``lengths`` as a tuple of ints; TypeError if the task cannot give batches at chosen lengths."""
    lengths = tuple(lengths)
    bad = [n for n in lengths if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1]
    if bad:
        raise ValueError(f"eval_lengths must be positive ints, got {lengths!r}")
    if lengths and not supports_lengths(task):
        raise TypeError(f"task {getattr(task, 'name', type(task).__name__)!r} ({type(task).__name__}) cannot "
                        f"be evaluated at chosen lengths (eval_lengths={lengths}): it needs a method "
                        f"batch_at_length(step, length, split)")
    return tuple(int(n) for n in lengths)


def batch_at_length(task: Task, step: int, length: int, split: str = "eval") -> Batch:
    """Held-out batch ``step`` whose sequences have ``length`` steps (see the module docstring)."""
    (length,) = check_eval_lengths(task, (length,))
    if callable(getattr(task, "batch_at_length", None)):
        return task.batch_at_length(step, length, split=split)
    return dataclasses.replace(task, length=length).batch(step, split)


@dataclasses.dataclass
class TrainResult:
    """What a call to ``train`` did: the step it started from, its records, and the last evaluation."""

    start_step: int
    records: list[dict[str, Any]]
    final: dict[str, float]
    seconds: float
    metrics_path: str | None = None
    plot_path: str | None = None
    # With ``keep_best``: {"step": s, **the evaluation at s}, the model left in place; else None.
    best: dict[str, float] | None = None

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
    eval_lengths: Sequence[int] = (),
    run: Mapping[str, Any] | None = None,
    keep_best: str | None = None,
    keep_best_mode: str = "min",
) -> TrainResult:
    """Train ``model`` in place for ``steps`` updates in total on ``task.batch(0) … task.batch(steps - 1)``.

    With ``checkpoint_dir``, the latest checkpoint there is restored first and training goes on
    from its step; a checkpoint is written every ``checkpoint_every`` updates (default
    ``eval_every``) and at the end, so a kill loses at most one interval. Records after the
    restored step are dropped from ``metrics_path`` (they were written after that checkpoint).
    The held-out split is evaluated at step 0, every ``eval_every`` updates and at the end.
    Metrics are fetched from the device every ``log_every`` updates, which also bounds how far
    asynchronous dispatch runs ahead (keep it near 10 on multi-device CPU meshes: ENV-NOTES §4).

    ``eval_lengths``: also evaluate at each of these sequence lengths (module docstring).
    ``run``: a JSON-able description of the run, stored in every checkpoint; resuming from a
    checkpoint whose description differs raises ``checkpoint.CheckpointError`` naming the fields, as
    does a corrupt checkpoint or one whose arrays do not fit the model (never a silent fresh start).

    ``keep_best``: an evaluation metric (``"eval_loss"``, ``"eval_accuracy"``, ``"eval_len100_accuracy"``,
    ...); the run remembers the model at the evaluation where it was lowest (``keep_best_mode="min"``)
    or highest ("max"), the first such on ties, never at a NaN, and leaves that model in ``model`` at
    the end: early stopping on a held-out split without stopping. The optimizer keeps its last state,
    ``TrainResult.best`` says which step won, and checkpoints carry the best model too, so a resumed
    run ends with the same one. It holds one more copy of the model's state in memory.
    """
    if keep_best_mode not in ("min", "max"):
        raise ValueError(f"train: keep_best_mode must be 'min' or 'max', got {keep_best_mode!r}")
    if steps < 0 or eval_every <= 0 or log_every <= 0 or eval_batches <= 0:
        raise ValueError(
            f"train: steps must be >= 0 and eval_every, log_every, eval_batches > 0; got steps={steps}, "
            f"eval_every={eval_every}, log_every={log_every}, eval_batches={eval_batches}"
        )
    eval_lengths = check_eval_lengths(task, eval_lengths)
    checkpoint_every = checkpoint_every or eval_every
    began = time.perf_counter()

    mngr = checkpoint.manager(checkpoint_dir) if checkpoint_dir is not None else None
    best: checkpoint.Best | None = None
    try:
        start = checkpoint.restore_latest(mngr, model, optimizer, run) if mngr is not None else 0
        if start and keep_best is not None:
            best = checkpoint.restore_best(mngr, start, model)
        if start > steps:
            raise ValueError(f"train: the checkpoint in {checkpoint_dir} is at step {start}, "
                             f"past steps={steps}")
    except BaseException:
        if mngr is not None:
            mngr.close()
        raise
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

    def consider(step: int, result: dict[str, float]) -> None:
        """Remember the model if this evaluation is its best so far (``keep_best``)."""
        nonlocal best
        if keep_best is None:
            return
        if keep_best not in result:
            raise ValueError(f"train: keep_best={keep_best!r} is not one of the evaluation's metrics "
                             f"{sorted(result)}")
        if _improves(result[keep_best], None if best is None else best.metrics[keep_best], keep_best_mode):
            best = checkpoint.Best(step, dict(result), checkpoint.snapshot(model))

    try:
        if start == 0:
            final = evals[0] = evaluate(eval_step, task, eval_batches, eval_lengths)
            consider(0, final)
            flush()
        elif start == steps:    # resumed a finished run: report the restored model, log nothing new
            final = evaluate(eval_step, task, eval_batches, eval_lengths)
        for k in range(start, steps):
            pending.append((k + 1, train_step(task.batch(k))))
            done = k + 1
            if done % eval_every == 0 or done == steps:
                final = evals[done] = evaluate(eval_step, task, eval_batches, eval_lengths)
                consider(done, final)
            save_now = mngr is not None and (done % checkpoint_every == 0 or done == steps)
            # Flush before saving so the log holds every record up to the checkpoint it may resume from.
            if done % log_every == 0 or done in evals or save_now:
                flush()
            if save_now:
                checkpoint.save(mngr, done, model, optimizer, run, keep_best=keep_best is not None, best=best)
        flush()
    finally:
        # On an exception (Ctrl-C included) let the checkpoint already started finish committing.
        bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()

    if best is not None:
        nnx.update(model, best.state)
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
        best=None if best is None else {"step": best.step, **best.metrics},
    )


def _improves(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) in ``mode``; a NaN never wins, and any
    number beats a NaN best."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if mode == "min" else value > best
