"""Elman network: the vanilla RNN.

Paper: J. L. Elman, "Finding Structure in Time" (Cognitive Science, 1990); the ReLU form follows
"A Simple Way to Initialize Recurrent Networks of Rectified Linear Units" (Le et al., 2015).

    h_t = φ(W x_t + U h_{t-1} + b),   φ ∈ {tanh, relu},   y_t = h_t

State: h [B, D] (D = d_model). Engine: nonlinear (lax.scan).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import cast, dense_init, orthogonal_init
from zoo.ops import nonlinear
from zoo.registry import register

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class ElmanConfig:
    d_model: int = 32
    activation: str = "tanh"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"elman: activation={self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.d_model <= 0:
            raise ValueError(f"elman: d_model must be positive, got {self.d_model}")


@register("elman", config=ElmanConfig, paper="Finding Structure in Time", engine="nonlinear",
          modes=nonlinear.MODES, state_size=lambda c: c.d_model)
def build(config: ElmanConfig):
    phi = ACTIVATIONS[config.activation]
    d = config.d_model

    def init(key, d_in):
        k_in, k_rec = jax.random.split(key)
        # Identity recurrence for ReLU (IRNN), orthogonal for tanh.
        w_rec = jnp.eye(d) if config.activation == "relu" else orthogonal_init(k_rec, d)
        return {"w_in": dense_init(k_in, d_in, d), "w_rec": w_rec, "bias": jnp.zeros((d,))}

    def cell(params, h, x_t):
        p = cast(params, x_t.dtype)
        h_new = phi(x_t @ p["w_in"] + h.astype(x_t.dtype) @ p["w_rec"] + p["bias"])
        return h_new.astype(jnp.float32), h_new

    def initial_state(params, batch):
        return jnp.zeros((batch, d), jnp.float32)

    def step(params, h, x_t):
        return nonlinear.step(cell, params, h, x_t)

    def apply(params, xs, h, reset, mode, reverse):
        return nonlinear.apply(cell, params, xs, initial_state=h, reset=reset, reverse=reverse, mode=mode)

    return make_recurrence("elman", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_in"].shape[0], modes=nonlinear.MODES,
                           default_d_in=d)
