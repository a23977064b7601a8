"""Pieces shared by the matrix-memory models (linear attention, RetNet, GLA, HGRN2, GateLoop, mLSTM,
RWKV-6, Lightning, DeltaNet): head reshapes, per-head normalisation, running a ``zoo.ops.matrix_ops``
op for one token so that ``step`` and ``apply`` share one code path, and FLA's q/k/v projection with
its short convolution (DeltaNet, Gated DeltaNet, GLA, RetNet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.models._common import chunk_kwargs
from zoo.ops import conv1d


def check_positive_int(model: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")


def check_positive_ints(model: str, config, names) -> None:
    """Config check: each named field of ``config`` is a positive int."""
    for name in names:
        check_positive_int(model, name, getattr(config, name))


def check_positive_float(model: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{model}: {name} must be a positive number, got {value!r}")


def check_bools(model: str, config, names) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{model}: {name} must be a bool, got {getattr(config, name)!r}")


def project(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """``x @ w (+ b)`` in x's dtype (the compute dtype)."""
    out = x @ w.astype(x.dtype)
    return out if b is None else out + b.astype(x.dtype)


def engine_mode(mode: str) -> str:
    """"auto" is the chunked form with the config's chunk size (the engine's own default is larger)."""
    return "chunked" if mode == "auto" else mode


class ExpandedHeadWidths:
    """Mixed into the configs that size keys and values as ``expand_k * d_model`` and
    ``expand_v * d_model`` split over ``n_heads`` (GLA, GateLoop)."""

    @property
    def key_dim(self) -> int:
        return int(self.d_model * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.d_model * self.expand_v)

    def check_head_widths(self, model: str) -> None:
        for name, width in (("expand_k", self.key_dim), ("expand_v", self.value_dim)):
            if width <= 0 or width % self.n_heads:
                raise ValueError(f"{model}: int({name} * d_model) = {width} must be a positive multiple of "
                                 f"n_heads = {self.n_heads}")


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[..., H * D] -> [..., H, D]."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[..., H, D] -> [..., H * D]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def head_norm(x: jax.Array, scale: jax.Array, *, kind: str = "rms", eps: float = 1e-5,
              bias: jax.Array | None = None) -> jax.Array:
    """Normalise each head on its own over its last axis, then scale (and shift) per channel.

    x [..., H, D]; scale (and bias) [H * D]. ``kind="rms"`` is RMSNorm, ``"group"`` is GroupNorm
    with one group per head (RetNet, GLA, TransNormer), i.e. LayerNorm per head. Statistics are
    float32 (float64 for float64 x) whatever x's dtype; the result has x's dtype.
    """
    dtype = x.dtype
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(acc)
    if kind == "group":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    elif kind != "rms":
        raise ValueError(f"head_norm: kind must be 'rms' or 'group', got {kind!r}")
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    out = merge_heads(x32) * scale.astype(acc)
    if bias is not None:
        out = out + bias.astype(acc)
    return out.astype(dtype)


def run_op(op, *args, state, reset, mode: str, reverse: bool, chunk_size: int, **kwargs):
    """``op(*args, initial_state=state, output_final_state=True, ...)`` over a whole sequence. "auto"
    is the chunked form with the config's ``chunk_size`` (passed only in chunked mode). Returns
    (o, final_state)."""
    mode = engine_mode(mode)
    return op(*args, initial_state=state, output_final_state=True, reset=reset, reverse=reverse, mode=mode,
              **chunk_kwargs(mode, chunk_size), **kwargs)


def run_op_one_token(op, *args, state, **kwargs):
    """The same op for one token: every positional argument is per token, [B, ...] without a time
    axis; constants (RWKV-6's u, Lightning's layer index) go by keyword. The op runs its sequential
    mode over T = 1, which is exactly one step of the recurrence."""
    with_time = [a[:, None] for a in args]
    o, state = op(*with_time, initial_state=state, output_final_state=True, mode="sequential", **kwargs)
    return o[:, 0], state


# --------------------------------------------------------------------------------------------
# FLA's q/k/v projection and short convolution.


def qkv_projection(params: dict, x: jax.Array) -> jax.Array:
    """[W_q x, W_k x, W_v x] concatenated, [..., 2HK + HV], in x's dtype."""
    return jnp.concatenate([project(x, params[w]) for w in ("w_q", "w_k", "w_v")], axis=-1)


def short_conv_step(params: dict, window: jax.Array, qkv: jax.Array):
    """FLA's ShortConvolution for one token: ``(window, SiLU(conv(qkv)))`` from the last C − 1 tokens'
    projections ``window`` [B, C − 1, W] and this token's ``qkv`` [B, W]."""
    window, qkv = conv1d.step(params["conv_kernel"], params.get("conv_bias"), window, qkv)
    return window, jax.nn.silu(qkv)


def short_conv_apply(params: dict, qkv: jax.Array, window: jax.Array, reset, reverse: bool):
    """FLA's ShortConvolution over [B, T, W] projections: ``(SiLU(conv(qkv)), final window)``."""
    qkv, window = conv1d.apply(qkv, params["conv_kernel"], params.get("conv_bias"), initial_state=window,
                               reset=reset, reverse=reverse)
    return jax.nn.silu(qkv), window


def mixer_state_size(config, key_dim: int, value_dim: int) -> int:
    """Floats per sequence of the mixer's state: the short convolution's window of the last C − 1
    projections (if it has one) and each head's K x V memory."""
    conv = (config.conv_size - 1) * (2 * key_dim + value_dim) if config.use_short_conv else 0
    return conv + key_dim * value_dim // config.n_heads
