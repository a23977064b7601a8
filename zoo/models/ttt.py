"""TTT-Linear and TTT-MLP: a hidden state that is a model trained by self-supervised GD as tokens arrive.

Paper: Y. Sun, X. Li, K. Dalal, J. Xu, A. Vikram, G. Zhang, Y. Dubois, X. Chen, X. Wang, S. Koyejo,
T. Hashimoto, C. Guestrin, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States"
(2024); the layer follows ``TTTLinear`` / ``TTTMLP`` of the authors' ttt-lm-jax
(``ttt/models/ttt_layer.py``). Per head h of width d (H · d = d_model), for the layer input x_t::

    q_t, k_t, v_t = θ_Q x_t, θ_K x_t, θ_V x_t                        split into heads
    f(W, z) = z + LN(f_res(W, z))                                    per-head LayerNorm, learned, not updated
      f_res = z W + b (TTT-Linear)  or  GELU(z W1 + b1) W2 + b2 (TTT-MLP, hidden 4d)
    ℓ_t(W) = ½‖f(W, k_t) − v_t‖²
    η_t    = ttt_base_lr · sigmoid(w_lr,h · x_t + b_lr,h) / d        per token and head
    W_t    = W_b − c_p Σ_{j ≤ t in the mini-batch} η_j ∇ℓ_j(W_b)     W_b: weights at the mini-batch start
    c_p    = max(1/(p + 1) + ε_p, 0)                       p: place in the mini-batch, ε learned (init 0)
    z_t    = f(W_t, q_t)
    o_t    = W_o (GELU(W_g x_t) ⊙ LN(z_t))                           gate only with use_gate

with mini-batches of ``mini_batch_size`` tokens (the paper's b = 16; 4 here so that short sequences
cross boundaries); the next mini-batch starts from the last token's weights. The initial weights
W0 (per head) are learned. The fast-weight arithmetic is ``zoo.ops.fast_weights`` with ``memory_fn``
the whole f (residual and LayerNorm included), ``lr`` = η and ``position_scale`` = c.

State: the engine's dict (``fast_weights.initial_state``): the mini-batch-start weights, the
displacement accumulated inside the current mini-batch, and the place in it as a float32 count
[B]. ``apply`` modes: ``"chunked"`` (and ``"auto"``: mini-batches in parallel, taken when the state
enters at a mini-batch start and nothing resets, else the token loop) and ``"sequential"`` (the
token loop). A reset starts a fresh mini-batch at the reset token.

Differences from ttt-lm-jax: θ_Q and θ_K are separate projections (as in their ``TTTBase``; their
TTTLinear/TTTMLP share one projection followed by two causal depthwise convolutions), no rotary
embedding of q, k (they rotate by the position inside the mini-batch), the gradient is taken by
autodiff instead of their hand-written LayerNorm backward, projections are LeCun-normal (zoo's
default; they use N(0, 0.02²)), and the per-token weights are formed explicitly rather than by the
dual form.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import dense_init
from zoo.models._matrix_common import check_positive_float, check_positive_ints, merge_heads, split_heads
from zoo.ops import fast_weights
from zoo.registry import register

PAPER = "Learning to (Learn at Test Time): RNNs with Expressive Hidden States"


@dataclasses.dataclass(frozen=True)
class TTTLinearConfig:
    name: ClassVar[str] = "ttt_linear"
    d_model: int = 16
    n_heads: int = 2
    mini_batch_size: int = 4     # b; the paper uses 16
    ttt_base_lr: float = 1.0     # the paper's base learning rate for TTT-Linear
    use_gate: bool = True
    norm_eps: float = 1e-6       # flax LayerNorm's default, as in ttt-lm-jax
    init_std: float = 0.02       # W0 ~ N(0, init_std²), ttt-lm-jax's initializer_range

    def __post_init__(self):
        check_config(self.name, self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class TTTMLPConfig(TTTLinearConfig):
    name: ClassVar[str] = "ttt_mlp"
    ttt_base_lr: float = 0.1     # the paper's base learning rate for TTT-MLP
    mlp_ratio: int = 4           # hidden width of the inner MLP, in units of d


def check_config(model: str, c) -> None:
    check_positive_ints(model, c, ("d_model", "n_heads", "mini_batch_size")
                        + (("mlp_ratio",) if hasattr(c, "mlp_ratio") else ()))
    if c.d_model % c.n_heads:
        raise ValueError(f"{model}: d_model = {c.d_model} must be a multiple of n_heads = {c.n_heads}")
    for name in ("ttt_base_lr", "norm_eps", "init_std"):
        check_positive_float(model, name, getattr(c, name))
    if not isinstance(c.use_gate, bool):
        raise ValueError(f"{model}: use_gate must be a bool, got {c.use_gate!r}")


# --------------------------------------------------------------------------------------------
# The inner models f(W, z) for one head: z [d] -> [d].


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics at least float32."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(acc)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps) * scale + bias


def linear_inner(eps: float):
    def f(weights, z, norm):
        return z + layer_norm(z @ weights["w"] + weights["b"], norm["scale"], norm["bias"], eps)
    return f


def mlp_inner(eps: float):
    def f(weights, z, norm):
        hidden = jax.nn.gelu(z @ weights["w1"] + weights["b1"])
        return z + layer_norm(hidden @ weights["w2"] + weights["b2"], norm["scale"], norm["bias"], eps)
    return f


def inner_weights_init(key, c, heads: int, d: int, mlp: bool) -> dict:
    """W0 per head: N(0, init_std²) kernels (the second MLP layer scaled by 1/√2, their
    1/√(2·layers) for one layer), zero biases."""
    k1, k2 = jax.random.split(key)
    if not mlp:
        return {"w": c.init_std * jax.random.normal(k1, (heads, d, d), jnp.float32),
                "b": jnp.zeros((heads, d), jnp.float32)}
    wide = c.mlp_ratio * d
    return {"w1": c.init_std * jax.random.normal(k1, (heads, d, wide), jnp.float32),
            "b1": jnp.zeros((heads, wide), jnp.float32),
            "w2": c.init_std / 2 ** 0.5 * jax.random.normal(k2, (heads, wide, d), jnp.float32),
            "b2": jnp.zeros((heads, d), jnp.float32)}


def _inner_size(c, mlp: bool) -> int:
    d = c.head_dim
    per_head = (2 * c.mlp_ratio * d * d + c.mlp_ratio * d + d) if mlp else d * d + d
    return c.n_heads * per_head


# --------------------------------------------------------------------------------------------
# The layer.


def _build(name: str, config, mlp: bool):
    heads, d, b = config.n_heads, config.head_dim, config.mini_batch_size
    memory_fn = (mlp_inner if mlp else linear_inner)(config.norm_eps)

    def init(key, d_in):
        keys = jax.random.split(key, 7)
        params = {
            "w_q": dense_init(keys[0], d_in, config.d_model),
            "w_k": dense_init(keys[1], d_in, config.d_model),
            "w_v": dense_init(keys[2], d_in, config.d_model),
            "w_lr": 0.02 * jax.random.normal(keys[3], (d_in, heads), jnp.float32),
            "b_lr": jnp.zeros((heads,), jnp.float32),
            "token_idx_offset": jnp.zeros((b,), jnp.float32),
            "inner": inner_weights_init(keys[4], config, heads, d, mlp),
            "inner_norm": {"scale": jnp.ones((heads, d), jnp.float32),
                           "bias": jnp.zeros((heads, d), jnp.float32)},
            "post_norm": {"scale": jnp.ones((config.d_model,), jnp.float32),
                          "bias": jnp.zeros((config.d_model,), jnp.float32)},
            "w_o": dense_init(keys[5], config.d_model, config.d_model),
        }
        if config.use_gate:
            params["w_g"] = dense_init(keys[6], d_in, config.d_model)
        return params

    def inputs(params, x):
        """q, k, v [..., H, d] and η [..., H] from x [..., D_in] (in float32 or float64)."""
        acc = jnp.promote_types(x.dtype, jnp.float32)
        x = x.astype(acc)
        q, k, v = (split_heads(x @ params[f"w_{n}"].astype(acc), heads) for n in "qkv")
        lr = config.ttt_base_lr * jax.nn.sigmoid(x @ params["w_lr"].astype(acc) + params["b_lr"]) / d
        return q, k, v, lr

    def position_scale(params):
        """c_p = max(1/(p + 1) + ε_p, 0): the running mean of the mini-batch's gradients."""
        return jnp.maximum(1.0 / jnp.arange(1, b + 1, dtype=jnp.float32) + params["token_idx_offset"], 0.0)

    def readout(params, x, z):
        """LN over d_model, the GELU gate, the output projection; back in x's dtype."""
        y = layer_norm(merge_heads(z), params["post_norm"]["scale"], params["post_norm"]["bias"],
                       config.norm_eps)
        acc = y.dtype
        if config.use_gate:
            y = jax.nn.gelu(x.astype(acc) @ params["w_g"].astype(acc)) * y
        return (y @ params["w_o"].astype(acc)).astype(x.dtype)

    def engine_kwargs(params):
        return {"mini_batch": b, "position_scale": position_scale(params), "consts": params["inner_norm"]}

    def initial_state(params, batch):
        return fast_weights.initial_state(params["inner"], batch)

    def step(params, state, x_t):
        q, k, v, lr = inputs(params, x_t)
        state, z = fast_weights.step(memory_fn, state, q, k, v, lr, **engine_kwargs(params))
        return state, readout(params, x_t, z)

    def apply(params, xs, state, reset, mode, reverse):
        q, k, v, lr = inputs(params, xs)
        z, state = fast_weights.apply(memory_fn, params["inner"], q, k, v, lr=lr, initial_state=state,
                                      reset=reset, reverse=reverse, mode=mode, **engine_kwargs(params))
        return readout(params, xs, z), state

    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_q"].shape[0], modes=fast_weights.MODES,
                           default_d_in=config.d_model)


@register("ttt_linear", config=TTTLinearConfig, paper=PAPER, engine="fast_weights", modes=fast_weights.MODES,
          state_size=lambda c: 2 * _inner_size(c, mlp=False) + 1)
def build_linear(config: TTTLinearConfig):
    return _build("ttt_linear", config, mlp=False)


@register("ttt_mlp", config=TTTMLPConfig, paper=PAPER, engine="fast_weights", modes=fast_weights.MODES,
          state_size=lambda c: 2 * _inner_size(c, mlp=True) + 1)
def build_mlp(config: TTTMLPConfig):
    return _build("ttt_mlp", config, mlp=True)
