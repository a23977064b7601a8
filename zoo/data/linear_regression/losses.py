"""The loss of in-context linear regression: masked mean squared error at the query steps.

With ``w ~ N(0, I_d / d)`` (``zoo.data.linear_regression.builder``) this error is the "normalized
squared error" of Garg et al. (2022) (squared error / ``d`` with their ``w ~ N(0, I_d)``): predicting
0 scores ``1 + noise**2`` and knowing ``w`` scores ``noise**2``, the error no predictor can beat.

Metrics (scalars, so the training loop can average them over batches):

* ``loss`` = ``mse``: mean over the masked steps of ``(prediction - y)**2``;
* ``normalized_mse``: ``mse / (1 + noise**2)``, the error relative to the zero predictor (1: learned
  nothing about ``w``);
* ``excess_mse``: ``mse - noise**2``, the error above the known-``w`` predictor's (0: as good as
  knowing ``w``; equal to ``mse`` when ``noise=0``);
* ``mse_first``: at query 0 (no preceding pair; the best prediction there is 0);
* ``mse_after_dim``: at the queries ``k >= d`` (``k`` preceding pairs, ``d = inputs.shape[-1] - 1``), the
  ones that noiseless least squares gets exactly (0 when none is in the batch).

``noise`` is not in the batch: ``regression_loss`` assumes 0, and ``make_regression_loss(noise)`` gives
the loss function for a config's ``noise`` (the same function for the same value, so the training loop
compiles its step once). The query index ``k`` of a masked step is the number of masked steps before it
in its sequence (counted from the last ``reset``), so packed rows are measured correctly too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def query_index(mask: jax.Array, reset: jax.Array) -> jax.Array:
    """int32 [..., T]: at each masked step, how many masked steps precede it in its sequence (the
    sequence starts at the last ``reset`` step at or before it; a row without one starts at step 0)."""
    mask = mask.astype(jnp.int32)
    through = jnp.cumsum(mask, axis=-1)       # masked steps up to and including this one
    before = through - mask
    start = jax.lax.cummax(jnp.where(reset, before, 0), axis=mask.ndim - 1)
    return before - start


def regression_metrics(predictions: jax.Array, targets: jax.Array, mask: jax.Array, reset: jax.Array,
                       dim: int, noise: float = 0.0) -> dict[str, jax.Array]:
    """The module docstring's metrics. ``predictions``, ``targets``: [..., T, 1] (or [..., T]);
    ``mask``, ``reset``: [..., T]."""
    if predictions.shape != targets.shape:
        raise ValueError(f"regression_metrics: predictions {predictions.shape} and targets {targets.shape} "
                         f"must have one shape")
    if targets.shape[-1] == 1 and targets.ndim == mask.ndim + 1:
        predictions, targets = predictions[..., 0], targets[..., 0]
    if targets.shape != mask.shape or reset.shape != mask.shape:
        raise ValueError(f"regression_metrics: targets {targets.shape} must be [..., T] or [..., T, 1] and "
                         f"mask {mask.shape}, reset {reset.shape} [..., T]")
    error = jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32))
    mask = mask.astype(bool)
    k = query_index(mask, reset)

    def mean_where(where):
        weights = where.astype(jnp.float32)
        return jnp.sum(error * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    mse = mean_where(mask)
    return {
        "loss": mse,
        "mse": mse,
        "normalized_mse": mse / (1.0 + noise**2),
        "excess_mse": mse - noise**2,
        "mse_first": mean_where(mask & (k == 0)),
        "mse_after_dim": mean_where(mask & (k >= dim)),
    }


def noisy_regression_loss(model, batch, noise: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``regression_loss`` for targets of noise std ``noise``."""
    predictions = model(batch["inputs"], reset=batch["reset"])
    metrics = regression_metrics(predictions, batch["targets"], batch["mask"], batch["reset"],
                                 dim=batch["inputs"].shape[-1] - 1, noise=noise)
    return metrics["loss"], metrics


def regression_loss(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A ``loss_fn`` for the training loop: ``model(inputs, reset=reset)`` gives [B, T, 1] predictions.

    Exactly ``(model, batch)``: ``nnx.value_and_grad`` cannot place keyword-only arguments, so a
    config's ``noise`` comes through ``make_regression_loss(noise)``.
    """
    return noisy_regression_loss(model, batch, 0.0)


@functools.cache
def make_regression_loss(noise: float = 0.0):
    """``regression_loss`` with the config's ``noise`` (for ``normalized_mse`` and ``excess_mse``); the
    same function object for the same ``noise``."""
    if noise == 0:
        return regression_loss

    def loss_fn(model, batch):
        return noisy_regression_loss(model, batch, noise)

    loss_fn.__name__ = loss_fn.__qualname__ = f"regression_loss_noise_{noise}"
    return loss_fn
