"""Time-axis helpers shared by the engines: the reverse-direction meaning of ``reset``."""

from __future__ import annotations

import jax.numpy as jnp


def reset_for_reverse(reset: jnp.ndarray | None) -> jnp.ndarray | None:
    """Flags for running a [B, T] sequence backwards, already flipped in time.

    ``reset[:, t]`` marks that a segment starts at ``t``. Running backwards, the state carried from
    ``t`` into ``t - 1`` must be dropped when ``t`` starts a segment, so the flag moves one step
    earlier: ``r[:, t - 1] = reset[:, t]`` and the last step never resets. Flipping afterwards lets
    the caller run an ordinary forward scan over the flipped inputs.
    """
    if reset is None:
        return None
    shifted = jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1)
    return jnp.flip(shifted, axis=1)
