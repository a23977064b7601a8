"""GRU: the gated recurrent unit.

Papers: K. Cho, B. van Merriënboer, C. Gulcehre, D. Bahdanau, F. Bougares, H. Schwenk and Y. Bengio,
"Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine Translation"
(2014), which introduces the unit; J. Chung, C. Gulcehre, K. Cho and Y. Bengio, "Empirical Evaluation
of Gated Recurrent Neural Networks on Sequence Modeling" (2014)::

    r_t = σ(W_r x_t + U_r h_{t-1} + b_r)                  reset gate
    z_t = σ(W_z x_t + U_z h_{t-1} + b_z)                  update gate
    n_t = tanh(W_n x_t + U_n (r_t ⊙ h_{t-1}) + b_n)       candidate     (reset_after=False, Cho)
    n_t = tanh(W_n x_t + b_n + r_t ⊙ (U_n h_{t-1} + b'_n))               (reset_after=True)
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1},   y_t = h_t

``reset_after=False`` is the paper's unit: the reset gate scales the state before the product, so
each step needs two dependent matrix products. ``reset_after=True`` is the cuDNN / torch.nn.GRU /
flax GRUCell / Keras v2 layout: the reset gate scales the product, so a step has a single fused
[h] @ U product and runs on the engine's faster structured path.

Parameters (D = d_model, D_in = input width), gate blocks of width D in the order **(r, z, n)**:

* ``w_in`` [D_in, 3D], ``w_rec`` [D, 3D]: for torch.nn.GRU, ``w_in = weight_ih_l0.T`` and
  ``w_rec = weight_hh_l0.T``.
* ``reset_after=False``: ``bias`` [3D].
* ``reset_after=True``: ``bias_in`` [3D] (torch ``bias_ih_l0``) and ``bias_rec`` [3D] (torch
  ``bias_hh_l0``); only the n block of ``bias_rec`` is not redundant with ``bias_in``.

State: ``h`` [B, D], float32.

``recurrence="diagonal"`` is ParaGRU ("ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for
Large Language Models", Danieli et al., 2025): U_r, U_z, U_n become vectors u_r, u_z, u_n and each
product U h a product u ⊙ h, so unit j of h_t depends on unit j of h_{t-1} alone. The Jacobian
∂h_t/∂h_{t-1} is then diagonal and ``mode="newton"`` solves each iteration with the diagonal engine
(the two reset-gate forms coincide without b'_n). ``w_rec`` is then [3D].

Changes from the paper: none in the equations (h_t = (1 - z) n + z h_{t-1} as in Cho et al. and
torch; some libraries swap z and 1 - z). Initialisation: LeCun-normal inputs, orthogonal recurrent
blocks, zero biases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models._common import (
    cast,
    cell_recurrence,
    check_recurrence,
    dense_init,
    diagonal_recurrent_init,
    orthogonal_init,
)
from zoo.models._fused import check_implementation, fused_apply
from zoo.ops import nonlinear
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class GRUConfig:
    d_model: int = 32
    reset_after: bool = False
    recurrence: str = "dense"          # "dense" U [D, 3D], or "diagonal" u [3D] (ParaGRU)
    # "xla", "pallas" (pallas_kernels.fused_rnn_cell), a tuple tried in turn, or None: the kernel on
    # GPU/TPU in mode "auto" (zoo/models/_fused.py).
    implementation: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.d_model <= 0:
            raise ValueError(f"gru: d_model must be positive, got {self.d_model}")
        check_recurrence("gru", self.recurrence)
        check_implementation("gru", self.implementation)


@register("gru", config=GRUConfig,
          paper="Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine "
                "Translation", engine="nonlinear", modes=nonlinear.MODES, state_size=lambda c: c.d_model)
def build(config: GRUConfig):
    d = config.d_model

    def init(key, d_in):
        k_in, k_rec = jax.random.split(key)
        w_rec = (diagonal_recurrent_init(k_rec, d, 3) if config.recurrence == "diagonal"
                 else orthogonal_init(k_rec, d, 3))
        params = {"w_in": dense_init(k_in, d_in, 3 * d), "w_rec": w_rec}
        if config.reset_after:
            params.update(bias_in=jnp.zeros((3 * d,)), bias_rec=jnp.zeros((3 * d,)))
        else:
            params["bias"] = jnp.zeros((3 * d,))
        return params

    def mix(z, n, h):
        """(1 - z) n + z h in float32: the state is the running memory."""
        z = z.astype(jnp.float32)
        h_new = (1 - z) * n.astype(jnp.float32) + z * h
        return h_new, h_new.astype(n.dtype)

    def cho_cell(params, h, x_t):
        p = cast(params, x_t.dtype)
        h_lo = h.astype(x_t.dtype)
        pre_x = x_t @ p["w_in"] + p["bias"]
        rz = jax.nn.sigmoid(pre_x[..., :2 * d] + h_lo @ p["w_rec"][:, :2 * d])
        r, z = rz[..., :d], rz[..., d:]
        n = jnp.tanh(pre_x[..., 2 * d:] + (r * h_lo) @ p["w_rec"][:, 2 * d:])
        return mix(z, n, h)

    def pointwise(params, pre, h):
        pre_x, pre_h = pre
        pre_h = pre_h + params["bias_rec"].astype(pre_h.dtype)
        # Splits, not slices: the VJP of a split is a concatenate, each slice's a pad of the whole row.
        x_rz, x_n = jnp.split(pre_x, [2 * d], axis=-1)
        h_rz, h_n = jnp.split(pre_h, [2 * d], axis=-1)
        r, z = jnp.split(jax.nn.sigmoid(x_rz + h_rz), 2, axis=-1)
        return mix(z, jnp.tanh(x_n + r * h_n), h)

    def diagonal_cell(params, h, pre_x):
        """ParaGRU from the hoisted input part: every product with h is element-wise."""
        dt = pre_x.dtype
        pre_h = jnp.tile(h.astype(dt), 3) * params["w_rec"].astype(dt)
        if config.reset_after:
            pre_h = pre_h + params["bias_rec"].astype(dt)
        rz = jax.nn.sigmoid(pre_x[..., :2 * d] + pre_h[..., :2 * d])
        r, z = rz[..., :d], rz[..., d:]
        return mix(z, jnp.tanh(pre_x[..., 2 * d:] + r * pre_h[..., 2 * d:]), h)

    def project(params, x):
        bias = params["bias_in"] if config.reset_after else params["bias"]
        return x @ params["w_in"].astype(x.dtype) + bias.astype(x.dtype)

    if config.recurrence == "diagonal":
        cell = diagonal_cell
    elif config.reset_after:
        cell = nonlinear.SplitCell(input_weight=lambda p: p["w_in"], recurrent_weight=lambda p: p["w_rec"],
                                   read=lambda h: h, pointwise=pointwise, separate=True,
                                   bias=lambda p: p["bias_in"])
    else:
        cell = cho_cell

    def initial_state(params, batch):
        return jnp.zeros((batch, d), jnp.float32)

    def prepare(params, xs):
        """The fused kernel's inputs: the hoisted input projection, W_rec and (reset after) b_rec."""
        kwargs = {"b_rec": params["bias_rec"]} if config.reset_after else {}
        return project(params, xs), params["w_rec"].astype(xs.dtype), kwargs

    diagonal = config.recurrence == "diagonal"
    fused = fused_apply("gru", config.implementation, cell="gru_reset_after" if config.reset_after else "gru",
                        width=d, prepare=prepare, reason="recurrence='diagonal'" if diagonal else None)
    return cell_recurrence("gru", cell, init=init, initial_state=initial_state,
                           input_width=lambda p: p["w_in"].shape[0], default_d_in=d, fused=fused,
                           project=project if diagonal else None, structure="diagonal" if diagonal else None)
