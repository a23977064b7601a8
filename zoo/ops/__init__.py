"""Recurrence engines: pure jnp, each with a naive ``reference``. Nothing here imports the layers above."""

from zoo.ops import diagonal, nonlinear

__all__ = ["diagonal", "nonlinear"]
