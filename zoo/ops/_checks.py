"""Argument checks shared by the engines: each raises an error that names the calling function
(``who``), the argument and the shapes, so that a user sees at once which input is wrong."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def shape_of(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_float(who: str, arg: str, x, *, complex_ok: bool = False, rank: int | None = None,
                letters: str = "") -> None:
    """``x`` is an array of a float (or, with ``complex_ok``, complex) dtype, of ``rank`` dims if given."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{who}: {arg} must be an array, got {type(x).__name__}")
    if rank is not None and np.ndim(x) != rank:
        raise ValueError(f"{who}: {arg} must have shape {letters}, got shape {shape_of(x)}")
    ok = jnp.issubdtype(dtype, jnp.floating) or (complex_ok and jnp.issubdtype(dtype, jnp.complexfloating))
    if not ok:
        kinds = "a float or complex" if complex_ok else "a float"
        raise ValueError(f"{who}: {arg} has dtype {dtype} (shape {shape_of(x)}); {kinds} dtype is needed")


def check_shape(who: str, arg: str, x, want, letters: str) -> None:
    if shape_of(x) != tuple(want):
        raise ValueError(f"{who}: {arg} must have shape {letters} = {tuple(want)}, got {shape_of(x)}")


def check_mode(who: str, mode: str, modes: tuple[str, ...], auto: str) -> str:
    """``mode`` resolved: "auto" becomes ``auto``; anything outside ``modes`` is a ValueError."""
    if mode == "auto":
        return auto
    if mode not in modes:
        raise ValueError(f"{who}: mode={mode!r} is not supported; choose one of {('auto', *modes)}")
    return mode


def check_positive_int(who: str, arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{who}: {arg} must be a positive int, got {value!r}")
    return int(value)
