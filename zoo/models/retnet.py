"""RetNet: multi-scale retention.

Paper: Y. Sun, L. Dong, S. Huang, S. Ma, Y. Xia, J. Xue, J. Wang, F. Wei, "Retentive Network: A
Successor to Transformer for Large Language Models" (arXiv 2307.08621, 2023), §2.1-2.2. The token
mixer, per head h with key width K and value width V = expand_v · K (x_t ∈ R^{d_in})::

    q_t = Θ_t W_q x_t,   k_t = Θ_t W_k x_t,   v_t = W_v x_t               Θ_t: rotation by t θ (below)
    S_t = γ_h S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t · K^-1/2       γ_h = 1 - 2^(-5-h) (zoo.ops.retention)
    Y_t = GroupNorm_H([o_t^1; ...; o_t^H])                                one group per head
    y_t = W_o (swish(W_g x_t) ⊙ Y_t)

``use_short_conv=True`` (FLA's option, off by default as there) first replaces the projections
[W_q x, W_k x, W_v x] by SiLU(conv1d_C(·)_t), a causal depthwise convolution of ``conv_size`` = C taps
(FLA's ``ShortConvolution``), before the rotation: each token's q, k, v then also see the C − 1 tokens
before it, which associative recall needs (Zoology; "Just read twice").

Θ_t is rotary position embedding (RoFormer's e^{itθ}, ``zoo.ops.softmax.rotate``): entry i of each
head is paired with entry i + K/2 and turned by t·θ_i, θ_i = base^(-2i/K). So
``q_tᵀ k_s = (W_q x_t)ᵀ R((s - t)θ) (W_k x_s)`` depends on the offset only: the paper's relative
position e^{i(n-m)θ}.

Consulted: the paper; the authors' torchscale (``torchscale/component/multiscale_retention.py``,
``RetNetRelPos`` in ``torchscale/architecture/retnet.py``) and FLA's ``MultiScaleRetention``
(fla-org/flash-linear-attention, ``fla/layers/multiscale_retention.py``).

The state needs no position counter. It is held in the frame of the next token: after t tokens,
``S = Σ_{s<t} γ^{t-1-s} R((s - t)θ) k̃_s v_sᵀ`` (k̃ the unrotated key), i.e. each key turned by its
offset from the next position, as ``zoo/ops/softmax.py`` stores keys for Griffin's local attention. A
step therefore reads with unrotated q and k and then turns the state by -θ along K; ``apply`` rotates
token j of the call by its place j in the call (0, 1, ...; counted from the end when
``reverse=True``, which is the order of processing) and turns the final state by -T·θ. This is
exactly rotary attention with absolute positions counted from the start of the stream (or of the
segment after a ``reset``), since only offsets enter; rotation angles stay below T·θ_0 for any
stream length (an absolute position counter would lose float32 precision, and stop counting at 2^24).

Differences, and why:

* Position: torchscale turns interleaved pairs (2i, 2i+1) at θ_i = 10000^(-i/(K/2-1)); FLA uses
  rotary with halves paired, θ_i = base^(-2i/K), as here. A fixed permutation of the key entries maps
  one pairing to the other (W_q, W_k absorb it); the frequencies differ slightly. The paper's xPos
  length-extrapolation scaling (ζ^n on q, ζ^-m on k) is not used, nor is it in torchscale's RetNet.
* Normalisation: the paper and torchscale also scale the decay mask D by its row sums and the
  retention scores by max(|Σ|, 1) for numerical stability. Each is a positive factor per token and
  head, which the per-head GroupNorm removes (up to its ε), so they are left out, as FLA does.
  ``norm="rms"`` gives FLA's per-head RMSNorm instead of GroupNorm.
* Projections have no bias and are LeCun-normal (zoo's default) rather than torchscale's Xavier with
  gain 2^-2.5; the GroupNorm has a learned scale and shift (torch GroupNorm's affine parameters).
* Dtypes: projections, the gate and the norm's output run in the compute dtype (the input's); the
  rotations in float32 (cast back to the compute dtype); the engine accumulates in float32; the norm's
  statistics are float32; the state is float32.

State: S [B, H, K, V] float32, in the next token's frame; with ``use_short_conv`` the pair
(window [B, C − 1, 2HK + HV] of the last projections, S). Engine: matrix (``zoo.ops.retention``),
modes ``"chunked"`` (default), ``"parallel"``, ``"sequential"``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import (
    check_bools,
    check_positive_ints,
    head_norm,
    mixer_state_size,
    qkv_projection,
    run_op,
    run_op_one_token,
    short_conv_apply,
    short_conv_step,
    split_heads,
)
from zoo.models.mamba2 import conv_init
from zoo.ops import retention
from zoo.ops.matrix import MODES
from zoo.ops.softmax import Rope, rotate
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class RetNetConfig:
    d_model: int = 16           # output width
    n_heads: int = 2            # H; head h decays by γ_h = 1 - 2^(-5-h)
    d_head: int = 8             # K, the key width per head (even: rotary pairs)
    expand_v: int = 2           # V = expand_v * K (the paper's value width is twice the key width)
    rope_base: float = 10_000.0
    norm: str = "group"         # "group" (the paper's GroupNorm) or "rms" (FLA)
    norm_eps: float = 1e-6      # torchscale's layernorm_eps
    chunk_size: int = 8         # engine chunk in mode="chunked"
    use_short_conv: bool = False     # FLA's default
    conv_size: int = 4
    conv_bias: bool = False

    def __post_init__(self):
        model = "retnet"
        check_positive_ints(model, self, ("d_model", "n_heads", "d_head", "expand_v", "conv_size"))
        check_bools(model, self, ("use_short_conv", "conv_bias"))
        check_chunk_size(model, self.chunk_size)
        if self.d_head % 2:
            raise ValueError(f"retnet: d_head must be even (rotary turns pairs), got {self.d_head}")
        if self.norm not in ("group", "rms"):
            raise ValueError(f"retnet: norm must be 'group' or 'rms', got {self.norm!r}")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"retnet: rope_base must be > 1, got {self.rope_base!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"retnet: norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def d_value(self) -> int:
        return self.expand_v * self.d_head


    @property
    def conv_width(self) -> int:
        """Channels of the short convolution: the q, k and v projections side by side."""
        return self.n_heads * (2 * self.d_head + self.d_value)


def _state_size(c: RetNetConfig) -> int:
    return mixer_state_size(c, c.n_heads * c.d_head, c.n_heads * c.d_value)   # (the window and) S


def rotate_keys_of_state(S: jax.Array, offset: int, rope: Rope) -> jax.Array:
    """Turn every key held in S [B, H, K, V] by ``offset`` positions (float32)."""
    turned = rotate(jnp.swapaxes(S, -1, -2), np.asarray(float(offset)), rope)
    return jnp.swapaxes(turned, -1, -2)


def rotate_in_float32(x: jax.Array, positions: np.ndarray, rope: Rope) -> jax.Array:
    """x [..., K] turned at static ``positions`` (broadcast against x.shape[:-1]); x's dtype out."""
    return rotate(x.astype(jnp.float32), positions, rope).astype(x.dtype)


@register("retnet", config=RetNetConfig,
          paper="Retentive Network: A Successor to Transformer for Large Language Models",
          engine="matrix", modes=MODES, state_size=_state_size)
def build(config: RetNetConfig):
    heads, dk, dv = config.n_heads, config.d_head, config.d_value
    rope = Rope(dk, float(config.rope_base))

    def init(key, d_in):
        k_q, k_k, k_v, k_g, k_o, k_conv = jax.random.split(key, 6)
        params = {"w_q": dense_init(k_q, d_in, heads * dk), "w_k": dense_init(k_k, d_in, heads * dk),
                  "w_v": dense_init(k_v, d_in, heads * dv), "w_g": dense_init(k_g, d_in, heads * dv),
                  "w_o": dense_init(k_o, heads * dv, config.d_model),
                  "norm_scale": jnp.ones((heads * dv,), jnp.float32)}
        if config.norm == "group":
            params["norm_bias"] = jnp.zeros((heads * dv,), jnp.float32)
        if config.use_short_conv:
            params.update(conv_init(k_conv, config.conv_size, config.conv_width, config.conv_bias))
        return params

    def initial_state(params, batch):
        S = jnp.zeros((batch, heads, dk, dv), jnp.float32)
        if config.use_short_conv:
            return jnp.zeros((batch, config.conv_size - 1, config.conv_width), jnp.float32), S
        return S

    def qkv(mixed):
        """[..., 2HK + HV] projections -> q, k [..., H, K] and v [..., H, V], unrotated."""
        q, k, v = jnp.split(mixed, (heads * dk, 2 * heads * dk), axis=-1)
        return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)

    def readout(params, o, x):
        """GroupNorm per head, the swish gate and the output projection."""
        y = head_norm(o, params["norm_scale"], kind=config.norm, eps=config.norm_eps,
                      bias=params.get("norm_bias"))
        gate = jax.nn.silu(x @ params["w_g"].astype(x.dtype))
        return (gate * y) @ params["w_o"].astype(x.dtype)

    def step(params, state, x_t):
        mixed, S = qkv_projection(params, x_t), state
        if config.use_short_conv:
            window, S = state
            window, mixed = short_conv_step(params, window, mixed)
        # The state is in this token's frame, so q and k go in unrotated (position 0).
        o, S = run_op_one_token(retention, *qkv(mixed), state=S)
        S = rotate_keys_of_state(S, -1, rope)
        return ((window, S) if config.use_short_conv else S), readout(params, o, x_t)

    def apply(params, xs, state, reset, mode, reverse):
        time = xs.shape[1]
        mixed, S = qkv_projection(params, xs), state
        if config.use_short_conv:
            window, S = state
            mixed, window = short_conv_apply(params, mixed, window, reset, reverse)
        q, k, v = qkv(mixed)
        # Place of each token in the order of processing; [T, 1] broadcasts over batch and heads.
        place = np.arange(time)[::-1] if reverse else np.arange(time)
        q, k = (rotate_in_float32(a, place[:, None], rope) for a in (q, k))
        o, S = run_op(retention, q, k, v, state=S, reset=reset, mode=mode, reverse=reverse,
                      chunk_size=config.chunk_size)
        S = rotate_keys_of_state(S, -time, rope)
        return readout(params, o, xs), ((window, S) if config.use_short_conv else S)

    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("retnet", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_q"].shape[0], modes=MODES,
                           default_d_in=config.d_model)
