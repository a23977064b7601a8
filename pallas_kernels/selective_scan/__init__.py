"""selective_scan: Mamba-1's selective scan (S6) with the N-dimensional state kept on chip, as a Pallas
kernel for GPU (Triton) and TPU (Mosaic) with a Pallas backward.

A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), Section 3
and Algorithm 2. Per channel d and state index n::

    Δ_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
    y_t = C_t · h_t + D u_t,    out_t = y_t · silu(z_t)   (when z is given)

Public function (shapes and meaning as ``zoo.ops.selective.selective_scan`` for real A)::

    out, final_state = selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                      delta_softplus=False, *, initial_state=None, reset=None,
                                      chunk_size=64, platform=None, interpret=False)

u, delta, z [B, D, L] (float32 or bfloat16); A [D, N] real; B, C [B, N, L] or grouped
[B, G, N, L] (D % G == 0; computed in float32); D, delta_bias [D]; initial_state [B, D, N]
(zeros when None); reset bool [B, L] (True: the state before step t is replaced by zeros). out is
[B, D, L] in u's dtype, final_state [B, D, N] float32. Not supported here (the engine falls back to
XLA, or flips time for ``reverse``): complex A, time-invariant or batch-shared B/C, float64.

The kernels never write the [B, L, D, N] states to device memory: the forward saves only the state
entering each time tile of T = ``chunk_size`` steps ([B, L/T, Np, Dp] float32); the backward walks the
tiles in reverse, recomputes each tile's states from its saved state (into VMEM on TPU, into a
per-program [T, Np, Dt] workspace on GPU), then runs the reverse recurrence over the tile.
``platform=None`` picks by ``lax.platform_dependent`` (Triton on cuda, Mosaic on tpu, the Triton
kernel body in interpret mode on cpu); ``platform="gpu"|"tpu"`` forces one (``interpret=True``
runs it on CPU, for tests).

Outside the kernels, in XLA (and differentiated by JAX): the [B, D, L] -> [B, Lp, Dp] layout, the
padding (L to whole tiles, the padded steps having Δ = 0 inside the kernel, which leaves the state
unchanged; N to a power of two >= 8 and the channels of each group to a power of two or a multiple of
128, with zeros, which keep the padded state at 0), and the sums of the per-tile partial gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._common import DTYPES, platform_kernels, pow2_at_least
from pallas_kernels.selective_scan import gpu, tpu
from pallas_kernels.selective_scan._math import Config
from pallas_kernels.selective_scan.reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference", "unsupported_reason"]

PLATFORMS = (None, "gpu", "tpu")
F32 = jnp.float32


def _padded_group_width(per_group: int) -> int:
    """Channels of one group after padding: a power of two >= 8 up to 128, else a multiple of 128."""
    return pow2_at_least(per_group, 8) if per_group <= 128 else -(-per_group // 128) * 128


def _kernels(platform, interpret):
    """(forward, backward) for one platform, or platform_dependent dispatchers."""
    return platform_kernels(gpu, tpu, platform, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def _core(u, x, z, a_t, bias, skip, bm, cm, keep, h0, cfg, per_group, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    out, h_final, _ = forward(u, x, z, a_t, bias, skip, bm, cm, keep, h0, cfg=cfg, per_group=per_group)
    return out, h_final


def _core_fwd(u, x, z, a_t, bias, skip, bm, cm, keep, h0, cfg, per_group, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    out, h_final, states = forward(u, x, z, a_t, bias, skip, bm, cm, keep, h0, cfg=cfg, per_group=per_group)
    return (out, h_final), (u, x, z, a_t, bias, skip, bm, cm, keep, states)


def _core_bwd(cfg, per_group, platform, interpret, residuals, cotangents):
    u, x, z, a_t, bias, skip, bm, cm, keep, states = residuals
    dout, dh_final = cotangents
    _, backward = _kernels(platform, interpret)
    du, dx, dz, da, dskip, db, dc, dh0 = backward(u, x, z, a_t, bias, skip, bm, cm, keep, states,
                                                  dout.astype(u.dtype), dh_final.astype(F32), cfg=cfg,
                                                  per_group=per_group)
    return (du.astype(u.dtype), dx.astype(x.dtype), None if z is None else dz.astype(z.dtype), da.sum(0),
            dx.sum((0, 1))[None], dskip.sum(0), db, dc, jnp.zeros_like(keep),
            dh0)


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------------------------
# Validation.


def _float_array(who, name, x, dtypes=None):
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{who}: {name} is complex ({x.dtype}, shape {np.shape(x)}); this kernel takes real "
                        f"A, B, C only (use zoo.ops.selective for complex A)")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{who}: {name} must be float32 or bfloat16, got {x.dtype} (shape {np.shape(x)})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: {name} must be a float array, got {x.dtype} (shape {np.shape(x)})")
    return jnp.asarray(x)


def _groups(who, name, x, batch, n, time, d):
    """B or C as [B, G, N, L]."""
    if x.ndim == 3 and x.shape == (batch, n, time):
        return x[:, None]
    if x.ndim == 4 and x.shape[0] == batch and x.shape[2:] == (n, time) and x.shape[1] > 0 \
            and d % x.shape[1] == 0:
        return x
    raise ValueError(f"{who}: {name} has shape {x.shape}; expected [B, N, L] = {(batch, n, time)} or "
                     f"[B, G, N, L] with D % G == 0 (D = {d})")


def _vector(who, name, x, d):
    if x is None:
        return jnp.zeros((d,), F32)
    x = _float_array(who, name, x)
    if x.shape != (d,):
        raise ValueError(f"{who}: {name} must have shape [D] = {(d,)}, got {x.shape}")
    return x.astype(F32)


def unsupported_reason(d: int, groups: int, platform) -> str | None:
    """Why the kernel for ``platform`` cannot take D channels in G groups of B/C (None: it can)."""
    per_group = _padded_group_width(d // groups)
    if groups > 1 and platform in (None, "tpu") and per_group % 128:
        return (f"grouped B/C with D/G = {d // groups} channels per group (the TPU kernel needs a multiple "
                f"of 128 when G > 1)")
    return None


# --------------------------------------------------------------------------------------------
# Layout and padding (XLA).


def _pad_channels(x, axis, groups, per_group_padded):
    """Pads the channel axis of x group by group (each group's channels to ``per_group_padded``)."""
    shape = x.shape
    d = shape[axis]
    x = x.reshape(*shape[:axis], groups, d // groups, *shape[axis + 1:])
    pad = [(0, 0)] * x.ndim
    pad[axis + 1] = (0, per_group_padded - d // groups)
    return jnp.pad(x, pad).reshape(*shape[:axis], groups * per_group_padded, *shape[axis + 1:])


def _unpad_channels(x, axis, groups, d):
    shape = x.shape
    x = x.reshape(*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1:])
    x = lax.slice_in_dim(x, 0, d // groups, axis=axis + 1)
    return x.reshape(*shape[:axis], d, *shape[axis + 1:])


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                   initial_state=None, reset=None, chunk_size: int = 64, platform=None,
                   interpret: bool = False):
    """See the module docstring. Returns (out [B, D, L] in u's dtype, final_state [B, D, N] float32)."""
    who = "selective_scan"
    u = _float_array(who, "u", u, DTYPES)
    if u.ndim != 3 or u.shape[2] == 0:
        raise ValueError(f"{who}: u must have shape [B, D, L] with L >= 1, got {u.shape}")
    batch, d, time = u.shape
    delta = _float_array(who, "delta", delta, DTYPES)
    if delta.shape != u.shape:
        raise ValueError(f"{who}: delta has shape {delta.shape} but u has {u.shape}; both are [B, D, L]")
    if z is not None:
        z = _float_array(who, "z", z, DTYPES)
        if z.shape != u.shape:
            raise ValueError(f"{who}: z has shape {z.shape} but u has {u.shape}; both are [B, D, L]")
    A = _float_array(who, "A", A)
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"{who}: A must have shape [D, N] with D = {d}, got {A.shape}")
    n = A.shape[1]
    bm = _groups(who, "B", _float_array(who, "B", B), batch, n, time, d).astype(F32)
    cm = _groups(who, "C", _float_array(who, "C", C), batch, n, time, d).astype(F32)
    if bm.shape[1] != cm.shape[1]:
        raise ValueError(f"{who}: B has {bm.shape[1]} groups but C has {cm.shape[1]} (shapes {bm.shape}, "
                         f"{cm.shape})")
    skip, bias = _vector(who, "D", D, d), _vector(who, "delta_bias", delta_bias, d)
    if initial_state is not None:
        initial_state = _float_array(who, "initial_state", initial_state)
        if initial_state.shape != (batch, d, n):
            raise ValueError(f"{who}: initial_state must have shape [B, D, N] = {(batch, d, n)}, "
                             f"got {initial_state.shape}")
    if reset is not None and (np.shape(reset) != (batch, time) or jnp.asarray(reset).dtype != jnp.bool_):
        raise ValueError(f"{who}: reset must be bool [B, L] = {(batch, time)}, got "
                         f"{jnp.asarray(reset).dtype} {np.shape(reset)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 8 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"{who}: chunk_size must be a power of two >= 8, got {chunk_size!r}")
    if platform not in PLATFORMS:
        raise ValueError(f"{who}: platform must be one of {PLATFORMS}, got {platform!r}")
    groups = bm.shape[1]
    reason = unsupported_reason(d, groups, platform)
    if reason is not None:
        raise ValueError(f"{who}: B/C of shape {bm.shape}: {reason}")

    tile = min(int(chunk_size), pow2_at_least(time, 8))
    lp = -(-time // tile) * tile
    nt = lp // tile
    np_ = pow2_at_least(n, 8)
    ppg = _padded_group_width(d // groups)
    channels = functools.partial(_pad_channels, groups=groups, per_group_padded=ppg)

    def time_major(x):                      # [B, D, L] -> [B, Lp, Dp]
        return jnp.pad(jnp.swapaxes(channels(x, 1), 1, 2), ((0, 0), (0, lp - time), (0, 0)))

    def tiles(m):                           # [B, G, N, L] -> [B, G, NT, Np, T]
        m = jnp.pad(m, ((0, 0), (0, 0), (0, np_ - n), (0, lp - time)))
        return jnp.swapaxes(m.reshape(batch, groups, np_, nt, tile), 2, 3)

    a_t = jnp.pad(channels(A.astype(F32), 0), ((0, 0), (0, np_ - n))).T
    h0 = jnp.zeros((batch, d, n), F32) if initial_state is None else initial_state.astype(F32)
    h0 = jnp.swapaxes(jnp.pad(channels(h0, 1), ((0, 0), (0, 0), (0, np_ - n))), 1, 2)
    keep = jnp.ones((batch, time), F32) if reset is None else 1.0 - jnp.asarray(reset, F32)
    keep = jnp.pad(keep, ((0, 0), (0, lp - time)), constant_values=1.0).reshape(batch, nt, 1, tile)
    cfg = Config(tile=tile, length=time, softplus=bool(delta_softplus), has_z=z is not None)
    out, h_final = _core(time_major(u), time_major(delta), None if z is None else time_major(z), a_t,
                         channels(bias, 0)[None], channels(skip, 0)[None], tiles(bm), tiles(cm), keep, h0,
                         cfg, ppg, platform, bool(interpret))
    out = _unpad_channels(jnp.swapaxes(out[:, :time], 1, 2), 1, groups, d)
    h_final = _unpad_channels(jnp.swapaxes(h_final, 1, 2), 1, groups, d)[:, :, :n]
    return out, h_final
