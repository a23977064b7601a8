"""Aaren: attention as a many-to-many RNN, stacked as a Transformer's replacement.

Paper: L. Feng, F. Tung, H. Hajimirsadeghi, M. O. Ahmed, Y. Bengio, G. Mori, "Attention as an RNN"
(arXiv 2405.13956, 2024), Section 3.3; PAPERS.md §1.8. The Aaren module attends with a learned,
input-independent query per head (not one made from the tokens), so output t is softmax attention
over tokens 1..t and can be updated token by token in O(1) memory::

    k_t = x_t W_k,  v_t = x_t W_v + b_v                      split into H heads of K = D / H
    s_{t,h} = q_h · k_{t,h} / sqrt(K)                          q_h ∈ R^K a parameter
    a_{t,h} = Σ_{i≤t} e^{s_{i,h}} v_{i,h} / Σ_{i≤t} e^{s_{i,h}}                 (zoo.ops.softmax_scan)
    Aaren(x)_t = concat_h(a_{t,h}) W_o + b_o

The engine keeps the paper's state per head: the running max m, the denominator u and the numerator
w (a K-vector); ``apply`` runs its prefix scan (``"associative"``, also ``"auto"``) or ``lax.scan``
(``"sequential"``), and ``step`` one ⊕.

The paper evaluates Aaren by putting it in the place of the Transformers of existing models (RL,
event forecasting, time-series classification and forecasting), keeping the rest of each layer.
That layer is the Transformer encoder layer (Vaswani et al. 2017; torch's ``TransformerEncoderLayer``,
whose defaults are kept here: post-norm LayerNorm, ReLU feed-forward; ``norm_first=True`` gives the
pre-norm form and then a final LayerNorm)::

    post-norm:  h = LN_1(x + Aaren(x)),           y = LN_2(h + FF(h))
    pre-norm:   h = x + Aaren(LN_1(x)),           y = h + FF(LN_2(h))
    FF(z) = act(z W_1 + b_1) W_2 + b_2           act = ReLU or GeLU (exact)

(The authors' code, github:BorealisAI/aaren, could not be read from this machine; the block is the
paper's description, not a transcription of that code.) The registered recurrence maps float
[B, T, d_in] to [B, T, D]: an input projection ``w_in`` when d_in ≠ D, then ``n_layers`` layers.

State: per layer ``{"max": [B, H], "denominator": [B, H], "numerator": [B, H, K]}``, float32, so
decoding costs O(n_layers · D) memory and time per token whatever the context (a KV cache grows with
it: experiments/bench/aaren_decode.py). ``reset`` starts a new segment (the state is dropped);
``reverse`` runs time backwards. In bfloat16 compute the products take bfloat16 operands, except the
scores: they are x_t · (W_k q_h), one [D, H] product in float32 (see ``scores_and_values``); the
residual stream, the norms and the scan stay float32 too, and the output is cast back.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.combinators import layer_norm, norm_init
from zoo.contract import make_recurrence
from zoo.models._common import dense_init
from zoo.models._matrix_common import check_positive_ints, merge_heads, split_heads
from zoo.models.rglru import accumulation_dtype, dense
from zoo.ops import softmax_scan
from zoo.registry import register

ACTIVATIONS = ("relu", "gelu")
MODES = softmax_scan.MODES


@dataclasses.dataclass(frozen=True)
class AarenConfig:
    d_model: int = 16               # D
    n_heads: int = 2                # H; each head has its own learned query of K = D / H
    n_layers: int = 1               # tiny default (the harness's budget); the paper stacks several
    d_ff: int = 32                  # feed-forward hidden width
    activation: str = "relu"        # "relu" or "gelu" (torch TransformerEncoderLayer's choices)
    norm_first: bool = False        # False: post-norm (the original Transformer); True: pre-norm
    norm_eps: float = 1e-5

    def __post_init__(self):
        check_positive_ints("aaren", self, ("d_model", "n_heads", "n_layers", "d_ff"))
        if self.d_model % self.n_heads:
            raise ValueError(f"aaren: d_model = {self.d_model} must be a multiple of "
                             f"n_heads = {self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"aaren: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.norm_first, bool):
            raise ValueError(f"aaren: norm_first must be a bool, got {self.norm_first!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"aaren: norm_eps must be a positive number, got {self.norm_eps!r}")


def state_size(config: AarenConfig) -> int:
    return config.n_layers * (2 * config.n_heads + config.d_model)


# --------------------------------------------------------------------------------------------
# The Aaren module.


def aaren_init(key, d: int, n_heads: int) -> dict:
    k_q, k_k, k_v, k_o = jax.random.split(key, 4)
    zeros = jnp.zeros((d,), jnp.float32)
    # Unit-variance query: with unit-variance keys the scores q·k / sqrt(K) start near N(0, 1).
    return {"query": jax.random.normal(k_q, (n_heads, d // n_heads), jnp.float32),
            "w_k": dense_init(k_k, d, d), "w_v": dense_init(k_v, d, d), "b_v": zeros,
            "w_o": dense_init(k_o, d, d), "b_o": zeros}


def score_vectors(params) -> jax.Array:
    """[D, H]: column h is W_k's head-h block times q_h / sqrt(K), so that s_{t,h} = x_t · column h."""
    query = params["query"].astype(jnp.float32)
    heads, width = query.shape
    w_k = params["w_k"].astype(jnp.float32).reshape(-1, heads, width)
    return jnp.einsum("dhk,hk->dh", w_k, query) / math.sqrt(width)


def scores_and_values(params, x, dtype):
    """x [..., D] -> scores [..., H] and values [..., H, K], float32 (float64 for float64 x).

    The scores are taken in float32 whatever the compute dtype, as x_t · (W_k q_h): with a learned
    query the key projection only enters through these H vectors. The exponentials of the softmax
    turn an absolute error in a score into a relative error of its weight, and a bfloat16 product
    (x and W_k rounded, then k, then q·k with cancellation) moves a score by ~1% of |k||q|; the state's
    running max m is a score itself. One [D, H] float32 product per token costs little next to the
    [D, D] value projection, which stays in ``dtype``.
    """
    acc = accumulation_dtype(x.dtype)
    s = x.astype(acc) @ score_vectors(params).astype(acc)
    v = split_heads(dense(x, params["w_v"], params["b_v"], dtype=dtype), params["query"].shape[0])
    return s, v


def aaren_initial_state(params, batch: int) -> dict:
    heads, width = params["query"].shape
    return softmax_scan.initial_state(batch, heads, width)


def aaren_step(params, state, x_t, dtype):
    state, o_t = softmax_scan.step(state, *scores_and_values(params, x_t, dtype))
    return state, dense(merge_heads(o_t), params["w_o"], params["b_o"], dtype)


def aaren_apply(params, x, state, reset, mode, reverse, dtype):
    s, v = scores_and_values(params, x, dtype)
    o, state = softmax_scan.apply(s, v, initial_state=state, reset=reset, reverse=reverse, mode=mode)
    return dense(merge_heads(o), params["w_o"], params["b_o"], dtype), state


# --------------------------------------------------------------------------------------------
# The layer: Aaren + residual + LayerNorm + feed-forward.


def layer_init(key, config: AarenConfig) -> dict:
    k_a, k_1, k_2 = jax.random.split(key, 3)
    d, f = config.d_model, config.d_ff
    return {"aaren": aaren_init(k_a, d, config.n_heads), "norm_1": norm_init("layer", d),
            "w_ff1": dense_init(k_1, d, f), "b_ff1": jnp.zeros((f,), jnp.float32),
            "w_ff2": dense_init(k_2, f, d), "b_ff2": jnp.zeros((d,), jnp.float32),
            "norm_2": norm_init("layer", d)}


def feed_forward(params, h, activation: str, dtype):
    act = jax.nn.relu if activation == "relu" else (lambda z: jax.nn.gelu(z, approximate=False))
    return dense(act(dense(h, params["w_ff1"], params["b_ff1"], dtype)), params["w_ff2"], params["b_ff2"],
                 dtype)


def layer_around(params, x, mix, config: AarenConfig, dtype):
    """The residual layer around ``mix`` (the Aaren module as a function of its input) on the float32
    stream x; returns (y, whatever ``mix`` returns besides its output)."""
    norm = lambda name, z: layer_norm(params[name], z, eps=config.norm_eps)
    ff = lambda z: feed_forward(params, z, config.activation, dtype)
    if config.norm_first:
        a, extra = mix(norm("norm_1", x))
        h = x + a
        return h + ff(norm("norm_2", h)), extra
    a, extra = mix(x)
    h = norm("norm_1", x + a)
    return norm("norm_2", h + ff(h)), extra


# --------------------------------------------------------------------------------------------
# The stack as a Recurrence.


@register("aaren", config=AarenConfig, paper="Attention as an RNN", engine="softmax_scan", modes=MODES,
          state_size=state_size)
def build(config: AarenConfig):
    d = config.d_model

    def init(key, d_in):
        k_in, k_layers = jax.random.split(key)
        params = {"layers": tuple(layer_init(k, config) for k in jax.random.split(k_layers, config.n_layers))}
        if d_in != d:
            params["w_in"] = dense_init(k_in, d_in, d)
        if config.norm_first:
            params["final_norm"] = norm_init("layer", d)
        return params

    def read(params, x):
        """The residual stream: float32 (float64 for float64 x) whatever the compute dtype."""
        return dense(x, params["w_in"]) if "w_in" in params else x.astype(accumulation_dtype(x.dtype))

    def finish(params, h, dtype):
        if config.norm_first:
            h = layer_norm(params["final_norm"], h, eps=config.norm_eps)
        return h.astype(dtype)

    def initial_state(params, batch):
        return tuple(aaren_initial_state(p["aaren"], batch) for p in params["layers"])

    def step(params, state, x_t):
        h, new = read(params, x_t), []
        for p, s in zip(params["layers"], state, strict=True):
            h, s = layer_around(p, h, lambda z, p=p, s=s: aaren_step(p["aaren"], s, z, x_t.dtype)[::-1],
                                config, x_t.dtype)
            new.append(s)
        return tuple(new), finish(params, h, x_t.dtype)

    def apply(params, xs, state, reset, mode, reverse):
        h, final = read(params, xs), []
        for p, s in zip(params["layers"], state, strict=True):
            h, s = layer_around(
                p, h, lambda z, p=p, s=s: aaren_apply(p["aaren"], z, s, reset, mode, reverse, xs.dtype),
                config, xs.dtype)
            final.append(s)
        return finish(params, h, xs.dtype), tuple(final)

    def input_width(params):
        return params["w_in"].shape[0] if "w_in" in params else d

    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("aaren", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=input_width, modes=MODES, default_d_in=d)
