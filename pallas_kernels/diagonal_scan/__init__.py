"""diagonal_scan: the element-wise linear recurrence of zoo's diagonal engine as a Pallas kernel for
GPU (Triton) and TPU (Mosaic), with a Pallas backward.

    h_t = a_t ⊙ h_{t-1} + b_t

(the recurrence of S4D/S5, LRU, Mamba's per-channel form, minGRU/minLSTM: e.g. A. Orvieto et al.,
"Resurrecting Recurrent Neural Networks for Long Sequences", ICML 2023; L. Feng et al., "Were RNNs
All We Needed?", 2024). Public function::

    h, final_state = diagonal_scan(a, b, initial_state=None, *, reset=None, reverse=False,
                                   platform=None, interpret=False)

b [B, T, ...] and a of b's rank (size-1 axes broadcast), real float32 or bfloat16; initial_state
[B, ...] (cast to float32; None: zeros); reset bool [B, T] (True: the state is dropped before step
t; with ``reverse=True`` the carry from t + 1 into t is dropped when t + 1 starts a segment, as in
``zoo/ops/_time.py``). h is [B, T, ...] in b's dtype, final_state [B, ...] float32 (the state after
the last processed step). The state and every product are float32 inside the kernels.
``platform=None`` picks by ``lax.platform_dependent``: the Triton kernel on cuda, the Mosaic kernel on
tpu, the Triton kernel body in interpret mode on cpu; ``platform="gpu"``/``"tpu"`` forces one kernel
(``interpret=True`` runs it on CPU, for tests).

Outside the kernels, in XLA: broadcasting a, flattening the feature axes to D, and the resets, which
are folded into an effective decay (a = 0 where the carried state is dropped, so the initial state
only reaches the steps before the first reset), as ``zoo.ops.diagonal`` does. JAX differentiates those
steps; the custom_vjp covers the kernels. Its backward kernel runs the adjoint recurrence
``g_t = dh_t + a_{t+1} g_{t+1}`` against the forward direction and forms ``db = g``,
``da = g ⊙ h_{t-1}`` and ``d initial_state = a_first g_first`` on the way, so only h is kept.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels._common import DTYPES, platform_kernels
from pallas_kernels.diagonal_scan import gpu, tpu
from pallas_kernels.diagonal_scan.reference import diagonal_scan_reference

__all__ = ["diagonal_scan", "diagonal_scan_reference"]

PLATFORMS = (None, "gpu", "tpu")
F32 = jnp.float32


def _kernels(platform, interpret):
    """(forward, backward) for one platform, or platform_dependent dispatchers."""
    return platform_kernels(gpu, tpu, platform, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _core(a, b, h0, reverse, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    return forward(a, b, h0, reverse=reverse)


def _core_fwd(a, b, h0, reverse, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    h, final = forward(a, b, h0, reverse=reverse)
    return (h, final), (a, h, h0)


def _core_bwd(reverse, platform, interpret, residuals, cotangents):
    a, h, h0 = residuals
    dh, d_final = cotangents
    _, backward = _kernels(platform, interpret)
    return backward(a, h, h0, dh.astype(h.dtype), d_final.astype(F32), reverse=reverse)


_core.defvjp(_core_fwd, _core_bwd)


def _check(a, b, initial_state, reset, platform):
    who = "diagonal_scan"
    for name, x in (("a", a), ("b", b)):
        if not hasattr(x, "dtype") or x.dtype not in DTYPES:
            raise TypeError(f"{who}: {name} must be a float32 or bfloat16 array, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
    if b.ndim < 2 or b.shape[1] == 0:
        raise ValueError(f"{who}: b must be [B, T, ...] with T >= 1, got {b.shape}")
    if a.ndim != b.ndim or any(s not in (1, t) for s, t in zip(a.shape, b.shape, strict=True)):
        raise ValueError(f"{who}: a must have b's shape {b.shape} (size-1 axes broadcast), got {a.shape}")
    state_shape = (b.shape[0], *b.shape[2:])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"{who}: initial_state must be [B, ...] = {state_shape} to match b {b.shape}, "
                         f"got {tuple(initial_state.shape)}")
    if reset is not None and (tuple(reset.shape) != b.shape[:2] or reset.dtype != jnp.bool_):
        raise ValueError(f"{who}: reset must be bool [B, T] = {b.shape[:2]}, got {reset.dtype} "
                         f"{tuple(reset.shape)}")
    if platform not in PLATFORMS:
        raise ValueError(f"{who}: platform must be one of {PLATFORMS}, got {platform!r}")


def _drop_flags(reset, reverse: bool):
    """bool [B, T]: True where step t must not see the state carried into it. Backwards the carry
    into t comes from t + 1, so it is dropped when t + 1 starts a segment (never at the last step)."""
    if reset is None or not reverse:
        return reset
    return jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1)


def diagonal_scan(a, b, initial_state=None, *, reset=None, reverse: bool = False, platform=None,
                  interpret: bool = False):
    """See the module docstring. Returns (h [B, T, ...] in b's dtype, final_state [B, ...] float32)."""
    _check(a, b, initial_state, reset, platform)
    batch, time, *feat = b.shape
    d = math.prod(feat)
    reverse = bool(reverse)
    a = jnp.broadcast_to(a, b.shape).reshape(batch, time, d)
    drop = _drop_flags(reset, reverse)
    if drop is not None:
        a = jnp.where(drop[..., None], jnp.zeros((), a.dtype), a)
    h0 = jnp.zeros((batch, d), F32) if initial_state is None else initial_state.astype(F32).reshape(batch, d)
    h, final = _core(a, b.reshape(batch, time, d), h0, reverse, platform, bool(interpret))
    return h.reshape(b.shape), final.reshape(batch, *feat)
