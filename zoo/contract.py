"""The model contract: a recurrence is a bundle of four pure functions.

A ``Recurrence`` is to a sequence model what optax's ``GradientTransformation`` is to an
optimiser: a NamedTuple of functions with explicit state, composable without inheritance::

    params = rec.init(key, d_in)                             # pytree of arrays
    state  = rec.initial_state(params, batch_size)           # pytree, float32 leaves [B, ...]
    state, y_t = rec.step(params, state, x_t)                # x_t [B, D_in] -> y_t [B, D_out]
    ys, state  = rec.apply(params, xs, state=None, reset=None, mode="auto", reverse=False)
                                                             # xs [B, T, D_in] -> ys [B, T, D_out]

``reset[b, t] = True`` discards the state before step ``t`` (it is replaced by the fresh
``initial_state``), so packed sequences work inside ``jit`` with static shapes. ``reverse=True``
runs time backwards with the same meaning of ``reset`` (a flag marks where a segment starts).

``make_recurrence`` wraps a model's raw functions with the checks that every model shares, so that
malformed input fails with a ``ValueError`` that names the argument and the shapes before any
tracing error can surface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
State = Any

AUTO = "auto"


class Recurrence(NamedTuple):
    """Four pure functions plus the modes that ``apply`` accepts (besides ``"auto"``)."""

    init: Callable[..., Params]
    initial_state: Callable[[Params, int], State]
    step: Callable[[Params, State, jax.Array], tuple[State, jax.Array]]
    apply: Callable[..., tuple[jax.Array, State]]
    modes: tuple[str, ...] = ("sequential",)
    name: str = ""
    causal: bool = True


# --------------------------------------------------------------------------------------------
# Checks shared by every model and combinator.


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_float_input(name: str, arg: str, x, rank: int, width: int | None) -> None:
    """``x`` must be a floating array of the given rank whose last axis is ``width``."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name}: {arg} has dtype {dtype}; a float dtype is needed (embed integer tokens first, "
            f"for example with zoo.nn.SequenceModel)"
        )
    letters = {2: "[B, D]", 3: "[B, T, D]"}.get(rank, f"rank {rank}")
    if np.ndim(x) != rank:
        raise ValueError(f"{name}: {arg} must have shape {letters}, got shape {_shape(x)}")
    if width is not None and _shape(x)[-1] != width:
        raise ValueError(
            f"{name}: {arg} has width {_shape(x)[-1]} (shape {_shape(x)}) but the params expect "
            f"D = {width}"
        )


def check_reset(name: str, reset, batch: int, time: int):
    """``reset`` is ``None`` or a bool/int array of shape [B, T]; returns it as bool or None."""
    if reset is None:
        return None
    if _shape(reset) != (batch, time):
        raise ValueError(f"{name}: reset must have shape [B, T] = {(batch, time)}, got {_shape(reset)}")
    dtype = reset.dtype if hasattr(reset, "dtype") else np.asarray(reset).dtype
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{name}: reset must be bool [B, T], got dtype {dtype}")
    return jnp.asarray(reset).astype(bool)


def check_state(name: str, arg: str, state, expected) -> None:
    """``state`` must have the tree structure and leaf shapes of ``expected`` (ShapeDtypeStructs)."""
    got_def = jax.tree.structure(state)
    want_def = jax.tree.structure(expected)
    if got_def != want_def:
        raise ValueError(
            f"{name}: {arg} has structure {got_def} but this model's state is {want_def}; "
            f"was it made by another model or config?"
        )
    for i, (got, want) in enumerate(zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True)):
        if _shape(got) != tuple(want.shape):
            raise ValueError(
                f"{name}: {arg} leaf {i} has shape {_shape(got)} but this model's state needs "
                f"{tuple(want.shape)}; was it made by another config or batch size?"
            )
        dtype = getattr(got, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"{name}: {arg} leaf {i} has dtype {dtype}; states are float32")


def check_mode(name: str, mode: str, modes: tuple[str, ...]) -> None:
    if mode != AUTO and mode not in modes:
        raise ValueError(f"{name}: mode={mode!r} is not supported; choose one of {(AUTO, *modes)}")


def as_state_dtype(state: State) -> State:
    """States are float32 whatever the compute dtype."""
    return jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), state)


def output_width(rec: Recurrence, params: Params, d_in: int) -> int:
    """The width of ``rec``'s outputs for inputs of width ``d_in``, found without computing.

    A causal recurrence is asked through one ``step``; a non-causal one (no ``step``) through
    ``apply`` on a single time step.
    """
    if rec.causal:
        def probe(p):
            return rec.step(p, rec.initial_state(p, 1), jnp.zeros((1, d_in), jnp.float32))[1]
    else:
        def probe(p):
            return rec.apply(p, jnp.zeros((1, 1, d_in), jnp.float32))[0]

    return int(jax.eval_shape(probe, params).shape[-1])


# --------------------------------------------------------------------------------------------
# The wrapper every model goes through.


def make_recurrence(
    name: str,
    *,
    init: Callable[[jax.Array, int], Params],
    initial_state: Callable[[Params, int], State],
    step: Callable[[Params, State, jax.Array], tuple[State, jax.Array]],
    apply: Callable[..., tuple[jax.Array, State]],
    input_width: Callable[[Params], int],
    modes: tuple[str, ...] = ("sequential",),
    default_d_in: int | None = None,
) -> Recurrence:
    """Bundle a model's raw functions into a checked ``Recurrence``.

    The raw functions may assume valid input:

    * ``step(params, state, x_t)`` gets ``x_t`` [B, D_in] and a float32 ``state``.
    * ``apply(params, xs, state, reset, mode, reverse)`` gets ``xs`` [B, T, D_in], a float32
      ``state`` (never ``None``), ``reset`` as bool [B, T] or ``None``, and ``mode`` from
      ``modes`` or ``"auto"``.

    The returned states are cast to float32 here, so no model can leak a bfloat16 state.
    """

    def checked_init(key: jax.Array, d_in: int | None = None) -> Params:
        d = default_d_in if d_in is None else d_in
        if d is None:
            raise TypeError(f"{name}: init needs d_in, the width of the inputs")
        if not isinstance(d, (int, np.integer)) or d <= 0:
            raise ValueError(f"{name}: d_in must be a positive int, got {d!r}")
        return init(key, int(d))

    def checked_initial_state(params: Params, batch_size: int | tuple[int]) -> State:
        if isinstance(batch_size, tuple):
            if len(batch_size) != 1:
                raise ValueError(
                    f"{name}: batch_shape must be an int or a 1-tuple (use jax.vmap for more batch "
                    f"axes), got {batch_size}"
                )
            (batch_size,) = batch_size
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise ValueError(f"{name}: batch_size must be a non-negative int, got {batch_size!r}")
        return as_state_dtype(initial_state(params, int(batch_size)))

    def expected_state(params: Params, batch: int):
        return jax.eval_shape(lambda p: initial_state(p, batch), params)

    def checked_step(params: Params, state: State, x_t: jax.Array):
        check_float_input(name, "x_t", x_t, rank=2, width=input_width(params))
        check_state(name, "state", state, expected_state(params, _shape(x_t)[0]))
        new_state, y_t = step(params, as_state_dtype(state), x_t)
        return as_state_dtype(new_state), y_t

    def checked_apply(params: Params, xs: jax.Array, state: State = None, reset=None,
                      mode: str = AUTO, reverse: bool = False):
        check_float_input(name, "xs", xs, rank=3, width=input_width(params))
        batch, time = _shape(xs)[:2]
        check_mode(name, mode, modes)
        reset = check_reset(name, reset, batch, time)
        if state is None:
            state = initial_state(params, batch)
        else:
            check_state(name, "state", state, expected_state(params, batch))
        ys, final = apply(params, xs, as_state_dtype(state), reset, mode, bool(reverse))
        return ys, as_state_dtype(final)

    return Recurrence(
        init=checked_init,
        initial_state=checked_initial_state,
        step=checked_step,
        apply=checked_apply,
        modes=tuple(modes),
        name=name,
    )
