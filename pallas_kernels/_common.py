"""Pieces every kernel package shares: the platform dispatch of a (forward, backward) pair and the
padded widths that Triton (powers of two) and Mosaic (multiples of 8 x 128) accept."""

from __future__ import annotations

import functools

from jax import lax


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
