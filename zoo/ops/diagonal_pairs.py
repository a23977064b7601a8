"""Arithmetic on the values of ``zoo.ops.diagonal``: a real array, or a (real, imag) pair of them.

Complex recurrences are carried as real pairs so that no kernel sees a complex dtype; these few
functions (and the two time-axis helpers at the end) let every mode be written once for both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Field = Any  # a real array, or a (real, imag) pair of real arrays of one shape


def mul(x: Field, y: Field) -> Field:
    if isinstance(x, tuple):
        (xr, xi), (yr, yi) = x, y
        return (xr * yr - xi * yi, xr * yi + xi * yr)
    return x * y


def add(x: Field, y: Field) -> Field:
    return jax.tree.map(jnp.add, x, y)


def conj(x: Field) -> Field:
    return (x[0], -x[1]) if isinstance(x, tuple) else x


def fmap(fn, *xs: Field) -> Field:
    """Apply ``fn`` to each real array (both parts of a pair)."""
    return jax.tree.map(fn, *xs)


def real_part(x: Field):
    """The real part of a pair, or the array itself (for shapes and dtypes)."""
    return x[0] if isinstance(x, tuple) else x


def zero_where(flag, x: Field) -> Field:
    """x with the flagged entries zeroed (flag: bool [B] or [B, T], leading the axes of x)."""
    def zero(v):
        mask = flag.reshape(flag.shape + (1,) * (v.ndim - flag.ndim))
        return jnp.where(mask, jnp.zeros((), v.dtype), v)

    return fmap(zero, x)


def shift_from_previous(x: Field, x0: Field, reverse: bool) -> Field:
    """[B, T, ...] whose step t holds x at the step processed before t, and x0 at the first step."""
    def shift(v, v0):
        v0 = v0[:, None]
        return jnp.concatenate([v[:, 1:], v0] if reverse else [v0, v[:, :-1]], axis=1)

    return fmap(shift, x, x0)
