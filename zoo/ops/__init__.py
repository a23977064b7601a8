"""Recurrence engines: pure jnp, each with a naive ``reference``. Nothing here imports the layers above."""

from zoo.ops import conv1d, diagonal, hippo, lti, nonlinear

__all__ = ["conv1d", "diagonal", "hippo", "lti", "nonlinear"]
