"""HGRN2: the gated linear RNN with state expansion, token mixer.

Paper: Z. Qin, S. Yang, W. Sun, X. Shen, D. Li, W. Sun, Y. Zhong, "HGRN2: Gated Linear RNNs with State
Expansion" (COLM 2024, arXiv 2404.07904), §3. The layer follows FLA's ``HGRN2Attention``
(fla-org/flash-linear-attention, ``fla/layers/hgrn2.py``). With x_t ∈ R^{d_in}, H heads, a forget
(key) width K = expand_ratio per head and an input (value) width V = d_model / H per head::

    q_t = swish(W_q x_t),   f̃_t = W_f x_t,   i_t = W_i x_t             no biases; q, f̃ [H K], i [H V]
    log f_t = log(γ + (1 - γ) σ(f̃_t))                                   forget gate in [γ, 1), γ = lower_bound
    S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ,   o_t = S_tᵀ q_t / sqrt(K)  per head (zoo.ops.hgrn2: GLA
                                                                         with key 1 - f, matrix engine)
    y_t = W_o (RMSNorm(o_t) ⊙ w)                                         RMSNorm over all H V channels

The lower bound γ is FLA's ``logaddexp(log γ, log(1 - γ) + logsigmoid(f̃))``, computed here by
``zoo.models.hgrn.forget_gate`` (the same value, exact to rounding also where f is near 1). As in
HGRN, the hierarchy (bounds rising with depth, 0 for the first layer) belongs to the stack: FLA's
``HGRN2Model`` learns one bound per layer and channel, ``cumsum(softmax(Γ, layers)) - softmax(Γ)[0]``;
here ``lower_bound`` is one fixed float per layer, e.g.
``zoo.stack(*(zoo.residual(zoo.get("hgrn2", lower_bound=l / n)) for l in range(n)))``.

State: S [B, H, K, V], float32. ``step`` runs the op for one token, ``apply`` the op over the
sequence in its chunked (``"auto"``; chunk ``chunk_size``), parallel or sequential mode.

Differences from FLA, and why:

* The output norm is FLA's: one RMSNorm over the whole output (``RMSNorm(hidden_size)`` fused with
  W_o), not a norm per head. The paper has no output gate and FLA's layer none either.
* Not offered: FLA's short convolutions (``use_short_conv``, off by default); the learned per-layer,
  per-channel lower bound (see above).
* Projections are LeCun-normal (zoo's default) rather than FLA's normal(0, 0.02).
* Dtypes: projections in the compute dtype (the input's); the forget gate and the norm in float32;
  the recurrence accumulates in float32. The state is float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo import ops
from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import (
    check_positive_float,
    check_positive_int,
    engine_mode,
    head_norm,
    merge_heads,
    project,
    run_op,
    run_op_one_token,
    split_heads,
)
from zoo.models.hgrn import forget_gate
from zoo.ops.matrix import MODES
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class HGRN2Config:
    d_model: int = 16
    n_heads: int = 2
    expand_ratio: int = 8            # K, the forget/query width per head (FLA: 128, heads = d_model / 128)
    lower_bound: float = 0.0         # γ: the forget gate lies in [γ, 1); raise it with depth in a stack
    norm_eps: float = 1e-5
    chunk_size: int = 8              # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("hgrn2", self.chunk_size)
        for name in ("d_model", "n_heads", "expand_ratio"):
            check_positive_int("hgrn2", name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"hgrn2: d_model = {self.d_model} must be a multiple of "
                             f"n_heads = {self.n_heads}")
        gamma = self.lower_bound
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
            raise ValueError(f"hgrn2: lower_bound must be a float in [0, 1), got {gamma!r}")
        check_positive_float("hgrn2", "norm_eps", self.norm_eps)

    @property
    def forget_dim(self) -> int:
        return self.n_heads * self.expand_ratio


def init(key: jax.Array, d_in: int, config: HGRN2Config) -> dict:
    k_q, k_f, k_i, k_o = jax.random.split(key, 4)
    return {
        "w_q": dense_init(k_q, d_in, config.forget_dim),
        "w_f": dense_init(k_f, d_in, config.forget_dim),
        "w_i": dense_init(k_i, d_in, config.d_model),
        "norm_scale": jnp.ones((config.d_model,), jnp.float32),
        "w_o": dense_init(k_o, config.d_model, config.d_model),
    }


def log_forget(params: dict, x: jax.Array, lower_bound: float) -> jax.Array:
    """log f = log(γ + (1 - γ) σ(W_f x)), float32 [..., H K]; f >= γ."""
    return forget_gate(project(x, params["w_f"]), lower_bound)[0]


def recurrence_inputs(params: dict, x: jax.Array, config: HGRN2Config):
    """(q, i, log f) split into heads: the op's (q, v, g)."""
    h = config.n_heads
    q = jax.nn.silu(project(x, params["w_q"]))
    i = project(x, params["w_i"])
    g = log_forget(params, x, float(config.lower_bound))
    return split_heads(q, h), split_heads(i, h), split_heads(g, h)


def read_out(params: dict, o: jax.Array, dtype, eps: float) -> jax.Array:
    """W_o (RMSNorm(o) ⊙ w), the RMS over all H V channels (one "head"), in float32; W_o in ``dtype``."""
    y = head_norm(merge_heads(o.astype(jnp.float32))[..., None, :], params["norm_scale"], kind="rms", eps=eps)
    return y.astype(dtype) @ params["w_o"].astype(dtype)


def _state_size(c: HGRN2Config) -> int:
    return c.n_heads * c.expand_ratio * (c.d_model // c.n_heads)


@register("hgrn2", config=HGRN2Config, paper="HGRN2: Gated Linear RNNs with State Expansion", engine="matrix",
          modes=MODES, state_size=_state_size)
def build(config: HGRN2Config):
    heads, dk, dv = config.n_heads, config.expand_ratio, config.d_model // config.n_heads

    def initial_state(params, batch):
        return jnp.zeros((batch, heads, dk, dv), jnp.float32)

    def step(params, S, x_t):
        o, S = run_op_one_token(ops.hgrn2, *recurrence_inputs(params, x_t, config), state=S)
        return S, read_out(params, o, x_t.dtype, config.norm_eps)

    def apply(params, xs, S, reset, mode, reverse):
        o, S = run_op(ops.hgrn2, *recurrence_inputs(params, xs, config), state=S, reset=reset,
                      mode=engine_mode(mode), reverse=reverse, chunk_size=config.chunk_size)
        return read_out(params, o, xs.dtype, config.norm_eps), S

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("hgrn2", init=lambda key, d_in: init(key, d_in, config),
                           initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_q"].shape[0], modes=MODES, default_d_in=config.d_model)
