"""Dispatch from the nonlinear-cell models (lstm, gru, slstm) to ``pallas_kernels.fused_rnn_cell``.

The kernel runs a block of time steps per launch with the recurrent matrix resident on chip (the
FlashRNN idea); the input projection is one matmul over all B·T rows in XLA before it. A model opts
in through its config's ``implementation`` field, read like an engine's ``implementation=``
(``zoo/ops/_dispatch.py``): "xla", "pallas", a list tried in turn, or None (the kernel on GPU and TPU
in mode "auto", XLA elsewhere). Calls the kernel does not cover run the nonlinear engine, with one
warning when the kernel was asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zoo.ops._dispatch import _as_list, use_pallas

KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def check_implementation(model: str, implementation) -> None:
    """Config check: None, "xla", "pallas" or a tuple of them (a config is hashable, so no list)."""
    if implementation is None:
        return
    if not isinstance(implementation, (str, tuple)):
        raise ValueError(f"{model}: implementation must be None, 'xla', 'pallas' or a tuple of them, "
                         f"got {implementation!r}")
    _as_list(model, implementation)


def _unsupported(cell: str, width: int, xs, reverse: bool, reason: str | None) -> str | None:
    """Why the kernel cannot take this call (None when it can)."""
    if reason is not None:
        return reason
    if reverse:
        return "reverse=True"
    if xs.dtype not in KERNEL_DTYPES:
        return f"inputs of dtype {xs.dtype} (it takes float32 or bfloat16)"
    from pallas_kernels.fused_rnn_cell import fits_on_chip  # Pallas loads only when asked for

    platform = jax.default_backend()
    # On CPU the kernel runs in interpret mode (tests), where no chip memory limits it.
    if platform in ("gpu", "tpu") and not fits_on_chip(cell, width, xs.dtype, platform):
        return f"a recurrent matrix of width {width} that does not fit on chip"
    return None


def fused_apply(model: str, implementation, *, cell: str, width: int,
                prepare: Callable, reason: str | None = None):
    """``fused(params, xs, h, reset, mode, reverse)``: the kernel's ``(ys, final_state)``, or None when
    the engine should run. ``prepare(params, xs) -> (x_pre, w_rec, kernel_kwargs)``; ``reason`` is a
    config the kernel never covers (an LSTM variant, say)."""

    def fused(params, xs, h, reset, mode, reverse):
        unsupported = _unsupported(cell, width, xs, reverse, reason)
        if not use_pallas(model, implementation, mode, unsupported):
            return None
        from pallas_kernels.fused_rnn_cell import fused_rnn_cell

        x_pre, w_rec, kwargs = prepare(params, xs)
        return fused_rnn_cell(cell, x_pre, w_rec, h, reset=reset, **kwargs)

    return fused
