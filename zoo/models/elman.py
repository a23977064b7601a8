"""Elman network: the vanilla RNN.

Paper: J. L. Elman, "Finding Structure in Time" (Cognitive Science, 1990); the ReLU form follows
"A Simple Way to Initialize Recurrent Networks of Rectified Linear Units" (Le et al., 2015).

    h_t = φ(W x_t + U h_{t-1} + b),   φ ∈ {tanh, relu},   y_t = h_t

State: h [B, D] (D = d_model). Engine: nonlinear, as a ``SplitCell`` (input product, recurrent
product, pointwise activation), so it gets the engine's structured backward pass.

``recurrence="diagonal"`` replaces U by a vector u (h_t = φ(W x_t + u ⊙ h_{t-1} + b)), the minimal
form of "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large Language Models" (Danieli
et al., 2025): its Jacobian is diagonal, so ``mode="newton"`` solves each iteration with the
diagonal engine. ``w_rec`` is then [D].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models._common import (
    cell_recurrence,
    check_recurrence,
    dense_init,
    diagonal_recurrent_init,
    input_projection,
    orthogonal_init,
)
from zoo.ops import nonlinear
from zoo.registry import register

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class ElmanConfig:
    d_model: int = 32
    activation: str = "tanh"
    recurrence: str = "dense"          # "dense" U [D, D], or "diagonal" u [D] (ParaRNN)

    def __post_init__(self):
        check_recurrence("elman", self.recurrence)
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
        if config.recurrence == "diagonal":
            w_rec = jnp.ones((d,)) if config.activation == "relu" else diagonal_recurrent_init(k_rec, d)
        else:
            w_rec = jnp.eye(d) if config.activation == "relu" else orthogonal_init(k_rec, d)
        return {"w_in": dense_init(k_in, d_in, d), "w_rec": w_rec, "bias": jnp.zeros((d,))}

    def pointwise(params, pre, h):
        h_new = phi(pre)
        return h_new.astype(jnp.float32), h_new

    def initial_state(params, batch):
        return jnp.zeros((batch, d), jnp.float32)

    common = dict(init=init, initial_state=initial_state, input_width=lambda p: p["w_in"].shape[0],
                  default_d_in=d)
    if config.recurrence == "diagonal":
        def diagonal_cell(params, h, pre_x):
            return pointwise(params, pre_x + h.astype(pre_x.dtype) * params["w_rec"].astype(pre_x.dtype), h)

        return cell_recurrence("elman", diagonal_cell, project=input_projection, structure="diagonal",
                               **common)
    # A SplitCell: the engine fuses [x_t, h] @ [W_in; W_rec] and hoists the weight gradients.
    cell = nonlinear.SplitCell(input_weight=lambda p: p["w_in"], recurrent_weight=lambda p: p["w_rec"],
                               read=lambda h: h, pointwise=pointwise, bias=lambda p: p["bias"])
    return cell_recurrence("elman", cell, **common)
