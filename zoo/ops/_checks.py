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


def check_qkv(who: str, q, k, v, *, time_axis: bool = True, suffix: str = ""):
    """q, k [B, T, H, K] and v [B, T, H, V] in FLA's layout (no T axis for one-token steps, whose
    argument names carry ``suffix``, e.g. "_t"); their dtypes are checked by the caller. Returns
    (batch, time, heads, K, V, prefix) with prefix = (B, T, H), or (B, H) without a T axis."""
    q_name, k_name, v_name = (a + suffix for a in ("q", "k", "v"))
    lead = "[B, T, H" if time_axis else "[B, H"
    rank = 4 if time_axis else 3
    if np.ndim(q) != rank:
        raise ValueError(f"{who}: {q_name} must have shape {lead}, K], got {shape_of(q)}")
    if time_axis:
        batch, time, heads, dk = shape_of(q)
        if time == 0:
            raise ValueError(f"{who}: {q_name} has shape {shape_of(q)} with T = 0 steps; "
                             "at least one step is needed")
        prefix = (batch, time, heads)
    else:
        batch, heads, dk = shape_of(q)
        time, prefix = 1, (batch, heads)
    check_shape(who, k_name, k, shape_of(q), f"{lead}, K] like {q_name}")
    if np.ndim(v) != rank or shape_of(v)[:-1] != prefix:
        raise ValueError(f"{who}: {v_name} must have shape {lead}, V] = {prefix + ('V',)} to match "
                         f"{q_name} {shape_of(q)}, got {shape_of(v)}")
    return batch, time, heads, dk, shape_of(v)[-1], prefix
