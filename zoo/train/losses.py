"""Masked classification loss and accuracy, and the default ``loss_fn`` for the training loop.

Logits are [..., C] and targets/mask [...], so the same functions serve per-position outputs
([B, T, C] with [B, T] targets) and pooled ones ([B, C] with [B] targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the positions where ``mask`` is set (0 if none are)."""
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def masked_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Fraction of masked positions whose arg-max class equals the target."""
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = mask.astype(jnp.float32)
    return jnp.sum(hits * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classification_loss(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The default ``loss_fn``: ``model(inputs, reset=reset)`` gives logits; returns (loss, metrics)."""
    logits = model(batch["inputs"], reset=batch["reset"])
    loss = masked_cross_entropy(logits, batch["targets"], batch["mask"])
    return loss, {"loss": loss, "accuracy": masked_accuracy(logits, batch["targets"], batch["mask"])}
