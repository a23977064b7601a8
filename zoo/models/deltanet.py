"""DeltaNet: linear attention whose memory is written by the delta rule.

Paper: S. Yang, B. Wang, Y. Zhang, Y. Shen, Y. Kim, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length" (NeurIPS 2024, arXiv:2406.06484); the delta-rule memory itself is
from I. Schlag, K. Irie, J. Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers"
(ICML 2021). The layer follows FLA's ``DeltaNet`` (fla-org/flash-linear-attention,
``fla/layers/delta_net.py``) with its defaults (``use_short_conv=True``, ``qk_activation="silu"``,
``qk_norm="l2"``, ``use_beta=True``). With H heads, K = expand_k · d_model / H and
V = expand_v · d_model / H per head::

    [q̃, k̃, ṽ]_t = SiLU(conv1d_C([W_q x, W_k x, W_v x])_t)            depthwise causal conv, C = conv_size
    q_t = q̃_t / ‖q̃_t‖,  k_t = k̃_t / ‖k̃_t‖,  v_t = ṽ_t               per head (FLA's l2norm, eps 1e-6)
    β_t = sigmoid(W_β x_t)                                             one per head (×2 with allow_neg_eigval)
    S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,  o_t = S_tᵀ q_t / √K      (zoo.ops.delta)
    y_t = W_o RMSNorm_head(o_t) ⊙ w                                    w [V] shared by the heads
    y_t = W_o (RMSNorm_head(o_t) ⊙ w ⊙ SiLU(W_g x_t))                  with use_gate (FLA's FusedRMSNormGated)

``use_short_conv=False`` replaces the convolutions by a plain SiLU (FLA's fallback); ``use_beta=False``
fixes β = 1.

State: ``(conv_window [B, C-1, 2HK + HV], S [B, H, K, V])`` (just ``(S,)`` without the short
convolutions), float32: the three convolutions are one depthwise convolution over the concatenated
[q | k | v] channels (``zoo.ops.conv1d``), and S is the delta-rule memory (``zoo.ops.delta_ops``,
FLA's layout). ``step`` runs the op for one token (``run_op_one_token``); ``apply`` runs it in its
chunked form (``"auto"``; the WY/UT chunk algorithm of the paper, chunk ``chunk_size``) or its
sequential form. ``reset`` drops both parts of the state, ``reverse`` runs time backwards through
both.

Differences from FLA, and why:

* Parameters are stored input-major (``x @ w``), the torch weights transposed; the three short
  convolutions are stored as one [C, 2HK + HV] kernel (torch's three [channels, 1, C] transposed and
  concatenated). Projections are LeCun-normal (zoo's default) instead of FLA's normal(0, 0.02); the
  convolution keeps torch's uniform(±1/√C).
* Not offered: the other q/k activations and ``qk_norm="sum"``.
* Dtypes: projections and the convolution run in the compute dtype (the input's); β, v, the output
  o of the recurrence, the norm and the output gate in float32 (FLA rounds o to bfloat16 before its
  norm; see ``split_qkv``); the recurrence accumulates in float32.

The shared pieces (projection, convolution, read-out, the recurrence builder) are used by
``gated_deltanet`` too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import (
    ExpandedHeadWidths,
    check_bools,
    check_positive_float,
    check_positive_ints,
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
from zoo.ops import delta_ops
from zoo.registry import register

PAPER = "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
MODES = ("chunked", "sequential")


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig(ExpandedHeadWidths):
    d_model: int = 16
    n_heads: int = 2
    expand_k: float = 1.0            # key width H * K = expand_k * d_model (FLA's default)
    expand_v: float = 1.0            # value width H * V = expand_v * d_model
    use_beta: bool = True            # β = sigmoid(W_β x); False: β = 1
    use_gate: bool = False           # output gate SiLU(W_g x) after the norm (FLA's default: off)
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False   # β ∈ (0, 2): transitions with negative eigenvalues
    norm_eps: float = 1e-5
    chunk_size: int = 4              # steps per chunk in mode="chunked" (FLA's kernels use 64)

    def __post_init__(self):
        check_chunk_size("deltanet", self.chunk_size)
        check_positive_ints("deltanet", self, ("d_model", "n_heads", "conv_size"))
        for name in ("expand_k", "expand_v", "norm_eps"):
            check_positive_float("deltanet", name, getattr(self, name))
        check_bools("deltanet", self, ("use_beta", "use_gate", "use_short_conv", "conv_bias",
                                       "allow_neg_eigval"))
        self.check_head_widths("deltanet")


# --------------------------------------------------------------------------------------------
# Pieces shared with Gated DeltaNet.


def init_mixer(key: jax.Array, d_in: int, config, key_dim: int, value_dim: int) -> dict:
    """q, k, v projections, the short convolution, the output gate, norm and output projection."""
    keys = jax.random.split(key, 6)
    params = {
        "w_q": dense_init(keys[0], d_in, key_dim),
        "w_k": dense_init(keys[1], d_in, key_dim),
        "w_v": dense_init(keys[2], d_in, value_dim),
        "norm_scale": jnp.ones((value_dim // config.n_heads,), jnp.float32),
        "w_o": dense_init(keys[3], value_dim, config.d_model),
    }
    if config.use_short_conv:
        params.update(conv_init(keys[4], config.conv_size, 2 * key_dim + value_dim, config.conv_bias))
    if config.use_gate:
        params["w_g"] = dense_init(keys[5], d_in, value_dim)
    return params


def split_qkv(qkv: jax.Array, heads: int, key_dim: int):
    """[..., 2HK + HV] -> q, k [..., H, K], v [..., H, V]."""
    q, k, v = jnp.split(qkv, (key_dim, 2 * key_dim), axis=-1)
    # v in float32 makes the op return o in float32 (o has v's dtype): the per-head RMSNorm divides by
    # o's RMS, which magnifies a bfloat16 rounding of o wherever a head's output is small. The op
    # already runs q and k in float32 (after its l2norm) and accumulates in float32, so this costs
    # only the cast.
    v = v.astype(jnp.float32)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def read_out(params: dict, o: jax.Array, x: jax.Array, config) -> jax.Array:
    """W_o (RMSNorm_head(o) ⊙ w (⊙ SiLU(W_g x))): norm and gate in float32, W_o in x's dtype."""
    y = head_norm(o.astype(jnp.float32), jnp.tile(params["norm_scale"], config.n_heads), kind="rms",
                  eps=config.norm_eps)
    if config.use_gate:
        y = y * jax.nn.silu(project(x, params["w_g"]).astype(jnp.float32))
    return project(y.astype(x.dtype), params["w_o"])


def delta_recurrence(name: str, config, *, op: Callable, init: Callable, gates: Callable, key_dim: int,
                     value_dim: int):
    """The Recurrence of a delta-rule mixer: ``gates(params, x)`` gives the op's arguments after
    q, k, v ((β,) for DeltaNet, (g, β) for Gated DeltaNet), per token, float32."""
    heads = config.n_heads
    dk, dv = key_dim // heads, value_dim // heads
    conv_width = 2 * key_dim + value_dim
    op_kwargs = {"scale": dk ** -0.5, "use_qk_l2norm_in_kernel": True}

    def initial_state(params, batch):
        memory = jnp.zeros((batch, heads, dk, dv), jnp.float32)
        if config.use_short_conv:
            return jnp.zeros((batch, config.conv_size - 1, conv_width), jnp.float32), memory
        return (memory,)

    def step(params, state, x_t):
        qkv = qkv_projection(params, x_t)
        conv_state = ()
        if config.use_short_conv:
            window, qkv = short_conv_step(params, state[0], qkv)
            conv_state = (window,)
        else:
            qkv = jax.nn.silu(qkv)
        q, k, v = split_qkv(qkv, heads, key_dim)
        o, memory = run_op_one_token(op, q, k, v, *gates(params, x_t), state=state[-1], **op_kwargs)
        return (*conv_state, memory), read_out(params, o, x_t, config)

    def apply(params, xs, state, reset, mode, reverse):
        qkv = qkv_projection(params, xs)
        conv_state = ()
        if config.use_short_conv:
            qkv, window = short_conv_apply(params, qkv, state[0], reset, reverse)
            conv_state = (window,)
        else:
            qkv = jax.nn.silu(qkv)
        q, k, v = split_qkv(qkv, heads, key_dim)
        o, memory = run_op(op, q, k, v, *gates(params, xs), state=state[-1], reset=reset, mode=mode,
                           reverse=reverse, chunk_size=config.chunk_size, **op_kwargs)
        return read_out(params, o, xs, config), (*conv_state, memory)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_q"].shape[0], modes=MODES, default_d_in=config.d_model)


# --------------------------------------------------------------------------------------------
# DeltaNet.


def init(key: jax.Array, d_in: int, config: DeltaNetConfig) -> dict:
    k_mixer, k_beta = jax.random.split(key)
    params = init_mixer(k_mixer, d_in, config, config.key_dim, config.value_dim)
    if config.use_beta:
        params["w_b"] = dense_init(k_beta, d_in, config.n_heads)
    return params


def write_strength(params: dict, x: jax.Array, config: DeltaNetConfig) -> jax.Array:
    """β [..., H] in float32: sigmoid(W_β x) (or 1), doubled with allow_neg_eigval."""
    if config.use_beta:
        beta = jax.nn.sigmoid(project(x, params["w_b"]).astype(jnp.float32))
    else:
        beta = jnp.ones((*x.shape[:-1], config.n_heads), jnp.float32)
    return 2.0 * beta if config.allow_neg_eigval else beta


def _state_size(c: DeltaNetConfig) -> int:
    return mixer_state_size(c, c.key_dim, c.value_dim)


@register("deltanet", config=DeltaNetConfig, paper=PAPER, engine="delta", modes=MODES, state_size=_state_size)
def build(config: DeltaNetConfig):
    return delta_recurrence("deltanet", config, op=delta_ops.delta_rule,
                            init=lambda key, d_in: init(key, d_in, config),
                            gates=lambda params, x: (write_strength(params, x, config),),
                            key_dim=config.key_dim, value_dim=config.value_dim)
