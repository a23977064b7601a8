"""Lightning: TransNormerLLM's token mixer (NormLinearAttention) on Lightning Attention-2.

Papers: Z. Qin, W. Sun, D. Li, X. Shen, W. Sun, Y. Zhong, "Lightning Attention-2: A Free Lunch for
Handling Unlimited Sequence Lengths in Large Language Models" (arXiv 2401.04658, 2024), the tiled
(intra-block masked attention + inter-block state) algorithm; and Z. Qin, D. Li, W. Sun, et al.,
"TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer" (arXiv 2307.14995,
2023), §3, the block. Per head h with width K (x_t ∈ R^{d_in}, hidden width E = H·K)::

    q_t = SiLU(W_q x_t),  k_t = SiLU(W_k x_t),  v_t = W_v x_t,  u_t = act(W_u x_t)     act: identity
    S_t = λ_h S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t                     (zoo.ops.lightning_attention)
    y_t = W_o (SRMSNorm([o_t^1; ...; o_t^H]) ⊙ u_t)                    SRMSNorm(a) = a / sqrt(mean(a²) + ε)

The decay λ_h is fixed per head and layer. ``decay="fla"`` (default) is FLA's ``chunk_lightning_attn``
rule, the one ``zoo.ops.lightning_attention`` implements: ``log λ_h = -(8/H)(1 - l/L)·h`` for layer
``l = layer_idx`` of ``L = num_layers``. ``decay="alibi"`` is TransNormerLLM's released code: λ_h =
exp(-s_h (1 - l/(L-1) + 1e-5)) with s_h ALiBi's slopes (2^(-8(h+1)/H) for H a power of two),
run through ``zoo.ops.simple_gla``, the same engine with the same decay per head. Both make the
decays longer-lived with depth. The defaults ``layer_idx=0, num_layers=1`` are a lone (or bottom)
layer: head 0 keeps everything (λ = 1) and head h forgets at e^{-8h/H} per step under "fla"; in a
stack of n, give layer l ``layer_idx=l, num_layers=n``.

Consulted: the papers; OpenNLPLab's TransNormerLLM release (``modeling_transnormer.py``:
``NormLinearAttention``, ``_build_slope_tensor``; ``srmsnorm_triton.py``) and FLA's
``chunk_lightning_attn`` (fla-org/flash-linear-attention, ``fla/ops/lightning_attn/chunk.py``); FLA
has no Lightning layer.

Differences, and why:

* The released code applies SiLU to q and k only, and leaves v and the output gate u unactivated,
  as here (``gate_act="identity"``); ``gate_act`` offers "sigmoid" and "swish" for a gated variant.
* No scaling of q (scale 1), as in TransNormerLLM; FLA's op defaults to K^-1/2. SRMSNorm over all
  heads removes any common scale up to its ε.
* The release's optional LRPE (linearised relative position encoding, ``linear_use_lrpe``, chosen
  per layer) and its padding masks are not offered. Projections have no bias and are LeCun-normal
  (zoo's default) rather than normal(0, 0.02); q, k, v, u are four matrices, not one ``qkvu_proj``.
* Under "alibi" with ``num_layers=1`` the release's l/(L-1) is undefined; here it is taken as 0.
* Dtypes: projections, activations and the gate in the compute dtype (the input's); the engine
  accumulates in float32; the norm's statistics in float32; the state is float32.

State: S [B, H, K, K] float32. Engine: matrix, modes ``"chunked"`` (default; the Lightning Attention-2
tiling, ``chunk_size`` the block), ``"parallel"``, ``"sequential"``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import check_positive_ints, merge_heads, run_op, run_op_one_token, split_heads
from zoo.ops import lightning_attention, simple_gla
from zoo.ops.matrix import MODES
from zoo.registry import register

GATE_ACTS = {"identity": lambda a: a, "sigmoid": jax.nn.sigmoid, "swish": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class LightningConfig:
    d_model: int = 16           # output width
    n_heads: int = 2            # H
    d_head: int = 8             # K = V per head; hidden width E = H K
    layer_idx: int = 0          # l: this layer's depth in its stack, 0-based
    num_layers: int = 1         # L: layers in the stack
    decay: str = "fla"          # "fla" (zoo.ops.lightning_attention) or "alibi" (TransNormerLLM's release)
    gate_act: str = "identity"  # activation of the output gate u
    norm_eps: float = 1e-6      # SRMSNorm's ε (TransNormerLLM's)
    chunk_size: int = 8         # engine chunk (Lightning's block) in mode="chunked"

    def __post_init__(self):
        model = "lightning"
        check_positive_ints(model, self, ("d_model", "n_heads", "d_head", "num_layers"))
        check_chunk_size(model, self.chunk_size)
        if (isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int)
                or not 0 <= self.layer_idx < self.num_layers):
            raise ValueError(f"lightning: need 0 <= layer_idx < num_layers, got "
                             f"layer_idx={self.layer_idx!r}, num_layers={self.num_layers}")
        if self.decay not in ("fla", "alibi"):
            raise ValueError(f"lightning: decay must be 'fla' or 'alibi', got {self.decay!r}")
        if self.gate_act not in GATE_ACTS:
            raise ValueError(f"lightning: gate_act must be one of {tuple(GATE_ACTS)}, got {self.gate_act!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"lightning: norm_eps must be > 0, got {self.norm_eps!r}")


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022) as TransNormerLLM builds them: the geometric sequence
    2^(-8/n)^(i+1) for n a power of two; otherwise those of the power of two below, then every other
    slope of the power of two above."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    below = 2 ** math.floor(math.log2(heads))
    return power_of_two(below) + alibi_slopes(2 * below)[0::2][:heads - below]


def alibi_log_decay(heads: int, layer_idx: int, num_layers: int) -> jax.Array:
    """TransNormerLLM's log λ [H] for one layer: -slope · (1 - l/(L-1) + 1e-5) (l/(L-1) = 0 when L = 1)."""
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return -jnp.asarray(alibi_slopes(heads), jnp.float32) * (1.0 - depth + 1e-5)


def srms_norm(o: jax.Array, eps: float) -> jax.Array:
    """Parameter-free RMSNorm over the last axis, statistics in float32, o's dtype out."""
    o32 = o.astype(jnp.float32)
    return (o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + eps)).astype(o.dtype)


def _state_size(c: LightningConfig) -> int:
    return c.n_heads * c.d_head * c.d_head


@register("lightning", config=LightningConfig,
          paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
                "Language Models",
          engine="matrix", modes=MODES, state_size=_state_size)
def build(config: LightningConfig):
    heads, dk, width = config.n_heads, config.d_head, config.n_heads * config.d_head
    gate_act = GATE_ACTS[config.gate_act]
    if config.decay == "fla":
        op, constants = lightning_attention, {"layer_idx": config.layer_idx, "num_layers": config.num_layers}
    else:
        op, constants = simple_gla, {}
        log_decay = alibi_log_decay(heads, config.layer_idx, config.num_layers)

    def decay_args(lead_shape):
        """The per-token decay argument of simple_gla ([*lead, H]); none for the lightning op."""
        return () if config.decay == "fla" else (jnp.broadcast_to(log_decay, (*lead_shape, heads)),)

    def init(key, d_in):
        keys = jax.random.split(key, 5)
        params = {f"w_{n}": dense_init(k, d_in, width) for n, k in zip("qkvu", keys[:4], strict=True)}
        params["w_o"] = dense_init(keys[4], width, config.d_model)
        return params

    def initial_state(params, batch):
        return jnp.zeros((batch, heads, dk, dk), jnp.float32)

    def project(params, x):
        """[..., d_in] -> SiLU(q), SiLU(k), v [..., H, K] and the gate u [..., E], in x's dtype."""
        q, k, v, u = (x @ params[f"w_{n}"].astype(x.dtype) for n in "qkvu")
        heads_of = [split_heads(a, heads) for a in (jax.nn.silu(q), jax.nn.silu(k), v)]
        return heads_of, gate_act(u)

    def readout(params, o, u):
        return (srms_norm(merge_heads(o), config.norm_eps) * u) @ params["w_o"].astype(u.dtype)

    def step(params, state, x_t):
        qkv, u = project(params, x_t)
        o, state = run_op_one_token(op, *qkv, *decay_args(x_t.shape[:1]), state=state, scale=1.0,
                                    **constants)
        return state, readout(params, o, u)

    def apply(params, xs, state, reset, mode, reverse):
        qkv, u = project(params, xs)
        o, state = run_op(op, *qkv, *decay_args(xs.shape[:2]), state=state, reset=reset, mode=mode,
                          reverse=reverse, chunk_size=config.chunk_size, scale=1.0, **constants)
        return readout(params, o, u), state

    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("lightning", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_q"].shape[0], modes=MODES,
                           default_d_in=config.d_model)
