"""Mamba: the selective state-space block.

Paper: A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (COLM 2024;
arXiv:2312.00752), Section 3.4 (the block) and Section 3.6 (parameterisation and initialisation).
With E = expand · d_model channels, N = d_state, R = dt_rank, for each time step t::

    [x_t, z_t]      = W_in u_t                                   x_t, z_t ∈ R^E
    x_t             = SiLU(Σ_k w_k ⊙ x_{t-K+1+k} + b_conv)         causal depthwise conv, K = d_conv
    [δ_t, B_t, C_t] = W_x x_t                                    δ_t ∈ R^R, B_t, C_t ∈ R^N
    Δ_t             = softplus(W_Δ δ_t + b_Δ)                     Δ_t ∈ R^E (low-rank, rank R)
    h_t             = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_tᵀ       h_t ∈ R^{E×N}, A = -exp(A_log)
    y_t             = h_t C_t + D ⊙ x_t
    out_t           = W_out (y_t ⊙ SiLU(z_t))

State: ``(conv_window [B, K-1, E], h [B, E, N])``, both float32; the conv window (the last K-1
inputs of the convolution) is part of the recurrent state, so ``step`` keeps O(1) memory and
continues a sequence exactly where ``apply`` stopped.

Initialisation (the paper's Section 3.6 and the reference implementation, mamba_ssm's
``Mamba``): ``A_log[e, n] = log(n + 1)`` (S4D-real, A = -(n+1)); ``D = 1``; the Δ bias is the
inverse softplus of Δ drawn log-uniformly in [dt_min, dt_max] (floored at dt_init_floor), so that
Δ starts in that range; ``W_Δ`` uniform in ±dt_scale/√R; the convolution uniform in ±1/√K (torch's
default for a depthwise Conv1d).

Engines: ``zoo.ops.conv1d`` for the convolution and ``zoo.ops.selective`` (selective_scan in every
mode, selective_state_update for ``step``).

What differs from the paper and mamba_ssm, and why:

* Projections are stored input-major (``x @ w``), mamba_ssm's ``nn.Linear`` weights transposed, and
  initialised LeCun-normal rather than torch's uniform default (the same variance scale, as
  elsewhere in zoo). The conv kernel is stored [K, E] (torch's [E, 1, K] transposed).
* The Δ projection ``W_Δ δ`` and everything after it in the discretisation run in float32 whatever
  the compute dtype: a bfloat16 Δ would round exp(Δ A) by up to |Δ A| · 2^-8, far more than the
  percent the other projections cost.
* ``reset`` (packed sequences) drops both the conv window and h before step t; ``reverse=True`` runs
  the whole block backwards in time. Neither is in the paper.
* mamba_ssm's default dt_rank is "auto" = ceil(d_model / 16); here ``dt_rank=None`` means the same.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import cast, check_chunk_size, chunk_kwargs, dense_init
from zoo.ops import conv1d, selective
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    d_model: int = 8
    d_state: int = 4
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None          # None: ceil(d_model / 16), mamba_ssm's "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False                  # biases of the in and out projections
    chunk_size: int = 64                # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("mamba", self.chunk_size)
        for name in ("d_model", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"mamba: {name} must be a positive int, got {value!r}")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank <= 0):
            raise ValueError(f"mamba: dt_rank must be a positive int or None (auto), got {self.dt_rank!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"mamba: need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                             f"dt_max={self.dt_max}")
        if not self.dt_init_floor > 0 or not self.dt_scale > 0:
            raise ValueError(f"mamba: dt_init_floor and dt_scale must be positive, got {self.dt_init_floor}, "
                             f"{self.dt_scale}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


def state_size(config: MambaConfig) -> int:
    return (config.d_conv - 1) * config.d_inner + config.d_inner * config.d_state


def inverse_softplus(x: jax.Array) -> jax.Array:
    """y with softplus(y) = x, for x > 0: x + log(1 - exp(-x)), without cancellation for small x."""
    return x + jnp.log(-jnp.expm1(-x))


def init_params(key: jax.Array, config: MambaConfig, d_in: int) -> dict:
    e, n, r, k = config.d_inner, config.d_state, config.rank, config.d_conv
    keys = jax.random.split(key, 7)
    log_dt = jax.random.uniform(keys[0], (e,), jnp.float32, math.log(config.dt_min), math.log(config.dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), config.dt_init_floor)
    conv_bound = 1.0 / math.sqrt(k)
    dt_bound = config.dt_scale / math.sqrt(r)
    params = {
        "w_in": dense_init(keys[1], d_in, 2 * e),
        "conv_kernel": jax.random.uniform(keys[2], (k, e), jnp.float32, -conv_bound, conv_bound),
        "w_x": dense_init(keys[3], e, r + 2 * n),
        "w_dt": jax.random.uniform(keys[4], (r, e), jnp.float32, -dt_bound, dt_bound),
        "dt_bias": inverse_softplus(dt),
        "a_log": jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (e, n))),
        "d_skip": jnp.ones((e,), jnp.float32),
        "w_out": dense_init(keys[5], e, config.d_model),
    }
    if config.conv_bias:
        params["conv_bias"] = jax.random.uniform(keys[6], (e,), jnp.float32, -conv_bound, conv_bound)
    if config.bias:
        params["b_in"] = jnp.zeros((2 * e,), jnp.float32)
        params["b_out"] = jnp.zeros((config.d_model,), jnp.float32)
    return params


def _linear(x, params, w: str, b: str):
    y = x @ params[w].astype(x.dtype)
    return y + params[b].astype(x.dtype) if b in params else y


def _ssm_inputs(params, x, config: MambaConfig):
    """(Δ before softplus in float32, B, C) from the conv output x [..., E]."""
    n, r = config.d_state, config.rank
    dbc = x @ params["w_x"].astype(x.dtype)
    delta = dbc[..., :r].astype(jnp.float32) @ params["w_dt"]
    return delta, dbc[..., r:r + n], dbc[..., r + n:]


@register("mamba", config=MambaConfig,
          paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces", engine="selective",
          modes=selective.MODES, state_size=state_size)
def build(config: MambaConfig):
    e, n, k = config.d_inner, config.d_state, config.d_conv

    def init(key, d_in):
        return init_params(key, config, d_in)

    def initial_state(params, batch):
        return (jnp.zeros((batch, k - 1, e), jnp.float32), jnp.zeros((batch, e, n), jnp.float32))

    def step(params, state, u_t):
        window, h = state
        x, z = jnp.split(_linear(u_t, params, "w_in", "b_in"), 2, axis=-1)
        conv_bias = cast(params.get("conv_bias"), x.dtype)
        window, x = conv1d.step(params["conv_kernel"].astype(x.dtype), conv_bias, window, x)
        x = jax.nn.silu(x)
        delta, b_t, c_t = _ssm_inputs(params, x, config)
        h, y = selective.selective_state_update(h, x, delta, -jnp.exp(params["a_log"]), b_t, c_t,
                                                D=params["d_skip"], z=z, dt_bias=params["dt_bias"],
                                                dt_softplus=True)
        return (window, h), _linear(y, params, "w_out", "b_out")

    def apply(params, us, state, reset, mode, reverse):
        window, h = state
        x, z = jnp.split(_linear(us, params, "w_in", "b_in"), 2, axis=-1)
        conv_bias = cast(params.get("conv_bias"), x.dtype)
        x, window = conv1d.apply(x, params["conv_kernel"].astype(x.dtype), conv_bias, initial_state=window,
                                 reset=reset, reverse=reverse)
        x = jax.nn.silu(x)
        delta, b, c = _ssm_inputs(params, x, config)
        channels_first = lambda v: jnp.swapaxes(v, 1, 2)              # [B, T, .] -> mamba's [B, ., L]
        y, h = selective.selective_scan(
            channels_first(x), channels_first(delta), -jnp.exp(params["a_log"]), channels_first(b),
            channels_first(c), D=params["d_skip"], z=channels_first(z), delta_bias=params["dt_bias"],
            delta_softplus=True, initial_state=h, reset=reset, reverse=reverse, return_final_state=True,
            mode=mode, **chunk_kwargs(mode, config.chunk_size))
        return _linear(channels_first(y), params, "w_out", "b_out"), (window, h)

    return make_recurrence("mamba", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_in"].shape[0], modes=selective.MODES,
                           default_d_in=config.d_model)
