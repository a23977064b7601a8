"""HGRN: the Hierarchically Gated Recurrent Neural Network's token mixer (HGRU), real form.

Paper: Z. Qin, S. Yang, Y. Zhong, "Hierarchically Gated Recurrent Neural Network for Sequence
Modeling" (NeurIPS 2023, arXiv 2311.04823). The layer follows FLA's ``HGRNAttention``
(fla-org/flash-linear-attention, ``fla/layers/hgrn.py``), the form its kernels and checkpoints use.
With x_t ∈ R^{d_in}, E = expand_ratio · d_model channels and the lower bound γ ∈ [0, 1)::

    i_t = W_i x_t,   f̃_t = W_f x_t,   z_t = W_g x_t                 no biases
    f_t = γ + (1 - γ) σ(f̃_t)                                          forget gate, in [γ, 1)
    h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ SiLU(i_t)                       zoo.ops.hgrn (diagonal engine)
    o_t = W_o (RMSNorm(h_t) ⊙ w ⊙ SiLU(z_t))                          w: the norm's scale (init 1)

The forget gate is formed in log space and ``1 - f = (1 - γ) σ(-f̃)`` without a subtraction, both
exact to float32 rounding however saturated the gate (see ``forget_gate``). FLA computes the same
quantities as ``logaddexp(log γ, log(1 - γ) + logsigmoid(f̃))`` and ``swiglu(i, 1 - exp(log f))``,
which agree with these to rounding except near f = 1, where FLA's lose their relative precision.

The hierarchy (the paper's "lower bound increases monotonically when moving up layers") is a
property of the stack, not of one layer: give each layer its own ``lower_bound``, increasing with
depth and 0 for the first, e.g.
``zoo.stack(*(zoo.residual(zoo.get("hgrn", lower_bound=l / n)) for l in range(n)))``.
The paper and FLA learn the bounds instead: a parameter Γ [L, D] per model, with
``γ = cumsum(softmax(Γ, axis=layers)) - softmax(Γ)[0]`` (FLA's ``HGRNModel``), so γ_0 = 0 and the bounds
rise with depth. A learned, per-channel bound needs a parameter shared across the layers of a stack,
which a single registered layer cannot hold; here γ is a fixed float per layer.

Differences, and why:

* From the paper (equations as summarised in PAPERS.md §HGRN): the paper's HGRU is complex,
  ``h_t = f_t e^{iθ} ⊙ h_{t-1} + (1 - f_t) ⊙ c_t`` with output ``W_o(LN(Re h_t) ⊙ σ(W_g x_t))``. FLA, and
  this file, use the real recurrence (θ = 0), RMSNorm for LayerNorm and SiLU for the output gate's σ.
  The authors' own code (OpenNLPLab's hgru-pytorch ``HgruRealV6``) is also real, with LayerNorm, a SiLU
  gate and biases on every projection.
* From FLA: its optional short convolutions on i and f (``use_short_conv``, off by default) are not
  offered. Projections are LeCun-normal (zoo's default) rather than FLA's normal(0, 0.02).
  ``norm_eps`` defaults to the layer's 1e-5 (FLA's ``HGRNConfig`` passes 1e-6).
* Dtypes: the projections run in the compute dtype (the input's); the gates, the scan input, the
  recurrence and the norm in float32; the output projection's operands in the compute dtype. The
  state is float32.

State: h [B, E] float32. Engine: diagonal (through ``zoo.ops.hgrn``), in its modes ``"sequential"``,
``"associative"`` and ``"chunked"``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, chunk_kwargs, dense_init
from zoo.models.mamba2 import gated_rms_norm
from zoo.ops.hgrn import MODES, hgrn
from zoo.ops.hgrn import step as hgrn_step
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class HGRNConfig:
    d_model: int = 16
    expand_ratio: int = 1        # E = expand_ratio * d_model recurrent channels (FLA's expand_ratio)
    lower_bound: float = 0.0     # γ: the forget gate lies in [γ, 1); raise it with depth in a stack
    norm_eps: float = 1e-5
    chunk_size: int = 64         # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("hgrn", self.chunk_size)
        for name in ("d_model", "expand_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"hgrn: {name} must be a positive int, got {value!r}")
        gamma = self.lower_bound
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
            raise ValueError(f"hgrn: lower_bound must be a float in [0, 1), got {gamma!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"hgrn: norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def d_inner(self) -> int:
        return self.expand_ratio * self.d_model


def forget_gate(f_pre: jax.Array, lower_bound: float):
    """(log f, 1 - f) for f = γ + (1 - γ) σ(f̃), both float32 and exact to rounding at any f̃.

    ``1 - f = (1 - γ) σ(-f̃)`` needs no subtraction. For log f, the form ``logaddexp(log γ, log(1 - γ)
    + log σ(f̃))`` (FLA's) rounds to ±ulp(log(1 - γ)) when f is near 1 (f̃ >> 0), where log f is
    about -(1 - γ) e^{-f̃}: it can even come out positive, a decay above 1. There
    ``log σ(f̃) + log1p(γ e^{-f̃})`` is exact (e^{-f̃} <= 1); below f̃ = 0, where that form would
    overflow, f <= (1 + γ) / 2 and the logaddexp form is exact enough.
    """
    v = f_pre.astype(jnp.promote_types(f_pre.dtype, jnp.float32))
    one_minus_f = (1.0 - lower_bound) * jax.nn.sigmoid(-v)
    if lower_bound == 0.0:
        return jax.nn.log_sigmoid(v), one_minus_f
    near_one = jax.nn.log_sigmoid(v) + jnp.log1p(lower_bound * jnp.exp(-jnp.maximum(v, 0.0)))
    below = jnp.logaddexp(math.log(lower_bound), math.log1p(-lower_bound) + jax.nn.log_sigmoid(v))
    return jnp.where(v >= 0, near_one, below), one_minus_f


def init(key: jax.Array, d_in: int, config: HGRNConfig) -> dict:
    k_i, k_f, k_g, k_o = jax.random.split(key, 4)
    e = config.d_inner
    return {
        "w_i": dense_init(k_i, d_in, e),
        "w_f": dense_init(k_f, d_in, e),
        "w_g": dense_init(k_g, d_in, e),
        "norm_scale": jnp.ones((e,), jnp.float32),
        "w_o": dense_init(k_o, e, config.d_model),
    }


def recurrence_inputs(params: dict, x: jax.Array, lower_bound: float):
    """(scan input (1 - f) ⊙ SiLU(i), log f, output-gate preactivation z), the first two float32."""
    dtype = x.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    i = (x @ params["w_i"].astype(dtype)).astype(acc)
    log_f, one_minus_f = forget_gate(x @ params["w_f"].astype(dtype), lower_bound)
    z = x @ params["w_g"].astype(dtype)
    return jax.nn.silu(i) * one_minus_f, log_f, z


def read_out(params: dict, h: jax.Array, z: jax.Array, eps: float, dtype) -> jax.Array:
    """W_o (RMSNorm(h) ⊙ w ⊙ SiLU(z)): the norm in float32, the projection in ``dtype``."""
    gated = gated_rms_norm(h, z, params["norm_scale"], groups=1, eps=eps, norm_before_gate=True)
    return (gated.astype(dtype) @ params["w_o"].astype(dtype)).astype(dtype)


@register("hgrn", config=HGRNConfig,
          paper="Hierarchically Gated Recurrent Neural Network for Sequence Modeling",
          engine="diagonal", modes=MODES, state_size=lambda c: c.d_inner)
def build(config: HGRNConfig):
    gamma = float(config.lower_bound)

    def initial_state(params, batch):
        return jnp.zeros((batch, config.d_inner), jnp.float32)

    def step(params, h, x_t):
        b, log_f, z = recurrence_inputs(params, x_t, gamma)
        h_new = hgrn_step(b, log_f, h)
        return h_new, read_out(params, h_new, z, config.norm_eps, x_t.dtype)

    def apply(params, xs, h, reset, mode, reverse):
        b, log_f, z = recurrence_inputs(params, xs, gamma)
        hs, final = hgrn(b, log_f, initial_state=h, output_final_state=True, reset=reset, reverse=reverse,
                         mode=mode, **chunk_kwargs(mode, config.chunk_size))
        return read_out(params, hs, z, config.norm_eps, xs.dtype), final

    return make_recurrence("hgrn", init=lambda key, d_in: init(key, d_in, config),
                           initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_i"].shape[0], modes=MODES, default_d_in=config.d_model)
