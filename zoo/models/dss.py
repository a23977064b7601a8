"""DSS: diagonal state spaces (DSS-exp).

Paper: A. Gupta, A. Gu, J. Berant, "Diagonal State Spaces are as Effective as Structured State
Spaces" (NeurIPS 2022).

Each of the H = d_model channels is the convolution with the kernel (the paper's DSS-exp,
Proposition 1 and Section 3)::

    Λ = −exp(a_re_log) + i a_im ∈ C^N       (shared by all channels; Re Λ < 0 as DSS-exp requires)
    K_{h,l} = Re(Σ_n W̃_{h,n} exp(Λ_n Δ_h l)),    W̃ = W ⊙ (exp(ΛΔ_h) − 1)/Λ
    y = K * u + D u

whose recurrent view is ``x_k = exp(ΛΔ) ⊙ x_{k-1} + u_k``, ``y_k = Re(W̃ · x_k) + D u_k``: a diagonal
SSM with B = 1 and C = W̃, i.e. the zero-order-hold discretisation of ``x' = Λx + u``, so
``zoo.ops.lti.DiagonalSSM`` runs it in every mode (``"conv"``: Vandermonde kernel + FFT; the diagonal
engine's ``"sequential"`` and ``"associative"``).

Initialisation (Section 3.3): Λ = the eigenvalues of the normal part of HiPPO-LegS with positive
imaginary part (``zoo.ops.hippo.hippo_n``: N = d_state/2 of them), W ~ N(0, 1) complex, log Δ ~
U[log dt_min, log dt_max] per channel. The layer around the SSM (input projection when d_in ≠
d_model, GELU, output linear) is S4's, shared with s4d.

What differs from the paper, and why: only DSS-exp. DSS-softmax normalises each kernel by
``Σ_{l<L} exp(ΛΔl)``, a sum over the whole sequence length L, so its kernel changes with L: it has
no recurrence that agrees with it over arbitrary pieces of a sequence (and no O(1)-state step),
which the zoo's contract needs. The SSM runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.s4d import (
    check_even_state,
    check_ssm_config,
    complex_normal,
    layer_init,
    log_dt_init,
    ssm_layer,
)
from zoo.ops import hippo, lti
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class DSSConfig:
    d_model: int = 8
    d_state: int = 8          # real state size: d_state/2 complex entries per channel
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        check_ssm_config("dss", self)
        check_even_state("dss", self.d_state)


def dss_system(params: dict) -> lti.DiagonalSSM:
    lam = -jnp.exp(params["a_re_log"]) + 1j * params["a_im"]                 # [N]
    delta = jnp.exp(params["log_dt"])[:, None]                               # [H, 1]
    log_a, b_scale = lti.discretise_diagonal(lam[None], delta, "zoh")        # exp(ΛΔ), (exp(ΛΔ) − 1)/Λ
    w = params["w_re"] + 1j * params["w_im"]
    return lti.DiagonalSSM(log_a, b_scale, w, params["d"])


@register("dss", config=DSSConfig, paper="Diagonal State Spaces are as Effective as Structured State Spaces",
          engine="lti", modes=lti.DIAGONAL_MODES, state_size=lambda c: c.d_model * c.d_state)
def build(config: DSSConfig):
    h, n = config.d_model, config.d_state // 2

    def init(key, d_in):
        k_dt, k_w, k_d, k_layer = jax.random.split(key, 4)
        lam = hippo.hippo_n(config.d_state)
        w_re, w_im = complex_normal(k_w, (h, n))
        return {
            "a_re_log": jnp.asarray(np.log(-lam.real), jnp.float32),
            "a_im": jnp.asarray(lam.imag, jnp.float32),
            "w_re": w_re, "w_im": w_im,
            "log_dt": log_dt_init(k_dt, (h,), config.dt_min, config.dt_max),
            "d": jax.random.normal(k_d, (h,), jnp.float32),
            **layer_init(k_layer, d_in, h),
        }

    return ssm_layer("dss", dss_system, init=init, d_model=h, modes=lti.DIAGONAL_MODES)
