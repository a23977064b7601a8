"""Griffin and Hawk: residual stacks of RG-LRU recurrent blocks and local multi-query attention.

Paper: S. De, S. L. Smith, A. Fernando, et al., "Griffin: Mixing Gated Linear Recurrences with Local
Attention for Efficient Language Models" (arXiv 2402.19427, 2024), Sections 2 and 3. Numerical
reference: google-deepmind/recurrentgemma (``recurrentgemma.jax.griffin.Griffin`` and
``modules``), whose conventions are kept so that ``zoo.convert.from_recurrentgemma`` reproduces its
logits.

Each residual block (x_t ∈ R^D, D = d_model)::

    r = x + Temporal(RMSNorm(x))                Temporal: recurrent block or local attention
    y = r + MLP(RMSNorm(r))                     MLP(z) = W_down (GeLU(W_gate z + b) ⊙ (W_up z + b)) + b

* Recurrent block: ``zoo.models.rglru`` (GeLU branch ⊙ RG-LRU(Conv1D_4(Linear x)), then Linear).
* Local attention: multi-query (H query heads of width K = D/H, one key/value head), RoPE on the
  first half of each head (base 10 000), each token attending to itself and the ``window`` tokens
  before it (``zoo.ops.softmax``); ``o = W_o concat_h(o_h) + b_o``.
* ``block_types`` gives the pattern, e.g. Griffin's ("recurrent", "recurrent", "attention")
  repeated; ``hawk`` is the all-recurrent stack.

The registered recurrences map float [B, T, d_in] to [B, T, D]: an input projection ``w_in`` when
d_in ≠ D (none for d_in = D, the language-model case), the blocks, and the final RMSNorm. The
language model around them (``lm_init``, ``lm_apply``, ``lm_step``)::

    x = E[tokens] · sqrt(D)   (sqrt(D) rounded to bfloat16, as recurrentgemma does "to match training")
    logits = cap · tanh((Backbone(x) Eᵀ) / cap)          (no cap when logits_soft_cap = 0)

State, per block: the recurrent block's conv window [B, 3, d_rnn], RG-LRU ``h`` [B, d_rnn] and
segment-start flag [B] (see ``zoo.models.rglru``); the attention block's last ``window`` keys and
values [B, W, 1, K] and their weights [B, W]. Decoding one token costs O(window) whatever the length.

Compute dtype: the input's. In bfloat16 the products (projections, gates, MLP) run on bfloat16
operands; the residual stream, the norms, the convolution, the gates' nonlinearities, the RG-LRU
scan and the attention softmax run in float32, and the output is cast back. This keeps the
rounding error near its floor: on the harness's random data, rounding only the inputs and weights
of a random-weight 3-block stack to bfloat16 already moves its outputs by about 1% of their
largest value.

What differs from recurrentgemma, and why:

* RMSNorm stores its multiplier ``scale`` (1 at init); recurrentgemma stores ``scale - 1``.
* The attention cache is a sliding window without positions; RoPE is applied by relative offset
  (``zoo.ops.softmax``), so no integer position is part of the state and long sequences do not lose
  float32 precision in the rotary angles. Scores agree with recurrentgemma's absolute-position form
  up to rounding.
* Packed sequences use ``reset`` (True where recurrentgemma's ``segment_pos`` is 0).
* recurrentgemma's gradient checkpointing (``nn.remat`` per block) is left to the caller
  (``jax.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models.rglru import (
    accumulation_dtype,
    check_radii,
    check_widths,
    dense,
    recurrent_block_apply,
    recurrent_block_init,
    recurrent_block_initial_state,
    recurrent_block_state_size,
    recurrent_block_step,
)
from zoo.ops import diagonal, softmax
from zoo.registry import register

BLOCK_TYPES = ("recurrent", "attention")
MODES = diagonal.MODES
PAPER = "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models"
ROPE_BASE = 10_000.0


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    d_model: int = 16
    d_rnn: int = 16                  # RG-LRU width (recurrentgemma's lru_width)
    d_mlp: int = 48                  # MLP hidden width (3 · d_model in the papers)
    n_heads: int = 2                 # attention heads, and blocks of the RG-LRU gates
    block_types: tuple[str, ...] = ("recurrent", "attention")   # Griffin repeats (R, R, A)
    window: int = 4                  # attention sees itself and the `window` tokens before it
    conv_width: int = 4
    min_rad: float = 0.9
    max_rad: float = 0.999
    chunk_size: int = 64             # RG-LRU steps per chunk in mode="chunked"
    vocab_size: int = 64             # the language-model functions only (lm_init, lm_apply, lm_step)
    scale_embeddings: bool = True
    logits_soft_cap: float = 30.0

    def __post_init__(self):
        validate(self, "griffin")


@dataclasses.dataclass(frozen=True)
class HawkConfig:
    d_model: int = 16
    d_rnn: int = 16
    d_mlp: int = 48
    n_heads: int = 2                 # blocks of the RG-LRU gates
    n_layers: int = 1                # tiny default; the papers stack tens of blocks
    conv_width: int = 4
    min_rad: float = 0.9
    max_rad: float = 0.999
    chunk_size: int = 64
    vocab_size: int = 64
    scale_embeddings: bool = True
    logits_soft_cap: float = 30.0

    @property
    def block_types(self) -> tuple[str, ...]:
        return ("recurrent",) * self.n_layers

    @property
    def window(self) -> int:
        return 1                     # no attention block reads it

    def __post_init__(self):
        if isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"hawk: n_layers must be a positive int, got {self.n_layers!r}")
        validate(self, "hawk")


def validate(config, model: str) -> None:
    check_chunk_size(model, config.chunk_size)
    for field in ("d_model", "d_rnn", "d_mlp", "conv_width", "vocab_size"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{model}: {field} must be a positive int, got {value!r}")
    check_widths(model, config.d_rnn, config.n_heads)
    check_radii(model, config.min_rad, config.max_rad)
    kinds = config.block_types
    if not isinstance(kinds, tuple) or not kinds or any(k not in BLOCK_TYPES for k in kinds):
        raise ValueError(f"{model}: block_types must be a non-empty tuple of {BLOCK_TYPES}, got {kinds!r}")
    if "attention" in kinds:
        if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 4:
            raise ValueError(f"{model}: d_model = {config.d_model} must be n_heads = {config.n_heads} times "
                             f"a head width divisible by 4 (RoPE rotates half of each head, in two halves)")
        if isinstance(config.window, bool) or not isinstance(config.window, int) or config.window < 1:
            raise ValueError(f"{model}: window must be a positive int, got {config.window!r}")
    if config.logits_soft_cap < 0:
        raise ValueError(f"{model}: logits_soft_cap must be >= 0 (0: no cap), got {config.logits_soft_cap}")


def state_size(config) -> int:
    head = config.d_model // config.n_heads
    sizes = {"recurrent": recurrent_block_state_size(config.d_rnn, config.conv_width),
             "attention": config.window * (2 * head + 1)}
    return sum(sizes[kind] for kind in config.block_types)


# --------------------------------------------------------------------------------------------
# Local multi-query attention block.


def attention_init(key, d: int, n_heads: int, out_scale: float) -> dict:
    k_q, k_k, k_v, k_o = jax.random.split(key, 4)
    head = d // n_heads
    return {"w_q": dense_init(k_q, d, d), "w_k": dense_init(k_k, d, head), "w_v": dense_init(k_v, d, head),
            "w_o": dense_init(k_o, d, d) * math.sqrt(out_scale), "b_o": jnp.zeros((d,), jnp.float32)}


def _qkv(params, x, n_heads, dtype):
    head = params["w_k"].shape[1]
    q = dense(x, params["w_q"], dtype=dtype).reshape(*x.shape[:-1], n_heads, head)
    k = dense(x, params["w_k"], dtype=dtype)[..., None, :]
    v = dense(x, params["w_v"], dtype=dtype)[..., None, :]
    return q, k, v


def _rope(params):
    return softmax.Rope(dims=params["w_k"].shape[1] // 2, base=ROPE_BASE)


def attention_initial_state(params, batch: int, window: int) -> dict:
    head = params["w_k"].shape[1]
    return softmax.initial_state(batch, window, 1, head, head)


def attention_step(params, state, x_t, n_heads: int, dtype):
    q, k, v = _qkv(params, x_t, n_heads, dtype)
    state, o = softmax.step(state, q, k, v, rope=_rope(params))
    return state, dense(o.reshape(x_t.shape[0], -1), params["w_o"], params["b_o"], dtype)


def attention_apply(params, x, state, reset, mode, reverse, n_heads: int, dtype):
    """x [B, T, D] -> (out [B, T, D] in float32, final state); products with operands in ``dtype``."""
    q, k, v = _qkv(params, x, n_heads, dtype)
    o, state = softmax.apply(q, k, v, initial_state=state, reset=reset, reverse=reverse,
                             mode="sequential" if mode == "sequential" else "chunked", rope=_rope(params))
    return dense(o.reshape(*x.shape[:2], -1), params["w_o"], params["b_o"], dtype), state


# --------------------------------------------------------------------------------------------
# Gated MLP and the residual block.


def mlp_init(key, d: int, d_mlp: int, out_scale: float) -> dict:
    k_g, k_u, k_d = jax.random.split(key, 3)
    zeros = lambda n: jnp.zeros((n,), jnp.float32)
    return {"w_gate": dense_init(k_g, d, d_mlp), "b_gate": zeros(d_mlp),
            "w_up": dense_init(k_u, d, d_mlp), "b_up": zeros(d_mlp),
            "w_down": dense_init(k_d, d_mlp, d) * math.sqrt(out_scale), "b_down": zeros(d)}


def mlp_apply(params, x, dtype):
    hidden = jax.nn.gelu(dense(x, params["w_gate"], params["b_gate"], dtype), approximate=True)
    return dense(hidden * dense(x, params["w_up"], params["b_up"], dtype), params["w_down"], params["b_down"],
                 dtype)


def _norm_init(d):
    return {"scale": jnp.ones((d,), jnp.float32)}


def rms_norm(params, x, eps: float = 1e-6):
    """x / sqrt(mean(x²) + eps) · scale over the last axis, in float32 (float64 for float64 x)."""
    x = x.astype(accumulation_dtype(x.dtype))
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * params["scale"].astype(x.dtype)


def block_init(key, kind: str, config) -> dict:
    k_t, k_m = jax.random.split(key)
    d, out_scale = config.d_model, 2.0 / len(config.block_types)
    if kind == "recurrent":
        temporal = recurrent_block_init(k_t, d, config.d_rnn, d, config.n_heads, config.conv_width,
                                        config.min_rad, config.max_rad, out_scale)
    else:
        temporal = attention_init(k_t, d, config.n_heads, out_scale)
    return {"temporal_norm": _norm_init(d), "temporal": temporal,
            "mlp_norm": _norm_init(d), "mlp": mlp_init(k_m, d, config.d_mlp, out_scale)}


def _around_temporal(params, x, y, dtype):
    """The residual adds and the MLP, on the float32 residual stream x; y is the temporal output."""
    r = y + x
    return mlp_apply(params["mlp"], rms_norm(params["mlp_norm"], r), dtype) + r


def block_initial_state(params, kind: str, batch: int, config):
    if kind == "recurrent":
        return recurrent_block_initial_state(params["temporal"], batch)
    return attention_initial_state(params["temporal"], batch, config.window)


def block_step(params, kind: str, state, x_t, config, dtype):
    normed = rms_norm(params["temporal_norm"], x_t)
    if kind == "recurrent":
        state, y = recurrent_block_step(params["temporal"], state, normed, dtype)
    else:
        state, y = attention_step(params["temporal"], state, normed, config.n_heads, dtype)
    return state, _around_temporal(params, x_t, y, dtype)


def block_apply(params, kind: str, x, state, reset, mode, reverse, config, dtype):
    normed = rms_norm(params["temporal_norm"], x)
    if kind == "recurrent":
        y, state = recurrent_block_apply(params["temporal"], normed, state, reset, mode, reverse,
                                         chunk_size=config.chunk_size, dtype=dtype)
    else:
        y, state = attention_apply(params["temporal"], normed, state, reset, mode, reverse, config.n_heads,
                                   dtype)
    return _around_temporal(params, x, y, dtype), state


# --------------------------------------------------------------------------------------------
# The stack as a Recurrence.


def build_backbone(config, name: str):
    kinds, d = config.block_types, config.d_model

    def init(key, d_in):
        k_in, k_blocks = jax.random.split(key)
        keys = jax.random.split(k_blocks, len(kinds))
        params = {"blocks": tuple(block_init(k, kind, config) for k, kind in zip(keys, kinds, strict=True)),
                  "final_norm": _norm_init(d)}
        if d_in != d:
            params["w_in"] = dense_init(k_in, d_in, d)
        return params

    def read(params, x):
        """The residual stream, float32 whatever the compute dtype (see the module docstring)."""
        return dense(x, params["w_in"]) if "w_in" in params else x.astype(accumulation_dtype(x.dtype))

    def initial_state(params, batch):
        return tuple(block_initial_state(p, kind, batch, config)
                     for p, kind in zip(params["blocks"], kinds, strict=True))

    def step(params, state, x_t):
        h, new = read(params, x_t), []
        for p, kind, s in zip(params["blocks"], kinds, state, strict=True):
            s, h = block_step(p, kind, s, h, config, x_t.dtype)
            new.append(s)
        return tuple(new), rms_norm(params["final_norm"], h).astype(x_t.dtype)

    def apply(params, xs, state, reset, mode, reverse):
        h, final = read(params, xs), []
        for p, kind, s in zip(params["blocks"], kinds, state, strict=True):
            h, s = block_apply(p, kind, h, s, reset, mode, reverse, config, xs.dtype)
            final.append(s)
        return rms_norm(params["final_norm"], h).astype(xs.dtype), tuple(final)

    def input_width(params):
        return params["w_in"].shape[0] if "w_in" in params else d

    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=input_width, modes=MODES, default_d_in=d)


@register("griffin", config=GriffinConfig, paper=PAPER, engine="diagonal+softmax", modes=MODES,
          state_size=state_size)
def build(config: GriffinConfig):
    return build_backbone(config, "griffin")


@register("hawk", config=HawkConfig, paper=PAPER, engine="diagonal", modes=MODES, state_size=state_size)
def build_hawk(config: HawkConfig):
    return build_backbone(config, "hawk")


# --------------------------------------------------------------------------------------------
# The language model: tokens -> logits, with the embedding tied to the read-out.


def lm_init(key, config) -> dict:
    """``{"embedding": [vocab, D], "backbone": ...}`` for a GriffinConfig or HawkConfig."""
    k_e, k_b = jax.random.split(key)
    backbone = build_backbone(config, "lm")
    shape = (config.vocab_size, config.d_model)
    embedding = jax.random.normal(k_e, shape, jnp.float32) / math.sqrt(config.d_model)
    return {"embedding": embedding, "backbone": backbone.init(k_b, config.d_model)}


def _check_tokens(tokens, arg: str, rank: int):
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or np.ndim(tokens) != rank:
        letters = "[B, T]" if rank == 2 else "[B]"
        raise ValueError(f"griffin lm: {arg} must be an integer array {letters}, got shape "
                         f"{np.shape(tokens)} and dtype {dtype or type(tokens).__name__}")


def embed(config, embedding, tokens, dtype=jnp.float32):
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if config.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(config.d_model), jnp.bfloat16).astype(dtype)
    return x


def read_out(config, embedding, features):
    logits = features @ embedding.astype(features.dtype).T
    cap = config.logits_soft_cap
    return cap * jnp.tanh(logits / cap) if cap else logits


def lm_initial_state(config, params, batch: int):
    return build_backbone(config, "lm").initial_state(params["backbone"], batch)


def lm_apply(config, params, tokens, state=None, reset=None, mode: str = "auto", dtype=jnp.float32):
    """tokens int [B, T] -> (logits [B, T, vocab] in ``dtype``, final state)."""
    _check_tokens(tokens, "tokens", 2)
    features, state = build_backbone(config, "lm").apply(params["backbone"],
                                                         embed(config, params["embedding"], tokens, dtype),
                                                         state=state, reset=reset, mode=mode)
    return read_out(config, params["embedding"], features), state


def lm_step(config, params, state, token_t, dtype=jnp.float32):
    """One token per row: token_t int [B] -> (new state, logits [B, vocab])."""
    _check_tokens(token_t, "token_t", 1)
    state, features = build_backbone(config, "lm").step(params["backbone"], state,
                                                        embed(config, params["embedding"], token_t, dtype))
    return state, read_out(config, params["embedding"], features)
