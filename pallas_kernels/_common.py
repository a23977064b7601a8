"""Pieces every kernel package shares: the platform dispatch of a (forward, backward) pair, the
padded widths that Triton (powers of two) and Mosaic (multiples of 8 x 128) accept, and, for the
chunked matrix-state kernels (chunked_gla, chunked_delta), the input checks and the [B·H, Tp, ·]
row layout with its per-chunk segment numbers."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

DTYPES = (jnp.float32, jnp.bfloat16)


def pow2_at_least(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def platform_kernels(gpu, tpu, platform, interpret: bool, names=("forward", "backward")):
    """The functions ``names`` (default: forward and backward) of a kernel package whose ``gpu`` and
    ``tpu`` modules both define them. ``platform="gpu"|"tpu"`` picks one (``interpret`` runs it on
    CPU); None dispatches with ``lax.platform_dependent``: Triton on cuda, Mosaic on tpu, and the
    Triton body in interpret mode on cpu, so one jitted function runs here and still lowers for both
    devices."""
    if platform in ("gpu", "tpu"):
        module = gpu if platform == "gpu" else tpu
        return tuple(functools.partial(getattr(module, name), interpret=interpret) for name in names)

    def dispatch(name):
        def run(*args, **kw):
            per_platform = {
                "cpu": functools.partial(getattr(gpu, name), interpret=True, **kw),
                "cuda": functools.partial(getattr(gpu, name), **kw),
                "tpu": functools.partial(getattr(tpu, name), **kw),
            }
            return lax.platform_dependent(*args, **per_platform)
        return run

    return tuple(dispatch(name) for name in names)


def check_chunked_qkv(who: str, q, k, v, initial_state, reset, chunk_size: int, platform, platforms) -> None:
    """The checks every chunked matrix-state kernel makes: q, k [B, T, H, K] and v [B, T, H, V] in one
    dtype (float32 or bfloat16), initial_state [B, H, K, V], reset bool [B, T], a power-of-two chunk
    size >= 16 and a known platform. Each failure names the argument and the shapes."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{who}: q and k must be [B, T, H, K] of one shape, got q {q.shape}, k {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{who}: v must be [B, T, H, V] = {q.shape[:3]} + (V,), got {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise TypeError(f"{who}: {name} must be float32 or bfloat16, got {x.dtype}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"{who}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, _, h, dk = q.shape
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"{who}: initial_state must be [B, H, K, V] = {(b, h, dk, v.shape[-1])}, "
                         f"got {initial_state.shape}")
    if reset is not None and (reset.shape != (b, q.shape[1]) or reset.dtype != jnp.bool_):
        raise ValueError(f"{who}: reset must be bool [B, T] = {(b, q.shape[1])}, "
                         f"got {reset.dtype} {reset.shape}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{who}: chunk_size must be a power of two >= 16, got {chunk_size}")
    if platform not in platforms:
        raise ValueError(f"{who}: platform must be one of {platforms}, got {platform!r}")


def to_rows(x, tp: int, width: int):
    """[B, T, H, W] -> [B·H, Tp, width], zero-padded in time and width."""
    batch, time, heads, w = x.shape
    x = jnp.moveaxis(x, 2, 1).reshape(batch * heads, time, w)
    return jnp.pad(x, ((0, 0), (0, tp - time), (0, width - w)))


def scalar_rows(x, tp: int):
    """[B, T, H] float -> [B·H, Tp] float32, zero-padded in time."""
    return to_rows(x.astype(jnp.float32)[..., None], tp, 1)[..., 0]


def chunk_segments(reset, batch: int, time: int, heads: int, tp: int, chunk: int):
    """[B·H, Tp] float32: inside each chunk, the number of resets at or before each step (0: the step
    still sees the state entering the chunk). Padded steps never reset."""
    if reset is None:
        return jnp.zeros((batch * heads, tp), jnp.float32)
    flags = jnp.pad(reset.astype(jnp.float32), ((0, 0), (0, tp - time)))
    seg = jnp.cumsum(flags.reshape(batch, tp // chunk, chunk), axis=-1).reshape(batch, 1, tp)
    return jnp.broadcast_to(seg, (batch, heads, tp)).reshape(batch * heads, tp)
