"""GLA: the gated linear attention token mixer.

Paper: S. Yang, B. Wang, Y. Shen, R. Panda, Y. Kim, "Gated Linear Attention Transformers with
Hardware-Efficient Training" (ICML 2024, arXiv 2312.06635), §4.1 and §4.4. The layer follows FLA's
``GatedLinearAttention`` (fla-org/flash-linear-attention, ``fla/layers/gla.py``), the form its
kernels and checkpoints use. With x_t ∈ R^{d_in}, H heads, key width K = expand_k · d_model / H and
value width V = expand_v · d_model / H per head::

    q_t = W_q x_t,  k_t = W_k x_t,  v_t = W_v x_t                      split into H heads, no biases
    log α_t = logsigmoid(W_2 W_1 x_t + b) / τ                           W_2 W_1 of rank r, τ = 16
    S_t = Diag(α_t) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / sqrt(K)      per head (zoo.ops.gla, matrix engine)
    y_t = W_o (RMSNorm_head(o_t) ⊙ w ⊙ swish(W_g x_t))                 w [V]: one scale shared by the heads

``clamp_min`` (FLA's option) floors log α_t; ``use_output_gate=False`` drops the swish gate (then
y_t = W_o (RMSNorm_head(o_t) ⊙ w)). ``use_short_conv=True`` (FLA's option, off by default as there)
replaces q, k, v by SiLU(conv1d_C([W_q x, W_k x, W_v x])_t): a causal depthwise convolution of
``conv_size`` = C taps over the projections (FLA's ``ShortConvolution`` with its SiLU, one per
projection; depthwise, so one convolution over the three side by side is the same), as in
DeltaNet. It lets one layer pair a token with the ones just before it (a key with its value in MQAR).

State: S [B, H, K, V], float32; with ``use_short_conv`` the pair (window [B, C − 1, 2HK + HV], S).
``step`` runs the op for one token (``run_op_one_token``), ``apply`` the op over the sequence in its
chunked (``"auto"``; chunk ``chunk_size``), parallel or sequential mode.

Differences from FLA, and why:

* The paper writes the normalisation of each head's o_t as a LayerNorm (after RetNet's GroupNorm);
  FLA, and this file, use RMSNorm per head with one scale w shared by the heads (FLA's
  ``FusedRMSNormGated(head_v_dim)``), so FLA's weights load as they are.
* Not offered: FLA's feature maps on q and k (``feature_map``, none by default) and grouped
  key/value heads (``num_kv_heads``).
* Projections are LeCun-normal (zoo's default) rather than FLA's normal(0, 0.02); the gate bias
  starts at 0 (log α = -log 2 / 16, α ≈ 0.958).
* Dtypes: projections run in the compute dtype (the input's); the gate, the norm and the output
  gate in float32; the recurrence accumulates in float32. The state is float32.

A stack for decoding (``lm``-style, any depth): the combinators compose this mixer, e.g. four
pre-norm residual blocks (mixer + SwiGLU MLP) whose ``step`` carries every layer's state::

    rec = zoo.stack(*[zoo.residual(zoo.get("gla", d_model=D))] * 4)

and ``zoo.nn.SequenceModel("gla", vocab_size=..., d_model=D, n_layers=4, d_output=vocab, rngs=...)``
adds the token embedding, final RMSNorm and head (with ``step`` for decoding).
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
    check_bools,
    check_positive_float,
    check_positive_int,
    engine_mode,
    head_norm,
    mixer_state_size,
    project,
    qkv_projection,
    run_op,
    run_op_one_token,
    short_conv_apply,
    short_conv_step,
    split_heads,
)
from zoo.models.mamba2 import conv_init
from zoo.ops.matrix import MODES
from zoo.registry import register

PAPER = "Gated Linear Attention Transformers with Hardware-Efficient Training"


# --------------------------------------------------------------------------------------------
# GLA.


@dataclasses.dataclass(frozen=True)
class GLAConfig(ExpandedHeadWidths):
    d_model: int = 16
    n_heads: int = 2
    expand_k: float = 0.5            # key width H * K = expand_k * d_model (FLA's default)
    expand_v: float = 1.0            # value width H * V = expand_v * d_model
    gate_low_rank_dim: int = 4       # r of W_2 W_1 (FLA's default is 16, for d_model = 1024 and up)
    gate_logit_normalizer: float = 16.0   # τ
    clamp_min: float | None = None   # floor of log α (FLA's option; None: no floor)
    use_output_gate: bool = True
    use_short_conv: bool = False     # FLA's default
    conv_size: int = 4
    conv_bias: bool = False
    norm_eps: float = 1e-5
    chunk_size: int = 8              # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("gla", self.chunk_size)
        for name in ("d_model", "n_heads", "gate_low_rank_dim", "conv_size"):
            check_positive_int("gla", name, getattr(self, name))
        check_bools("gla", self, ("use_output_gate", "use_short_conv", "conv_bias"))
        for name in ("expand_k", "expand_v", "gate_logit_normalizer", "norm_eps"):
            check_positive_float("gla", name, getattr(self, name))
        self.check_head_widths("gla")
        if self.clamp_min is not None and (isinstance(self.clamp_min, bool)
                                           or not isinstance(self.clamp_min, (int, float))
                                           or not self.clamp_min < 0):
            raise ValueError(f"gla: clamp_min must be None or a negative float (a floor on log α), "
                             f"got {self.clamp_min!r}")


def init(key: jax.Array, d_in: int, config: GLAConfig) -> dict:
    keys = jax.random.split(key, 8)
    dk, dv, r = config.key_dim, config.value_dim, config.gate_low_rank_dim
    params = {
        "w_q": dense_init(keys[0], d_in, dk),
        "w_k": dense_init(keys[1], d_in, dk),
        "w_v": dense_init(keys[2], d_in, dv),
        "w_gk1": dense_init(keys[3], d_in, r),
        "w_gk2": dense_init(keys[4], r, dk),
        "b_gk": jnp.zeros((dk,), jnp.float32),
        "norm_scale": jnp.ones((dv // config.n_heads,), jnp.float32),
        "w_o": dense_init(keys[5], dv, config.d_model),
    }
    if config.use_output_gate:
        params["w_g"] = dense_init(keys[6], d_in, dv)
    if config.use_short_conv:
        params.update(conv_init(keys[7], config.conv_size, 2 * dk + dv, config.conv_bias))
    return params


def log_decay(params: dict, x: jax.Array, config: GLAConfig) -> jax.Array:
    """log α = logsigmoid(W_2 W_1 x + b) / τ (floored at clamp_min), float32, [..., H * K]."""
    logits = project(project(x, params["w_gk1"]), params["w_gk2"], params["b_gk"]).astype(jnp.float32)
    g = jax.nn.log_sigmoid(logits) / config.gate_logit_normalizer
    return g if config.clamp_min is None else jnp.maximum(g, config.clamp_min)


def recurrence_inputs(params: dict, x: jax.Array, config: GLAConfig, qkv: jax.Array | None = None):
    """(q, k, v, log α) split into heads, for x [..., d_in]. ``qkv``: the projections after the short
    convolution and its SiLU (``use_short_conv``); without one, ``qkv_projection(params, x)``."""
    if qkv is None:
        if config.use_short_conv:
            raise ValueError("gla.recurrence_inputs: with use_short_conv, pass qkv (the convolution needs "
                             "its window state: use the Recurrence's step or apply)")
        qkv = qkv_projection(params, x)
    h = config.n_heads
    q, k, v = jnp.split(qkv, (config.key_dim, 2 * config.key_dim), axis=-1)
    log_alpha = log_decay(params, x, config)
    return split_heads(q, h), split_heads(k, h), split_heads(v, h), split_heads(log_alpha, h)


def read_out(params: dict, o: jax.Array, x: jax.Array, config: GLAConfig) -> jax.Array:
    """W_o (RMSNorm_head(o) ⊙ w ⊙ swish(W_g x)): norm and gate in float32, W_o in x's dtype."""
    scale = jnp.tile(params["norm_scale"], config.n_heads)
    y = head_norm(o.astype(jnp.float32), scale, kind="rms", eps=config.norm_eps)
    if config.use_output_gate:
        y = y * jax.nn.silu(project(x, params["w_g"]).astype(jnp.float32))
    return project(y.astype(x.dtype), params["w_o"])


def _state_size(c: GLAConfig) -> int:
    return mixer_state_size(c, c.key_dim, c.value_dim)      # the window (with use_short_conv) and S


@register("gla", config=GLAConfig, paper=PAPER, engine="matrix", modes=MODES, state_size=_state_size)
def build(config: GLAConfig):
    heads, dk, dv = config.n_heads, config.key_dim // config.n_heads, config.value_dim // config.n_heads

    conv_width = 2 * config.key_dim + config.value_dim

    def initial_state(params, batch):
        S = jnp.zeros((batch, heads, dk, dv), jnp.float32)
        if config.use_short_conv:
            return jnp.zeros((batch, config.conv_size - 1, conv_width), jnp.float32), S
        return S

    def step(params, state, x_t):
        qkv = qkv_projection(params, x_t)
        S = state
        if config.use_short_conv:
            window, S = state
            window, qkv = short_conv_step(params, window, qkv)
        o, S = run_op_one_token(ops.gla, *recurrence_inputs(params, x_t, config, qkv), state=S)
        return ((window, S) if config.use_short_conv else S), read_out(params, o, x_t, config)

    def apply(params, xs, state, reset, mode, reverse):
        qkv = qkv_projection(params, xs)
        S = state
        if config.use_short_conv:
            window, S = state
            qkv, window = short_conv_apply(params, qkv, window, reset, reverse)
        o, S = run_op(ops.gla, *recurrence_inputs(params, xs, config, qkv), state=S, reset=reset,
                      mode=engine_mode(mode), reverse=reverse, chunk_size=config.chunk_size)
        return read_out(params, o, xs, config), ((window, S) if config.use_short_conv else S)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("gla", init=lambda key, d_in: init(key, d_in, config), initial_state=initial_state,
                           step=step, apply=apply, input_width=lambda p: p["w_q"].shape[0], modes=MODES,
                           default_d_in=config.d_model)

