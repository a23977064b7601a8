"""Mamba-2: the multi-head SSD block.

Paper: T. Dao, A. Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (ICML 2024). The block follows ``Mamba2`` of the authors'
``mamba_ssm`` package (``modules/mamba2.py``), with D_in = d_in, E = expand · d_model inner
channels, H = E / d_head heads of P = d_head channels, G = n_groups groups of B, C (N = d_state)::

    [z, x̃, B̃, C̃, dt] = u W_in                        z, x̃ ∈ R^E, B̃, C̃ ∈ R^{G N}, dt ∈ R^H
    [x, B, C] = SiLU(conv1d_K([x̃, B̃, C̃]))            depthwise causal convolution, K = d_conv
    Δ_t = softplus(dt_t + dt_bias),  A = -exp(A_log)
    S_t = exp(Δ_t A_h) S_{t-1} + Δ_t x_t B_tᵀ,  y_t = S_t C_t + D_h x_t       per head (zoo.ops.ssd)
    o_t = RMSNorm_G(y_t ⊙ SiLU(z_t)) W_out              gated RMSNorm over each of G groups of E/G

Initialisation as in ``mamba_ssm``: ``A_h`` uniform in ``a_init_range`` = [1, 16] (stored as its
log), Δ's bias the inverse softplus of a log-uniform draw in [dt_min, dt_max] (floored at
dt_init_floor), ``D = 1``, norm scale 1, convolution taps and bias uniform(±1/sqrt(K)) (torch's
``Conv1d`` default). The projections are LeCun-normal (zoo's default) instead of torch's uniform.

State: ``(conv_window [B, K-1, E + 2GN], ssm_state [B, H, P, N])``, both float32: the last K-1
convolution inputs (``zoo.ops.conv1d``) and the SSD state. ``step`` therefore decodes in O(1)
memory; ``apply`` runs the convolution over the whole sequence and the SSD in its chunked
(``mode="chunked"``, the paper's algorithm; also ``"auto"``) or sequential form. ``reset`` drops
both parts of the state; ``reverse`` runs time backwards through both.

Differences from ``mamba_ssm``: params are stored input-major (``u @ w_in``, the torch weights
transposed; the convolution as [K, C]); the d_ssm < E "gated MLP" split, ``D_has_hdim``, ``dt_limit``
and the non-normalised (``rmsnorm=False``) variant are not offered; in bfloat16 compute Δ, A and
the SSD's accumulation stay float32 (as mamba_ssm's kernels do) and the norm's statistics too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.ops import conv1d
from zoo.ops.ssd_scan import MODES, ssd
from zoo.ops.ssd_scan import step as ssd_step
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2's block; Hydra's config extends it (same fields, other defaults)."""

    name: ClassVar[str] = "mamba2"
    d_model: int = 16
    d_state: int = 8            # N
    d_conv: int = 4             # K, taps of the causal convolution
    expand: int = 2             # E = expand * d_model
    d_head: int = 8             # P; H = E / P heads
    n_groups: int = 1           # G groups of (B, C), each shared by H / G heads
    chunk_size: int = 8         # SSD chunk in mode="chunked" (mamba_ssm uses 256 for long sequences)
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    norm_eps: float = 1e-5
    conv_bias: bool = True
    bias: bool = False          # biases of the input and output projections

    def __post_init__(self):
        check_ssd_config(self.name, self)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.d_head


def check_ssd_config(model: str, c) -> None:
    """The config checks Mamba-2 and Hydra share (their configs have the same fields)."""
    check_chunk_size(model, c.chunk_size)
    for name in ("d_model", "d_state", "d_conv", "expand", "d_head", "n_groups"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")
    if c.d_inner % c.d_head:
        raise ValueError(f"{model}: expand * d_model = {c.d_inner} must be a multiple of d_head = {c.d_head}")
    if c.n_heads % c.n_groups:
        raise ValueError(f"{model}: the {c.n_heads} heads (expand * d_model / d_head) must be a multiple of "
                         f"n_groups = {c.n_groups}")
    lo, hi = c.a_init_range
    if not 0 < lo <= hi:
        raise ValueError(f"{model}: a_init_range must satisfy 0 < low <= high, got {c.a_init_range}")
    if not 0 < c.dt_min <= c.dt_max:
        raise ValueError(f"{model}: need 0 < dt_min <= dt_max, got dt_min={c.dt_min}, dt_max={c.dt_max}")


# --------------------------------------------------------------------------------------------
# Pieces shared with Hydra.


def dt_bias_init(key: jax.Array, heads: int, dt_min: float, dt_max: float, floor: float) -> jax.Array:
    """softplus⁻¹(Δ) for Δ log-uniform in [dt_min, dt_max] (floored), so that Δ starts there."""
    u = jax.random.uniform(key, (heads,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def conv_init(key: jax.Array, taps: int, channels: int, with_bias: bool) -> dict:
    """Depthwise taps [K, C] (and bias [C]) uniform(±1/sqrt(K)): torch Conv1d's default, fan-in K."""
    k_w, k_b = jax.random.split(key)
    bound = 1.0 / math.sqrt(taps)
    params = {"conv_kernel": jax.random.uniform(k_w, (taps, channels), jnp.float32, -bound, bound)}
    if with_bias:
        params["conv_bias"] = jax.random.uniform(k_b, (channels,), jnp.float32, -bound, bound)
    return params


def gated_rms_norm(y, z, scale, *, groups: int, eps: float, norm_before_gate: bool):
    """mamba_ssm's ``RMSNormGated``: ``norm(y ⊙ silu(z))`` (or ``norm(y) ⊙ silu(z)``), the RMS taken
    over each of ``groups`` equal slices of the last axis. Statistics in float32; y's dtype out."""
    y32, gate = y.astype(jnp.float32), jax.nn.silu(z.astype(jnp.float32))
    if not norm_before_gate:
        y32 = y32 * gate
    sliced = y32.reshape(*y32.shape[:-1], groups, -1)
    normed = sliced * jax.lax.rsqrt(jnp.mean(sliced * sliced, axis=-1, keepdims=True) + eps)
    out = normed.reshape(y32.shape) * scale.astype(jnp.float32)
    if norm_before_gate:
        out = out * gate
    return out.astype(y.dtype)


def projection(params: dict, name: str, u):
    """``u @ w_name (+ b_name)`` in u's dtype."""
    out = u @ params[f"w_{name}"].astype(u.dtype)
    if f"b_{name}" in params:
        out = out + params[f"b_{name}"].astype(u.dtype)
    return out


def decay_rate(params: dict) -> jax.Array:
    """A = -exp(A_log) [H], float32 whatever the compute dtype."""
    return -jnp.exp(params["a_log"].astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# The block.


def _state_size(c: Mamba2Config) -> int:
    return (c.d_conv - 1) * (c.d_inner + 2 * c.n_groups * c.d_state) + c.d_inner * c.d_state


@register("mamba2", config=Mamba2Config,
          paper="Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured "
                "State Space Duality",
          engine="ssd", modes=MODES, state_size=_state_size)
def build(config: Mamba2Config):
    e, n, g = config.d_inner, config.d_state, config.n_groups
    heads, p, taps = config.n_heads, config.d_head, config.d_conv
    conv_width = e + 2 * g * n
    splits = (e, e + conv_width)                 # [z | x B C | dt]

    def init(key, d_in):
        k_in, k_conv, k_dt, k_a, k_out = jax.random.split(key, 5)
        params = {
            "w_in": dense_init(k_in, d_in, 2 * e + 2 * g * n + heads),
            **conv_init(k_conv, taps, conv_width, config.conv_bias),
            "dt_bias": dt_bias_init(k_dt, heads, config.dt_min, config.dt_max, config.dt_init_floor),
            "a_log": jnp.log(jax.random.uniform(k_a, (heads,), jnp.float32, *config.a_init_range)),
            "d_skip": jnp.ones((heads,), jnp.float32),
            "norm_scale": jnp.ones((e,), jnp.float32),
            "w_out": dense_init(k_out, e, config.d_model),
        }
        if config.bias:
            params["b_in"] = jnp.zeros((2 * e + 2 * g * n + heads,), jnp.float32)
            params["b_out"] = jnp.zeros((config.d_model,), jnp.float32)
        return params

    def split_heads(xbc):
        """SiLU'd conv output [..., E + 2GN] -> x [..., H, P], B and C [..., G, N]."""
        x, b, c = jnp.split(xbc, (e, e + g * n), axis=-1)
        lead = xbc.shape[:-1]
        return x.reshape(*lead, heads, p), b.reshape(*lead, g, n), c.reshape(*lead, g, n)

    def readout(params, y, z):
        y = gated_rms_norm(y.reshape(*z.shape), z, params["norm_scale"], groups=g, eps=config.norm_eps,
                           norm_before_gate=False)
        return projection(params, "out", y)

    def ssd_kwargs(params):
        return {"D": params["d_skip"], "dt_bias": params["dt_bias"], "dt_softplus": True}

    def initial_state(params, batch):
        return (jnp.zeros((batch, taps - 1, conv_width), jnp.float32),
                jnp.zeros((batch, heads, p, n), jnp.float32))

    def step(params, state, u_t):
        window, h = state
        z, xbc, dt = jnp.split(projection(params, "in", u_t), splits, axis=-1)
        window, xbc = conv1d.step(params["conv_kernel"], params.get("conv_bias"), window, xbc)
        x, b, c = split_heads(jax.nn.silu(xbc))
        h, y = ssd_step(h, x, dt, decay_rate(params), b, c, **ssd_kwargs(params))
        return (window, h), readout(params, y, z)

    def apply(params, us, state, reset, mode, reverse):
        window, h = state
        z, xbc, dt = jnp.split(projection(params, "in", us), splits, axis=-1)
        xbc, window = conv1d.apply(xbc, params["conv_kernel"], params.get("conv_bias"), initial_state=window,
                                   reset=reset, reverse=reverse)
        x, b, c = split_heads(jax.nn.silu(xbc))
        y, h = ssd(x, dt, decay_rate(params), b, c, config.chunk_size, initial_states=h,
                   return_final_states=True, reset=reset, reverse=reverse, mode=mode, **ssd_kwargs(params))
        return readout(params, y, z), (window, h)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("mamba2", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_in"].shape[0], modes=MODES,
                           default_d_in=config.d_model)
