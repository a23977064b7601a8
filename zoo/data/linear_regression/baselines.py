"""Closed-form in-context predictors for the regression records: the baselines of Garg et al. (2022).

``bayes_predictions(batch, layout, noise)`` predicts each query from the pairs before it in its
sequence: the posterior mean of ``w`` under the task's prior ``N(0, I_d / d)`` and Gaussian noise of
std ``noise``, i.e. ridge regression with ``lambda = d * noise**2``, and for ``noise=0`` the
minimum-norm least-squares solution (Garg et al.'s "least squares" baseline, optimal when noiseless).
Query 0 (no pair before it) is predicted 0. Plain numpy in float64; a reference, not a fast path.
"""

from __future__ import annotations

import numpy as np

from zoo.data.linear_regression.builder import LAYOUTS


def sequence_starts(mask: np.ndarray, reset: np.ndarray) -> list[int]:
    starts = [int(i) for i in np.flatnonzero(reset)]
    return starts if starts and starts[0] == 0 else [0, *starts]


def row_points(inputs: np.ndarray, mask: np.ndarray, layout: str):
    """One sequence's query steps, their x [n, d], and the y of each pair that the inputs reveal."""
    d = inputs.shape[-1] - 1
    queries = np.flatnonzero(mask)
    x = inputs[queries, :d]
    if layout == "interleaved":     # y_k is the y-token right after x_k
        revealed = [inputs[q + 1, d] if q + 1 < len(inputs) else np.nan for q in queries]
    else:                           # y_k sits beside x_{k+1}; the last y is never shown
        revealed = [inputs[q, d] for q in queries[1:]] + [np.nan]
    return queries, x, np.asarray(revealed, np.float64)


def fit_predict(x_context: np.ndarray, y_context: np.ndarray, x_query: np.ndarray, ridge: float) -> float:
    if len(x_context) == 0:
        return 0.0
    if ridge > 0:
        d = x_context.shape[1]
        w = np.linalg.solve(x_context.T @ x_context + ridge * np.eye(d), x_context.T @ y_context)
    else:
        w = np.linalg.lstsq(x_context, y_context, rcond=None)[0]     # minimum norm when underdetermined
    return float(x_query @ w)


def bayes_predictions(batch, layout: str, noise: float = 0.0) -> np.ndarray:
    """float32 [B, T, 1]: at each masked step, the posterior-mean prediction from the preceding pairs of
    its sequence (sequences split at ``reset``); 0 elsewhere."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    inputs = np.asarray(batch["inputs"], np.float64)
    mask, reset = np.asarray(batch["mask"], bool), np.asarray(batch["reset"], bool)
    d = inputs.shape[-1] - 1
    out = np.zeros(mask.shape + (1,), np.float32)
    for row in range(mask.shape[0]):
        starts = sequence_starts(mask[row], reset[row]) + [mask.shape[1]]
        for start, stop in zip(starts[:-1], starts[1:], strict=True):
            queries, x, y = row_points(inputs[row, start:stop], mask[row, start:stop], layout)
            for k, q in enumerate(queries):
                out[row, start + q, 0] = fit_predict(x[:k], y[:k], x[k], d * noise**2)
    return out
