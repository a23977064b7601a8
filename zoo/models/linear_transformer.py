"""Linear Transformer: causal linear attention as an RNN.

Paper: A. Katharopoulos, A. Vyas, N. Pappas, F. Fleuret, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention" (ICML 2020), §3.2 and §3.4 (eq. 16-20). The token mixer, per head
with key width K and value width V (x_t ∈ R^{d_in}, H heads)::

    q_t = φ(W_q x_t),  k_t = φ(W_k x_t),  v_t = W_v x_t                 φ(a) = elu(a) + 1
    S_t = S_{t-1} + k_t v_tᵀ,  z_t = z_{t-1} + k_t                        (zoo.ops.linear_attention)
    o_t = S_tᵀ q_t / (z_tᵀ q_t + ε)                                       normalize=True (the paper)
    y_t = W_o [o_t^1; ...; o_t^H]

Consulted: the paper; the authors' ``fast-transformers`` (``CausalLinearAttention``, ε = 1e-6, no
scaling of q); FLA's ``LinearAttention`` layer (fla-org/flash-linear-attention,
``fla/layers/linear_attn.py``), whose ``feature_map`` and ``do_feature_map_norm`` (our ``normalize``)
options this config follows.

Options: ``feature_map`` is ``"elu+1"`` (the paper), ``"relu"`` or ``"identity"``; ``normalize=False``
drops the denominator (``o_t = S_tᵀ q_t · scale``, FLA's default form), and the state is then S alone.
``"identity"`` with ``normalize=True`` is refused: z_tᵀ q_t can then be 0 or negative.

Differences, and why:

* ε is 1e-10 (FLA's constant in ``zoo.ops.linear_attention``) rather than fast-transformers' 1e-6;
  with φ = elu + 1 the denominator is a sum of positive terms, so ε only guards against 0.
* ``scale`` multiplies q (default 1, as in the paper; None means K^-1/2, FLA's default). With
  ``normalize=True`` it cancels between numerator and denominator up to ε.
* FLA's optional output RMSNorm, q/k sum-normalisation and learned feature maps (hedgehog, T2R,
  DPFP) are not offered. Projections have no bias and are LeCun-normal (zoo's default) rather than
  torch's uniform.
* Dtypes: projections and φ run in the compute dtype (the input's); the engine accumulates in
  float32 and the state is float32.

State: ``(S [B, H, K, V], z [B, H, K])`` with ``normalize=True``, else ``S``; float32. Engine: matrix
(``zoo.ops.linear_attention``), modes ``"chunked"`` (default), ``"parallel"``, ``"sequential"``.
``reset`` drops S and z; ``reverse`` runs time backwards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import check_positive_ints, merge_heads, run_op, run_op_one_token, split_heads
from zoo.ops import linear_attention
from zoo.ops.matrix import MODES
from zoo.registry import register

FEATURE_MAPS = {
    "elu+1": lambda a: jax.nn.elu(a) + 1,
    "relu": jax.nn.relu,
    "identity": lambda a: a,
}


@dataclasses.dataclass(frozen=True)
class LinearTransformerConfig:
    d_model: int = 16           # output width
    n_heads: int = 2            # H
    d_head: int = 8             # K = V per head
    feature_map: str = "elu+1"  # φ on q and k: "elu+1", "relu" or "identity"
    normalize: bool = True      # divide by z_tᵀ q_t (the paper); state (S, z)
    scale: float | None = 1.0   # multiplies q; None: K^-1/2
    chunk_size: int = 8         # engine chunk in mode="chunked"

    def __post_init__(self):
        model = "linear_transformer"
        check_positive_ints(model, self, ("d_model", "n_heads", "d_head"))
        check_chunk_size(model, self.chunk_size)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"{model}: feature_map must be one of {tuple(FEATURE_MAPS)}, "
                             f"got {self.feature_map!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"{model}: normalize must be a bool, got {self.normalize!r}")
        if self.normalize and self.feature_map == "identity":
            raise ValueError(f"{model}: feature_map='identity' with normalize=True can divide by zero "
                             f"(z_tᵀ q_t takes any sign); use 'elu+1' or 'relu', or normalize=False")
        if self.scale is not None and not (isinstance(self.scale, (int, float))
                                           and not isinstance(self.scale, bool) and self.scale > 0):
            raise ValueError(f"{model}: scale must be a positive float or None, got {self.scale!r}")


def _state_size(c: LinearTransformerConfig) -> int:
    return c.n_heads * c.d_head * c.d_head + (c.n_heads * c.d_head if c.normalize else 0)


@register("linear_transformer", config=LinearTransformerConfig,
          paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
          engine="matrix", modes=MODES, state_size=_state_size)
def build(config: LinearTransformerConfig):
    heads, dk, width = config.n_heads, config.d_head, config.n_heads * config.d_head
    phi = FEATURE_MAPS[config.feature_map]
    op_kwargs = {"normalize": config.normalize, "scale": config.scale}

    def init(key, d_in):
        k_q, k_k, k_v, k_o = jax.random.split(key, 4)
        return {"w_q": dense_init(k_q, d_in, width), "w_k": dense_init(k_k, d_in, width),
                "w_v": dense_init(k_v, d_in, width), "w_o": dense_init(k_o, width, config.d_model)}

    def initial_state(params, batch):
        S = jnp.zeros((batch, heads, dk, dk), jnp.float32)
        return (S, jnp.zeros((batch, heads, dk), jnp.float32)) if config.normalize else S

    def qkv(params, x):
        """[..., d_in] -> φ(q), φ(k), v, each [..., H, K], in x's dtype."""
        q, k, v = (x @ params[f"w_{n}"].astype(x.dtype) for n in "qkv")
        return split_heads(phi(q), heads), split_heads(phi(k), heads), split_heads(v, heads)

    def readout(params, o):
        return merge_heads(o) @ params["w_o"].astype(o.dtype)

    def step(params, state, x_t):
        o, state = run_op_one_token(linear_attention, *qkv(params, x_t), state=state, **op_kwargs)
        return state, readout(params, o)

    def apply(params, xs, state, reset, mode, reverse):
        o, state = run_op(linear_attention, *qkv(params, xs), state=state, reset=reset, mode=mode,
                          reverse=reverse, chunk_size=config.chunk_size, **op_kwargs)
        return readout(params, o), state

    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("linear_transformer", init=init, initial_state=initial_state, step=step,
                           apply=apply, input_width=lambda params: params["w_q"].shape[0], modes=MODES,
                           default_d_in=config.d_model)
