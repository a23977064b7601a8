"""LSSL: the linear state-space layer, with a dense state matrix.

Paper: A. Gu, I. Johnson, K. Goel, K. Saab, T. Dao, A. Rudra, C. Ré, "Combining Recurrent,
Convolutional, and Continuous-time Models with Linear State-Space Layers" (NeurIPS 2021).

Each of the H = d_model channels simulates ``x' = A x + B u``, ``y = C x + D u`` with its own step
Δ_h (the paper's many timescales) and the bilinear discretisation (Section 3)::

    Ā_h = (I − Δ_h/2 A)⁻¹ (I + Δ_h/2 A),   B̄_h = (I − Δ_h/2 A)⁻¹ Δ_h B
    x_k = Ā x_{k-1} + B̄ u_k,   y_k = C_h x_k + D_h u_k
    K_h = (C_h B̄_h, C_h Ā_h B̄_h, …, C_h Ā_h^{L−1} B̄_h),   y = K * u + D u

A [N, N] and B [N] are shared by the channels and trained, initialised to HiPPO-LegS
(``zoo.ops.hippo.transition("legs", N)``); C_h ~ N(0, 1/N), D ~ N(0, 1), log Δ ~ U[log dt_min,
log dt_max]. The layer around the SSM (input projection when d_in ≠ d_model, GELU, output linear)
is S4's, shared with s4d.

Engine: ``zoo.ops.lti.DenseSSM``: ``"conv"`` computes the Krylov kernel ``Ā^l B̄`` by doubling
(log₂ L dense matrix products, the paper's Section 4 approach without its structured fast
multiplication) and convolves by FFT; ``"recurrent"`` is a ``lax.scan`` with a dense matrix-vector
product per step (and ``step`` is one of them, for decoding with O(1) state).

What differs from the paper, and why: A is a plain dense trainable matrix (the paper also studies
A fixed, and structured fast Krylov algorithms, which the later S4 replaced); the SSM runs in
float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models.s4d import check_ssm_config, layer_init, log_dt_init, ssm_layer
from zoo.ops import hippo, lti
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class LSSLConfig:
    d_model: int = 8
    d_state: int = 8          # N: dense state size per channel
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        check_ssm_config("lssl", self)


def lssl_system(params: dict) -> lti.DenseSSM:
    h = params["log_dt"].shape[0]
    a = jnp.broadcast_to(params["a"], (h, *params["a"].shape))
    b = jnp.broadcast_to(params["b"], (h, *params["b"].shape))
    a_bar, b_bar = lti.discretise_dense(a, b, jnp.exp(params["log_dt"]), "bilinear")
    return lti.DenseSSM(a_bar, b_bar, params["c"], params["d"])


@register("lssl", config=LSSLConfig,
          paper="Combining Recurrent, Convolutional, and Continuous-time Models with Linear State-Space "
                "Layers",
          engine="lti", modes=lti.DENSE_MODES, state_size=lambda c: c.d_model * c.d_state)
def build(config: LSSLConfig):
    h, n = config.d_model, config.d_state
    a, b = hippo.transition("legs", n)

    def init(key, d_in):
        k_dt, k_c, k_d, k_layer = jax.random.split(key, 4)
        return {
            "a": jnp.asarray(a, jnp.float32),
            "b": jnp.asarray(b, jnp.float32),
            "c": jax.random.normal(k_c, (h, n), jnp.float32) / jnp.sqrt(n),
            "log_dt": log_dt_init(k_dt, (h,), config.dt_min, config.dt_max),
            "d": jax.random.normal(k_d, (h,), jnp.float32),
            **layer_init(k_layer, d_in, h),
        }

    return ssm_layer("lssl", lssl_system, init=init, d_model=h, modes=lti.DENSE_MODES)
