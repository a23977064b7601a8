"""RWKV-6 "Finch": a residual block of time mixing (matrix-valued state) and channel mixing.

Paper: B. Peng, D. Goldstein, Q. Anthony, et al., "Eagle and Finch: RWKV with Matrix-Valued States and
Dynamic Recurrence" (arXiv 2404.05892, 2024): Finch's time and channel mixing. Code consulted, written
here anew: the official BlinkDL/RWKV-LM ``RWKV-v5/rwkv_v6_demo.py`` (``RWKV_Tmix_x060``,
``RWKV_CMix_x060``, ``Block``, and its description of the RNN form) and FLA's ``fla/layers/rwkv6.py``
(``RWKV6Attention``; fla-org/flash-linear-attention).

With the residual stream x_t ∈ R^D (D = d_model = the attention width), H = D / d_head heads and
the token shift ``prev(a)_t = a_{t-1}`` (zeros before a segment's first token)::

    Time mix on a = LN_1(x):
      δ_t = prev(a)_t - a_t                                        data-dependent lerp ("ddlerp"):
      [m_w, m_k, m_v, m_r, m_g]_t = tanh((a_t + δ_t ⊙ μ_x) A) B_{w,k,v,r,g}     LoRA, rank mix_lora_rank
      a^□_t = a_t + δ_t ⊙ (μ_□ + m_□,t)                            for □ ∈ {w, k, v, r, g}
      r = a^r W_r,  k = a^k W_k,  v = a^v W_v,  g = SiLU(a^g W_g)
      log w_t = -exp(w_0 + tanh(a^w_t D_1) D_2)                    per channel, LoRA rank decay_lora_rank
      per head (zoo.ops.rwkv6, scale 1):
        o_t = r_tᵀ (S_{t-1} + Diag(u) k_t v_tᵀ),   S_t = Diag(w_t) S_{t-1} + k_t v_tᵀ
      x ← x + (GroupNorm_H(o) ⊙ g) W_o                             GroupNorm: LayerNorm per head
    Channel mix on b = LN_2(x):
      δ_t = prev(b)_t - b_t,  b^k = b + δ ⊙ μ'_k,  b^r = b + δ ⊙ μ'_r
      x ← x + σ(b^r W'_r) ⊙ (relu(b^k W'_k)² W'_v)                 hidden width d_ffn

Initialisation follows the official code (``layer_idx`` of ``n_layers`` sets its ratios): the lerp
coefficients μ = 1 - (i / D)^ratio, the decay base w_0 = -6 + 5 (i / (D-1))^(0.7 + 1.3 ratio), the bonus
u with its zigzag, the LoRAs' first matrices zero and second uniform(±0.01), the GroupNorm scale
((1 + layer_idx) / n_layers)^0.7, LayerNorms at 1 and 0.

State: ``(time_mix_last [B, D], S [B, H, d_head, d_head], channel_mix_last [B, D])``, float32: the
last LN_1 and LN_2 outputs (the tokens the next shifts read) and the matrix memory. ``step`` decodes
one token in O(1); ``apply`` runs the memory in ``zoo.ops.rwkv6``'s ``"chunked"`` (also ``"auto"``,
with ``chunk_size``), ``"parallel"`` or ``"sequential"`` mode. The token shift is a two-tap causal
convolution with taps (1, 0) (``zoo.ops.conv1d``), which brings its state, ``reset`` and ``reverse``
handling: a reset zeros the shifted token at a segment start, and ``reverse=True`` shifts from the
other side (the token read at t is the one at t + 1, zeros past a segment's end).

Differences from the official code, and why:

* The LoRA ranks default to 8 (official 32 for the mixes, 64 for the decay) to keep the default
  model tiny; ``d_ffn`` is a field (official int(3.5 D) rounded down to a multiple of 32).
* The projections W_r, W_k, W_v, W_g, W_o and the channel mix's three are LeCun-normal (zoo's
  default). The official init sets W_o, W'_v and W'_r to zero (each block starts as the identity)
  and the others orthogonal; with zeros, nothing inside the block would receive a gradient at init.
* The layer-0 ``ln0`` after the embedding belongs to the language model, not to the block; the
  optional input projection ``w_in`` (only when d_in ≠ D) is a zoo addition so that the block
  accepts any input width (none for d_in = D, the stacked case).
* The GroupNorm's eps is 64e-5 as in the official code (1e-5 · head_size_divisor²); FLA uses 1e-5.
  FLA's key width ``expand_k = 0.5`` is not offered: keys and values are D wide, as in the official
  model.
* Packed sequences use ``reset``. Params are stored input-major (``x @ w``, the torch weights
  transposed). Compute dtype: the input's. Products run on its operands; the residual stream, the
  norms' statistics, the lerps, the log decay and the memory (inputs, accumulation, output) are
  float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import head_norm, run_op, run_op_one_token, split_heads
from zoo.models.rglru import accumulation_dtype, dense
from zoo.ops import conv1d, rwkv6
from zoo.ops.matrix import MODES
from zoo.registry import register

PAPER = "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence"
MIXES = ("w", "k", "v", "r", "g")       # the order of the five data-dependent lerps


@dataclasses.dataclass(frozen=True)
class RWKV6Config:
    d_model: int = 16
    d_head: int = 8               # H = d_model / d_head heads (official head size 64)
    d_ffn: int = 56               # channel-mix hidden width (3.5 d_model)
    mix_lora_rank: int = 8        # rank of the ddlerp LoRA (official 32)
    decay_lora_rank: int = 8      # rank of the decay LoRA (official 64)
    layer_idx: int = 0            # this block's depth, for the official init's ratios
    n_layers: int = 1             # depth of the stack the caller builds
    norm_eps: float = 1e-5        # LN_1, LN_2
    group_norm_eps: float = 64e-5  # the per-head GroupNorm of the time mix's output
    chunk_size: int = 8           # memory chunk in mode="chunked" (and "auto")

    def __post_init__(self):
        check_config(self)

    @property
    def n_heads(self) -> int:
        return self.d_model // self.d_head


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


def check_config(c: RWKV6Config) -> None:
    check_chunk_size("rwkv6", c.chunk_size)
    for name in ("d_model", "d_head", "d_ffn", "mix_lora_rank", "decay_lora_rank", "n_layers"):
        if not _positive_int(getattr(c, name)):
            raise ValueError(f"rwkv6: {name} must be a positive int, got {getattr(c, name)!r}")
    if c.d_model % c.d_head:
        raise ValueError(f"rwkv6: d_model = {c.d_model} must be a multiple of d_head = {c.d_head}")
    layer = c.layer_idx
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < c.n_layers:
        raise ValueError(f"rwkv6: need 0 <= layer_idx < n_layers, got layer_idx={layer!r}, "
                         f"n_layers={c.n_layers!r}")
    for name in ("norm_eps", "group_norm_eps"):
        if not getattr(c, name) > 0:
            raise ValueError(f"rwkv6: {name} must be positive, got {getattr(c, name)!r}")


def _state_size(c: RWKV6Config) -> int:
    return 2 * c.d_model + c.n_heads * c.d_head * c.d_head


# --------------------------------------------------------------------------------------------
# Pieces of the block.


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch's LayerNorm over the last axis, in float32 or wider."""
    x32 = x.astype(accumulation_dtype(x.dtype))
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps) * scale + bias


def _shift_kernel(width: int) -> jax.Array:
    """Two causal taps (previous token 1, current token 0): y_t = a_{t-1}, as a ``zoo.ops.conv1d`` kernel."""
    return jnp.stack([jnp.ones((width,), jnp.float32), jnp.zeros((width,), jnp.float32)])


def token_shift(a, last, reset, reverse):
    """(a_{t-1} for every t [B, T, D], the new last token [B, D]); ``last`` [B, D] precedes a[:, 0]."""
    prev, window = conv1d.apply(a, _shift_kernel(a.shape[-1]), initial_state=last[:, None], reset=reset,
                                reverse=reverse)
    return prev, window[:, 0]


def official_init(key, c: RWKV6Config) -> dict:
    """The time-dependent parameters as RWKV-LM's ``RWKV_Tmix_x060`` / ``RWKV_CMix_x060`` draw them."""
    d, heads = c.d_model, c.n_heads
    ratio_0_to_1 = c.layer_idx / (c.n_layers - 1) if c.n_layers > 1 else 0.0
    ratio_1_to_0 = 1.0 - c.layer_idx / c.n_layers
    frac = jnp.arange(d, dtype=jnp.float32) / d
    lerp = 1.0 - frac ** ratio_1_to_0
    lerp_half = 1.0 - frac ** (0.5 * ratio_1_to_0)
    mixes = {"w": lerp, "k": lerp, "v": 1.0 - (frac ** ratio_1_to_0 + 0.3 * ratio_0_to_1), "r": lerp_half,
             "g": lerp_half}
    position = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
    zigzag = ((jnp.arange(d) + 1) % 3 - 1).astype(jnp.float32) * 0.1
    k_mix, k_decay = jax.random.split(key)
    return {
        "mu_x": lerp,
        "mu": jnp.stack([mixes[m] for m in MIXES]),                                       # [5, D]
        "mix_a": jnp.zeros((d, len(MIXES) * c.mix_lora_rank), jnp.float32),
        "mix_b": jax.random.uniform(k_mix, (len(MIXES), c.mix_lora_rank, d), jnp.float32, -0.01, 0.01),
        "decay_base": -6.0 + 5.0 * position ** (0.7 + 1.3 * ratio_0_to_1),
        "decay_a": jnp.zeros((d, c.decay_lora_rank), jnp.float32),
        "decay_b": jax.random.uniform(k_decay, (c.decay_lora_rank, d), jnp.float32, -0.01, 0.01),
        "bonus": (ratio_0_to_1 * (1.0 - position) + zigzag).reshape(heads, c.d_head),
        "gn_scale": jnp.full((d,), ((1 + c.layer_idx) / c.n_layers) ** 0.7, jnp.float32),
        "gn_bias": jnp.zeros((d,), jnp.float32),
        "cm_mu_k": lerp,
        "cm_mu_r": lerp,
    }


def ddlerp(params, a, prev):
    """The five data-dependent lerps a + δ ⊙ (μ_□ + m_□) [..., 5, D] (order ``MIXES``), float32."""
    acc = accumulation_dtype(a.dtype)
    a32 = a.astype(acc)
    delta = prev.astype(acc) - a32
    hidden = jnp.tanh(dense(a32 + delta * params["mu_x"], params["mix_a"], dtype=a.dtype))
    hidden = hidden.reshape(*hidden.shape[:-1], len(MIXES), -1).astype(a.dtype)         # [..., 5, R]
    dynamic = jnp.einsum("...fr,frd->...fd", hidden, params["mix_b"].astype(a.dtype)).astype(acc)
    return a32[..., None, :] + delta[..., None, :] * (params["mu"] + dynamic)


def time_mix_inputs(params, a, prev, heads: int):
    """r, k, v and the log decay w [..., H, d], the gate SiLU(g) [..., D]; all float32."""
    dtype = a.dtype
    mixed = ddlerp(params, a, prev)
    xw, xk, xv, xr, xg = (mixed[..., i, :] for i in range(len(MIXES)))
    # float32 (each a product in the compute dtype): the memory accumulates in float32 anyway, and its
    # output then reaches the GroupNorm unrounded.
    r, k, v = (dense(x, params[f"w_{name}"], dtype=dtype) for x, name in ((xr, "r"), (xk, "k"), (xv, "v")))
    gate = jax.nn.silu(dense(xg, params["w_g"], dtype=dtype))
    lora = dense(jnp.tanh(dense(xw, params["decay_a"], dtype=dtype)), params["decay_b"], dtype=dtype)
    log_w = -jnp.exp(params["decay_base"] + lora)
    return (split_heads(r, heads), split_heads(k, heads), split_heads(v, heads),
            split_heads(log_w, heads), gate)


def time_mix_output(params, o, gate, eps: float, dtype):
    """(GroupNorm_H(o) ⊙ g) W_o, the product in ``dtype``, float32 out."""
    normed = head_norm(o, params["gn_scale"], kind="group", eps=eps, bias=params["gn_bias"])
    return dense(normed * gate, params["w_o"], dtype=dtype)


def channel_mix(params, b, prev):
    """σ(b^r W'_r) ⊙ (relu(b^k W'_k)² W'_v), float32."""
    dtype = b.dtype
    b32 = b.astype(accumulation_dtype(dtype))
    delta = prev.astype(b32.dtype) - b32
    hidden = jnp.square(jax.nn.relu(dense(b32 + delta * params["cm_mu_k"], params["cm_w_k"], dtype=dtype)))
    receptance = jax.nn.sigmoid(dense(b32 + delta * params["cm_mu_r"], params["cm_w_r"], dtype=dtype))
    return receptance * dense(hidden, params["cm_w_v"], dtype=dtype)


@register("rwkv6", config=RWKV6Config, paper=PAPER, engine="matrix", modes=MODES, state_size=_state_size)
def build(config: RWKV6Config):
    d, heads, dh, f = config.d_model, config.n_heads, config.d_head, config.d_ffn

    def init(key, d_in):
        keys = jax.random.split(key, 10)
        params = {
            "ln1_scale": jnp.ones((d,), jnp.float32), "ln1_bias": jnp.zeros((d,), jnp.float32),
            "ln2_scale": jnp.ones((d,), jnp.float32), "ln2_bias": jnp.zeros((d,), jnp.float32),
            **official_init(keys[0], config),
            "w_r": dense_init(keys[1], d, d), "w_k": dense_init(keys[2], d, d),
            "w_v": dense_init(keys[3], d, d), "w_g": dense_init(keys[4], d, d),
            "w_o": dense_init(keys[5], d, d),
            "cm_w_k": dense_init(keys[6], d, f), "cm_w_r": dense_init(keys[7], d, d),
            "cm_w_v": dense_init(keys[8], f, d),
        }
        if d_in != d:
            params["w_in"] = dense_init(keys[9], d_in, d)
        return params

    def read(params, xs):
        """The residual stream (float32, float64 for float64 inputs)."""
        return dense(xs, params["w_in"]) if "w_in" in params else xs.astype(accumulation_dtype(xs.dtype))

    def norm(params, x, which, dtype):
        return layer_norm(x, params[f"{which}_scale"], params[f"{which}_bias"], config.norm_eps).astype(dtype)

    def initial_state(params, batch):
        return (jnp.zeros((batch, d), jnp.float32), jnp.zeros((batch, heads, dh, dh), jnp.float32),
                jnp.zeros((batch, d), jnp.float32))

    def step(params, state, x_t):
        tm_last, memory, cm_last = state
        dtype = x_t.dtype
        x = read(params, x_t)
        a = norm(params, x, "ln1", dtype)
        r, k, v, log_w, gate = time_mix_inputs(params, a, tm_last.astype(dtype), heads)
        o, memory = run_op_one_token(rwkv6, r, k, v, log_w, state=memory, u=params["bonus"], scale=1.0)
        x = x + time_mix_output(params, o, gate, config.group_norm_eps, dtype)
        b = norm(params, x, "ln2", dtype)
        x = x + channel_mix(params, b, cm_last.astype(dtype))
        return (a, memory, b), x.astype(dtype)

    def apply(params, xs, state, reset, mode, reverse):
        tm_last, memory, cm_last = state
        dtype = xs.dtype
        x = read(params, xs)
        a = norm(params, x, "ln1", dtype)
        prev, tm_last = token_shift(a, tm_last, reset, reverse)
        r, k, v, log_w, gate = time_mix_inputs(params, a, prev, heads)
        # "auto" is the chunked form; naming it lets the configured chunk size reach the op.
        mode = "chunked" if mode == "auto" else mode
        o, memory = run_op(rwkv6, r, k, v, log_w, state=memory, reset=reset, mode=mode, reverse=reverse,
                           chunk_size=config.chunk_size, u=params["bonus"], scale=1.0)
        x = x + time_mix_output(params, o, gate, config.group_norm_eps, dtype)
        b = norm(params, x, "ln2", dtype)
        prev, cm_last = token_shift(b, cm_last, reset, reverse)
        x = x + channel_mix(params, b, prev)
        return x.astype(dtype), (tm_last, memory, cm_last)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("rwkv6", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_in"].shape[0] if "w_in" in params else d,
                           modes=MODES, default_d_in=d)
