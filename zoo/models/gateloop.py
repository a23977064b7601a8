"""GateLoop: linear attention with data-controlled complex state transitions, token mixer.

Paper: T. Katsch, "GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling" (arXiv
2311.01927, 2023), §3 (the recurrence, its parallel and surrogate-attention modes) and its
practical model. With x_t ∈ R^{d_in}, H heads, key width K = expand_k · d_model / H and value
width V = expand_v · d_model / H per head::

    q_t = W_q x_t,  k_t = W_k x_t,  v_t = W_v x_t                   real, split into H heads, no biases
    log a_t = logsigmoid(W_a x_t) + i W_θ x_t                        |a_t| = σ(W_a x_t), phase W_θ x_t (rad)
    S_t = Diag(a_t) S_{t-1} + k_t v_tᵀ,   o_t = Re(S_tᵀ q_t)         per head, S complex (zoo.ops.gateloop)
    y_t = W_o (GroupNorm_head(o_t) ⊙ SiLU(W_g x_t))                  LayerNorm per head, affine [H V]

The transition a_t is one complex number per key dimension, shared by the V columns of the state
(the paper's a_t ∈ C^{d_k} broadcast over d_v). As in the paper, q is not scaled (scale 1).

What this follows: the paper gives the recurrence and its modes exactly, the magnitude activation
(sigmoid) and the phase (identity), but the rest of the layer only in prose. The author's
repository (github.com/tobiaskatsch/GateLoop) holds, at every commit, a real vector-state gated RNN
(``GatedLinearRNN``, formerly ``flax_gate_loop/gate_loop.py``), not the complex matrix-state layer
of the paper, so it cannot serve as a reference. The output stage here (a normalisation per head,
a SiLU output gate and an output projection) is the one of the RetNet/GLA family that the paper
builds on, and the one of the third-party JAX port github.com/jonmorton/gateloop_jax
(GroupNorm + SiLU gate + W_o).

State: the complex S [B, H, K, V] stored as its real and imaginary parts, ``(S_re, S_im)``, both
float32 (the harness and the contract need float32 leaves); they become one complex64 array at
the op's boundary. ``step`` runs the op for one token, ``apply`` the op over the sequence in its
chunked (``"auto"``; chunk ``chunk_size``), parallel or sequential mode.

Differences, and why:

* Heads: the paper's experiments are not specific about the head layout; here H heads of K × V
  (``n_heads=d_model`` with expand_k = expand_v = 1 gives one-dimensional heads, a vector state).
* Projections are LeCun-normal (zoo's default); the norm is LayerNorm per head (``head_norm``'s
  "group" kind) with scale 1 and bias 0 at init.
* Dtypes: projections in the compute dtype (the input's); the transition, the norm and the gate in
  float32; the recurrence in complex64. The state is float32 (real, imaginary).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo import ops
from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import (
    ExpandedHeadWidths,
    check_positive_float,
    check_positive_int,
    engine_mode,
    head_norm,
    project,
    run_op,
    run_op_one_token,
    split_heads,
)
from zoo.ops.matrix import MODES
from zoo.registry import register

# The paper's readout is Re(q_t S_t) with no 1/sqrt(K); the norm after it makes the scale moot anyway.
Q_SCALE = 1.0


@dataclasses.dataclass(frozen=True)
class GateLoopConfig(ExpandedHeadWidths):
    d_model: int = 16
    n_heads: int = 2
    expand_k: float = 1.0            # key width H * K = expand_k * d_model
    expand_v: float = 1.0            # value width H * V = expand_v * d_model
    norm_eps: float = 1e-5
    chunk_size: int = 8              # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("gateloop", self.chunk_size)
        for name in ("d_model", "n_heads"):
            check_positive_int("gateloop", name, getattr(self, name))
        for name in ("expand_k", "expand_v", "norm_eps"):
            check_positive_float("gateloop", name, getattr(self, name))
        self.check_head_widths("gateloop")


def init(key: jax.Array, d_in: int, config: GateLoopConfig) -> dict:
    keys = jax.random.split(key, 7)
    dk, dv = config.key_dim, config.value_dim
    return {
        "w_q": dense_init(keys[0], d_in, dk),
        "w_k": dense_init(keys[1], d_in, dk),
        "w_v": dense_init(keys[2], d_in, dv),
        "w_a": dense_init(keys[3], d_in, dk),          # log-magnitude preactivation
        "w_theta": dense_init(keys[4], d_in, dk),      # phase, radians
        "w_g": dense_init(keys[5], d_in, dv),
        "norm_scale": jnp.ones((dv,), jnp.float32),
        "norm_bias": jnp.zeros((dv,), jnp.float32),
        "w_o": dense_init(keys[6], dv, config.d_model),
    }


def log_transition(params: dict, x: jax.Array) -> jax.Array:
    """log a = logsigmoid(W_a x) + i W_θ x, complex64 [..., H K]: |a| in (0, 1), any phase."""
    log_magnitude = jax.nn.log_sigmoid(project(x, params["w_a"]).astype(jnp.float32))
    return jax.lax.complex(log_magnitude, project(x, params["w_theta"]).astype(jnp.float32))


def recurrence_inputs(params: dict, x: jax.Array, config: GateLoopConfig):
    """(q, k, v, log a) split into heads, for x [..., d_in]."""
    h = config.n_heads
    q, k, v = (split_heads(project(x, params[w]), h) for w in ("w_q", "w_k", "w_v"))
    return q, k, v, split_heads(log_transition(params, x), h)


def read_out(params: dict, o: jax.Array, x: jax.Array, config: GateLoopConfig) -> jax.Array:
    """W_o (GroupNorm_head(o) ⊙ SiLU(W_g x)): norm and gate in float32, W_o in x's dtype."""
    y = head_norm(o.astype(jnp.float32), params["norm_scale"], kind="group", eps=config.norm_eps,
                  bias=params["norm_bias"])
    y = y * jax.nn.silu(project(x, params["w_g"]).astype(jnp.float32))
    return project(y.astype(x.dtype), params["w_o"])


def to_complex(state):
    """(S_re, S_im) float32 -> S complex64, the op's state."""
    return jax.lax.complex(*state)


def to_pair(S):
    """S complex -> (S_re, S_im) float32, the model's state."""
    return jnp.real(S).astype(jnp.float32), jnp.imag(S).astype(jnp.float32)


def _state_size(c: GateLoopConfig) -> int:
    return 2 * c.n_heads * (c.key_dim // c.n_heads) * (c.value_dim // c.n_heads)


@register("gateloop", config=GateLoopConfig,
          paper="GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling",
          engine="matrix", modes=MODES, state_size=_state_size)
def build(config: GateLoopConfig):
    heads, dk, dv = config.n_heads, config.key_dim // config.n_heads, config.value_dim // config.n_heads

    def initial_state(params, batch):
        zeros = jnp.zeros((batch, heads, dk, dv), jnp.float32)
        return zeros, zeros

    def step(params, state, x_t):
        o, S = run_op_one_token(ops.gateloop, *recurrence_inputs(params, x_t, config),
                                state=to_complex(state), scale=Q_SCALE)
        return to_pair(S), read_out(params, o, x_t, config)

    def apply(params, xs, state, reset, mode, reverse):
        o, S = run_op(ops.gateloop, *recurrence_inputs(params, xs, config), state=to_complex(state),
                      reset=reset, mode=engine_mode(mode), reverse=reverse, chunk_size=config.chunk_size,
                      scale=Q_SCALE)
        return read_out(params, o, xs, config), to_pair(S)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("gateloop", init=lambda key, d_in: init(key, d_in, config),
                           initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_q"].shape[0], modes=MODES, default_d_in=config.d_model)
