"""S4: the structured state space sequence model with a diagonal-plus-low-rank state matrix.

Paper: A. Gu, K. Goel, C. Ré, "Efficiently Modeling Long Sequences with Structured State Spaces"
(ICLR 2022).

Each of the H = d_model channels is a SISO SSM ``x' = A x + B u``, ``y = C x + D u`` with the
HiPPO-LegS matrix written in its normal-plus-low-rank form, conjugated into the eigenbasis of the
normal part (Theorem 1)::

    A = Λ − p p*           Λ, p ∈ C^N: one of each conjugate pair kept (M = d_state/2 entries)
    Re Λ = −exp(lam_re_log) (kept negative, as the paper's code does)
    bilinear:  Ā = (I − Δ/2 A)⁻¹ (I + Δ/2 A),  B̄ = (I − Δ/2 A)⁻¹ Δ B,  Δ = exp(log_dt)
    x_k = Ā x_{k-1} + B̄ u_k,   y_k = C x_k + D u_k = 2 Re(C_half x_half) + D u_k
    K = (C B̄, C Ā B̄, …, C Ā^{L−1} B̄),   y = K * u + D u

Conv mode computes K by the paper's Algorithm 1 (truncated generating function at the roots of
unity, Woodbury identity, Cauchy sums, inverse FFT; ``zoo.ops.lti_kernels.dplr_generating``) and
applies it by FFT. Recurrent mode (and ``step``, for decoding with O(1) state) runs the same
discretised recurrence with Ā as a dense real matrix on (Re x, Im x) of the half state
(``zoo.ops.lti.dplr_to_dense``). The layer around the SSM (input projection when d_in ≠ d_model,
GELU, output linear) is S4's, shared with s4d (see ``zoo/models/s4d.py``).

Initialisation: Λ, p, B = V*B_LegS from ``zoo.ops.hippo.nplr("legs", d_state)`` in every channel,
C ~ N(0, 1) complex, D ~ N(0, 1), log Δ ~ U[log dt_min, log dt_max].

What differs from the paper, and why:

* The parameters hold C itself, not the paper's C̃ = C (I − Ā^L) tied to one training length: the
  kernel recomputes C̃ for each call's length (Ā^L by repeated squaring), so conv mode and the
  recurrence agree at every length, and pieces of a sequence can be carried across calls.
* The Cauchy sums run over both members of each conjugate pair (2M terms), which the paper halves
  with a closed form; this costs a factor 2 in the kernel only.
* Rank one (p = q), as for LegS; the SSM is computed in float32 whatever the input dtype.
* Conv mode returns the exact final state and honours the initial state (``zoo.ops.lti``); with
  ``reset`` given it runs the recurrent mode.
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
class S4Config:
    d_model: int = 8
    d_state: int = 8          # N: real state size per channel (N/2 complex pairs)
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        check_ssm_config("s4", self)
        check_even_state("s4", self.d_state)


def s4_system(params: dict) -> lti.DplrSSM:
    lam = -jnp.exp(params["lam_re_log"]) + 1j * params["lam_im"]
    p, b, c = (params[f"{k}_re"] + 1j * params[f"{k}_im"] for k in ("p", "b", "c"))
    return lti.DplrSSM(lam=lam, p=p, b=b, c=c, delta=jnp.exp(params["log_dt"]), d=params["d"])


@register("s4", config=S4Config, paper="Efficiently Modeling Long Sequences with Structured State Spaces",
          engine="lti", modes=lti.DENSE_MODES, state_size=lambda c: c.d_model * c.d_state)
def build(config: S4Config):
    h = config.d_model
    legs = hippo.nplr("legs", config.d_state, half=True)

    def tiled(x):
        return jnp.asarray(np.tile(x, (h, 1)), jnp.float32)

    def init(key, d_in):
        k_dt, k_c, k_d, k_layer = jax.random.split(key, 4)
        c_re, c_im = complex_normal(k_c, (h, config.d_state // 2))
        return {
            "lam_re_log": tiled(np.log(-legs.lam.real)),
            "lam_im": tiled(legs.lam.imag),
            "p_re": tiled(legs.p[0].real), "p_im": tiled(legs.p[0].imag),
            "b_re": tiled(legs.b.real), "b_im": tiled(legs.b.imag),
            "c_re": c_re, "c_im": c_im,
            "log_dt": log_dt_init(k_dt, (h,), config.dt_min, config.dt_max),
            "d": jax.random.normal(k_d, (h,), jnp.float32),
            **layer_init(k_layer, d_in, h),
        }

    return ssm_layer("s4", s4_system, init=init, d_model=h, modes=lti.DENSE_MODES)
