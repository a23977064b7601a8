"""Time-axis helpers shared by the engines: checking ``reset`` and its meaning in reverse."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


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


def check_reset(who: str, reset, batch: int, time: int, letters: str = "[B, T]"):
    """``reset`` is None or a bool/int array of shape [batch, time]; returns it as bool (or None).

    The ValueError names the calling function (``who``) and the shapes; ``letters`` spells the
    expected shape in the caller's own notation (mamba_ssm's layouts call time L).
    """
    if reset is None:
        return None
    shape = tuple(np.shape(reset))
    if shape != (batch, time):
        raise ValueError(f"{who}: reset must have shape {letters} = {(batch, time)}, got {shape}")
    dtype = reset.dtype if hasattr(reset, "dtype") else np.asarray(reset).dtype
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{who}: reset must be bool {letters}, got dtype {dtype}")
    return jnp.asarray(reset).astype(bool)


def reset_before(reset, t: int, time: int, reverse: bool):
    """For reference loops: the [B] flags that drop the state carried into step ``t``, or None.
    Forwards a flag at ``t`` starts a segment there; backwards the carry into ``t`` comes from
    ``t + 1``, so it is dropped when ``t + 1`` starts a segment (and never at the last step)."""
    if reset is None:
        return None
    if not reverse:
        return reset[:, t]
    return reset[:, t + 1] if t + 1 < time else None
