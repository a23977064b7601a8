"""The metrics log (one JSON object per line) and the PNG of the curves.

A record is ``{"step": s, "loss": …, "accuracy": …}`` for the training batch of update ``s``
(measured before that update), plus ``eval_loss`` and ``eval_accuracy`` on the steps where the
held-out split was evaluated (``s`` updates done). A record at step 0 carries only the evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np


def append_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record in the log; a half-written last line (from a kill mid-write) is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_records(path: str | os.PathLike, last_step: int) -> list[dict]:
    """Drop the records after ``last_step`` (written after the checkpoint a run resumes from)."""
    kept = [r for r in read_records(path) if r["step"] <= last_step]
    with open(path, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    return kept


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start), so the curve does not lead the data."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[lo]) / (idx - lo)


def _right_panel_metric(train: Sequence[dict], evals: Sequence[dict]) -> str | None:
    """``accuracy`` if the records have it, else the first metric other than the loss (read off the first
    training record, or the first evaluation's ``eval_*`` keys when there was no update)."""
    if train:
        keys = [key for key in train[0] if key not in ("step", "loss") and not key.startswith("eval_")]
    else:
        keys = [key[len("eval_"):] for r in evals[:1] for key in r
                if key.startswith("eval_") and key != "eval_loss" and not key.startswith("eval_len")]
    return "accuracy" if "accuracy" in keys else (keys[0] if keys else None)


def plot_curves(records: Sequence[dict], path: str | os.PathLike, title: str = "",
                chance: float | None = None) -> None:
    """Write a PNG with loss (left) and accuracy (right): raw and smoothed training curves, eval points.

    ``chance``, if given, is drawn as a dashed line on the accuracy panel (e.g. 0.5 for two classes).
    A ``loss_fn`` that reports no ``accuracy`` (``zoo.data.bach_chorales.frame_loss``) gets its first
    other metric on the right instead (``nll_per_frame``), on a linear axis and without a chance line.

    Uses matplotlib's object API on an Agg canvas, so it changes no global backend and needs no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    # Cross-entropy on a log scale: it falls by orders of magnitude once a task is solved, and a
    # linear axis would flatten everything after the first drop (and let one spike set the scale).
    right = _right_panel_metric(train, evals)
    panels = ((axes[0], "loss", "cross-entropy (log scale)", "upper right"),
              (axes[1], right, right or "", "lower right" if right == "accuracy" else "upper right"))
    for ax, key, label, legend_at in panels:
        floor = 1e-7 if key == "loss" else -np.inf
        if key is None:     # the loss is the only metric
            continue
        points = [r for r in train if key in r]
        held_out = [r for r in evals if f"eval_{key}" in r]
        if points:
            steps = np.array([r["step"] for r in points])
            values = np.maximum(np.array([r[key] for r in points], dtype=float), floor)
            window = max(1, len(values) // 50)
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), color="tab:blue", linewidth=1.6,
                    label=f"train (mean of {window})" if window > 1 else "train")
        if held_out:
            ax.plot([r["step"] for r in held_out], [max(r[f"eval_{key}"], floor) for r in held_out], "o-",
                    color="tab:orange", markersize=3.5, linewidth=1.2, label="held-out")
        if key == "loss":
            ax.set_yscale("log")
        elif chance is not None and key == "accuracy":
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both" if key == "accuracy" else "major")
        if ax.get_legend_handles_labels()[0]:       # an empty log (a resumed, finished run) has no curves
            ax.legend(loc=legend_at)
    if right == "accuracy":
        axes[1].set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    fig.savefig(path)
