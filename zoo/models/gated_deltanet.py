"""Gated DeltaNet: the delta rule with Mamba-2's data-dependent decay.

Paper: S. Yang, J. Kautz, A. Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025, arXiv:2412.06464). The layer follows FLA's ``GatedDeltaNet``
(fla-org/flash-linear-attention, ``fla/layers/gated_deltanet.py``) with its defaults
(``use_gate=True``, ``use_short_conv=True``). With H heads of key width K = d_head (FLA's
``head_dim``) and value width V = expand_v · d_head::

    [q̃, k̃, ṽ]_t = SiLU(conv1d_C([W_q x, W_k x, W_v x])_t)            depthwise causal conv, C = conv_size
    q_t = q̃_t / ‖q̃_t‖,  k_t = k̃_t / ‖k̃_t‖,  v_t = ṽ_t               per head (FLA's l2norm, eps 1e-6)
    β_t = sigmoid(W_β x_t)                                             one per head (×2 with allow_neg_eigval)
    g_t = −exp(A_log) ⊙ softplus(W_a x_t + dt_bias)                    log decay, one per head
    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,  o_t = S_tᵀ q_t / √K     (zoo.ops.delta)
    y_t = W_o (RMSNorm_head(o_t) ⊙ w ⊙ SiLU(W_g x_t))                  FLA's FusedRMSNormGated, w [V]

``use_gate=False`` drops the output gate (y_t = W_o RMSNorm_head(o_t) ⊙ w); ``use_short_conv=False``
replaces the convolutions by a plain SiLU.

Initialisation as FLA: A uniform in (0, 16] (``a_init_range``, stored as its log), ``dt_bias`` the
inverse softplus of Δ log-uniform in [0.001, 0.1] floored at 1e-4 (Mamba-2's), the short convolution
uniform(±1/√C), norm scale 1. Projections are LeCun-normal (zoo's default) instead of FLA's
normal(0, 0.02).

``a_init_range`` matters for recall. A head keeps exp(−A·Δ) of its memory per token, from the start:
0.33 at A = 11, Δ = 0.1. On MQAR (``experiments/results/mqar.md``: 2 layers, 2 heads, 1500 steps, two
seeds) FLA's (0, 16] gave mean held-out accuracy 0.50 at d_model 32 and 0.54 at 64 (at each width one
seed learned recall and one stayed at chance); ``a_init_range=(0, 1)``, nothing else changed, gave 0.86
and 1.00.

State, modes, ``reset``/``reverse``, dtypes and layout differences: as ``zoo/models/deltanet.py``,
whose shared pieces this file uses; the decay g is computed in float32. Not offered: grouped value
heads (FLA's ``num_v_heads``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import (
    check_bools,
    check_positive_float,
    check_positive_ints,
    mixer_state_size,
    project,
)
from zoo.models.deltanet import MODES, delta_recurrence, init_mixer
from zoo.models.mamba2 import dt_bias_init
from zoo.ops import delta_ops
from zoo.registry import register

PAPER = "Gated Delta Networks: Improving Mamba2 with Delta Rule"


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    d_model: int = 16
    n_heads: int = 2
    d_head: int = 8                  # K (FLA's head_dim, default 256)
    expand_v: float = 2.0            # V = expand_v * d_head (FLA's default)
    use_gate: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False
    a_init_range: tuple[float, float] = (0.0, 16.0)   # A uniform in (low, high] (FLA: (0, 16])
    norm_eps: float = 1e-5
    chunk_size: int = 4              # steps per chunk in mode="chunked" (FLA's kernels use 64)

    def __post_init__(self):
        check_chunk_size("gated_deltanet", self.chunk_size)
        check_a_init_range(self.a_init_range)
        check_positive_ints("gated_deltanet", self, ("d_model", "n_heads", "d_head", "conv_size"))
        for name in ("expand_v", "norm_eps"):
            check_positive_float("gated_deltanet", name, getattr(self, name))
        check_bools("gated_deltanet", self, ("use_gate", "use_short_conv", "conv_bias", "allow_neg_eigval"))
        width = self.d_head * self.expand_v
        if not math.isclose(width, self.head_v_dim, rel_tol=1e-9) or self.head_v_dim < 1:
            raise ValueError(f"gated_deltanet: expand_v * d_head = {width} must be a positive integer "
                             f"(d_head = {self.d_head}, expand_v = {self.expand_v})")

    @property
    def head_v_dim(self) -> int:
        return int(round(self.d_head * self.expand_v))

    @property
    def key_dim(self) -> int:
        return self.n_heads * self.d_head

    @property
    def value_dim(self) -> int:
        return self.n_heads * self.head_v_dim


def init(key: jax.Array, d_in: int, config: GatedDeltaNetConfig) -> dict:
    k_mixer, k_beta, k_a, k_alog, k_dt = jax.random.split(key, 5)
    heads = config.n_heads
    params = init_mixer(k_mixer, d_in, config, config.key_dim, config.value_dim)
    low, high = config.a_init_range
    # high - (high - low) u for u in [0, 1): uniform in (low, high], so that A = 0 (log A = -inf)
    # cannot be drawn at low = 0.
    a = high - (high - low) * jax.random.uniform(k_alog, (heads,), jnp.float32)
    params.update({
        "w_b": dense_init(k_beta, d_in, heads),
        "w_a": dense_init(k_a, d_in, heads),
        "a_log": jnp.log(a),
        "dt_bias": dt_bias_init(k_dt, heads, 0.001, 0.1, 1e-4),
    })
    return params


def check_a_init_range(a_init_range) -> None:
    if (not isinstance(a_init_range, (tuple, list)) or len(a_init_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a_init_range)):
        raise ValueError(f"gated_deltanet: a_init_range must be a pair of numbers (low, high), got "
                         f"{a_init_range!r}")
    low, high = a_init_range
    if not 0 <= low <= high or high <= 0:
        raise ValueError(f"gated_deltanet: a_init_range must satisfy 0 <= low <= high and high > 0 (A is "
                         f"drawn from (low, high]), got {tuple(a_init_range)}")


def gates(params: dict, x: jax.Array, config: GatedDeltaNetConfig):
    """(g, β) [..., H] in float32: g = −exp(A_log) softplus(W_a x + dt_bias), β = sigmoid(W_β x)."""
    dt = jax.nn.softplus(project(x, params["w_a"]).astype(jnp.float32) + params["dt_bias"])
    g = -jnp.exp(params["a_log"]) * dt
    beta = jax.nn.sigmoid(project(x, params["w_b"]).astype(jnp.float32))
    return g, (2.0 * beta if config.allow_neg_eigval else beta)


def _state_size(c: GatedDeltaNetConfig) -> int:
    return mixer_state_size(c, c.key_dim, c.value_dim)


@register("gated_deltanet", config=GatedDeltaNetConfig, paper=PAPER, engine="delta", modes=MODES,
          state_size=_state_size)
def build(config: GatedDeltaNetConfig):
    return delta_recurrence("gated_deltanet", config, op=delta_ops.gated_delta_rule,
                            init=lambda key, d_in: init(key, d_in, config),
                            gates=lambda params, x: gates(params, x, config),
                            key_dim=config.key_dim, value_dim=config.value_dim)
