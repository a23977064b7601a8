"""The loss of piano-roll modelling: negative log-likelihood per frame under independent Bernoullis.

Each of the ``P`` outputs of a step is the logit of one pitch sounding in that frame, independently
of the others (Boulanger-Lewandowski et al. 2012 compare this RNN baseline with their RNN-RBM). The
log-likelihood of a frame is the sum over pitches of the Bernoulli log-likelihoods; the reported
number (Greff et al. 2017, Chung et al. 2014) is its negative, averaged over the frames that count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def frame_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked frames of the sum over pitches of sigmoid binary cross-entropy (nats).

    ``logits``, ``targets``: [..., T, P] (targets multi-hot in {0, 1}); ``mask``: [..., T]. 0 if no
    frame counts.
    """
    if logits.shape != targets.shape or logits.shape[:-1] != mask.shape:
        raise ValueError(f"frame_nll: logits {logits.shape} and targets {targets.shape} must be [..., T, P] "
                         f"and mask {mask.shape} [..., T]")
    per_pitch = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
    per_frame = jnp.sum(per_pitch, axis=-1)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_frame * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def frame_loss(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A ``loss_fn`` for the training loop: ``model(inputs, reset=reset)`` gives [B, T, P] logits."""
    logits = model(batch["inputs"], reset=batch["reset"])
    loss = frame_nll(logits, batch["targets"], batch["mask"])
    return loss, {"loss": loss, "nll_per_frame": loss}
