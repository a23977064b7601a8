"""The public ops of the matrix engine, with FLA's argument names: thin front ends to ``zoo.ops.matrix``.

Each takes q, k [B, T, H, K] and v [B, T, H, V] (FLA's layout), the model's own gates, ``scale``
(default K^-1/2), ``initial_state`` and ``output_final_state``, and returns ``(o, final_state)``
with ``final_state`` None unless asked for, as FLA's ``chunk_*`` / ``fused_recurrent_*`` ops do.
All also take the engine's ``reset`` (bool [B, T], packed sequences), ``reverse``, ``mode``
("auto", "chunked", "parallel", "sequential") and ``chunk_size``. States are float32.

=======================  ===================================================  =========================
op                       recurrence (per head)                                FLA / paper
=======================  ===================================================  =========================
``linear_attention``     S_t = S_{t-1} + k v ᵀ; o = Sᵀq (÷ nᵀq if normalize)    ``chunk_linear_attn``
``simple_gla``           S_t = exp(g_t) S_{t-1} + k vᵀ, g_t [B, T, H]          ``chunk_simple_gla``
``retention``            simple_gla with g_h = log(1 - 2^(-5-h))               ``chunk_retention``
``lightning_attention``  simple_gla with g_h = -(8/H)(1 - l/L) h               ``chunk_lightning_attn``
``gla``                  S_t = Diag(exp(g_t)) S_{t-1} + k vᵀ, g_t [B, T, H, K]  ``chunk_gla``
``hgrn2``                gla with k = 1 - exp(g)                                HGRN2 layer
``gateloop``             gla with complex g; o = Re(Sᵀq)                        GateLoop paper
``rwkv6``                o = rᵀ(S_{t-1} + Diag(u) k vᵀ), S_t = Diag(e^w) S + kvᵀ  ``chunk_rwkv6``
``mlstm``                xLSTM's stabilised, normalised matrix memory           ``mlstm_kernels``
=======================  ===================================================  =========================

HGRN (the diagonal, vector-state one) is a diagonal recurrence and lives in ``zoo/ops/hgrn.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.ops import matrix
from zoo.ops.matrix import MatrixState


def _engine_kwargs(reset, reverse, mode, chunk_size, implementation) -> dict:
    """The engine keywords every front end passes on. ``implementation`` ("xla", "pallas" or a list;
    None: Pallas on GPU/TPU in mode "auto") is ``zoo.ops.matrix.apply``'s: the Pallas kernel runs the
    calls it covers (scalar or per-key decays, mLSTM's input gate with the max_abs normaliser, either
    direction); exclusive readout (RWKV-6), complex decays (GateLoop) and the sum normaliser run XLA."""
    return {"reset": reset, "reverse": reverse, "mode": mode, "chunk_size": chunk_size,
            "implementation": implementation}


def _result(o, state, output_final_state: bool):
    return o, (state if output_final_state else None)


def linear_attention(q, k, v, *, scale=None, normalize: bool = False, initial_state=None,
                     output_final_state: bool = False, reset=None, reverse: bool = False, mode: str = "auto",
                     chunk_size=None, implementation=None):
    """Linear attention (A. Katharopoulos et al., "Transformers are RNNs", ICML 2020); the feature map
    φ is the caller's (apply it to q and k first). ``normalize=True`` divides by ``φ(q)ᵀ Σ φ(k) + 1e-10``
    (FLA's constant) and the state is then ``(S, z)`` with z [B, H, K] the key sum."""
    if normalize:
        init = None if initial_state is None else MatrixState(*initial_state)
        o, state = matrix.apply(q, k, v, normalizer="sum", eps=1e-10, scale=scale, initial_state=init,
                                **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
        return _result(o, (state.S, state.n), output_final_state)
    o, state = matrix.apply(q, k, v, scale=scale, initial_state=initial_state,
                            **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
    return _result(o, state, output_final_state)


def simple_gla(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state: bool = False,
               reset=None, reverse: bool = False, mode: str = "auto", chunk_size=None, implementation=None):
    """Gated linear attention with one log decay per head and step, g [B, T, H] (g = 0 or None: no decay)."""
    if g is not None and np.ndim(g) != 3:
        raise ValueError(f"simple_gla: g must have shape [B, T, H] (one decay per head), got {np.shape(g)}")
    o, state = matrix.apply(q, k, v, g, scale=scale, initial_state=initial_state,
                            **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
    return _result(o, state, output_final_state)


def _constant_decay(who: str, q, log_decay_per_head):
    """A fixed log decay per head, [H], broadcast to [B, T, H] like q [B, T, H, K]."""
    batch, time, heads = np.shape(q)[:3]
    return jnp.broadcast_to(log_decay_per_head.astype(jnp.float32), (batch, time, heads))


def retention_log_decay(heads: int) -> jax.Array:
    """RetNet's fixed decays per head, γ_h = 1 - 2^(-5-h), as log γ [H] (Sun et al. 2023, §2.2)."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))))


def retention(q, k, v, *, scale=None, initial_state=None, output_final_state: bool = False, reset=None,
              reverse: bool = False, mode: str = "auto", chunk_size=None, implementation=None):
    """RetNet's multi-scale retention (Y. Sun et al., "Retentive Network", 2023): simple GLA with
    the fixed decay γ_h = 1 - 2^(-5-h) of head h. xPos rotation of q and k is the caller's."""
    if np.ndim(q) != 4:
        raise ValueError(f"retention: q must have shape [B, T, H, K], got {np.shape(q)}")
    g = _constant_decay("retention", q, retention_log_decay(np.shape(q)[2]))
    return simple_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, reset=reset, reverse=reverse, mode=mode,
                      chunk_size=chunk_size, implementation=implementation)


def lightning_log_decay(heads: int, layer_idx: int, num_layers: int) -> jax.Array:
    """TransNormerLLM's decay per head for layer ``layer_idx`` of ``num_layers``, as FLA computes it:
    log λ_h = -(8 / H)(1 - layer_idx / num_layers) h. Head 0 does not decay."""
    if not (isinstance(num_layers, int) and num_layers > 0 and isinstance(layer_idx, int)
            and 0 <= layer_idx < num_layers):
        raise ValueError(f"lightning_attention: need 0 <= layer_idx < num_layers, got "
                         f"layer_idx={layer_idx!r}, num_layers={num_layers!r}")
    return -(8.0 / heads) * (1.0 - layer_idx / num_layers) * jnp.arange(heads, dtype=jnp.float32)


def lightning_attention(q, k, v, layer_idx: int, num_layers: int, *, scale=None, initial_state=None,
                        output_final_state: bool = False, reset=None, reverse: bool = False,
                        mode: str = "auto", chunk_size=None, implementation=None):
    """Lightning Attention-2 (Z. Qin et al., 2024): linear attention with TransNormerLLM's fixed decay
    per head, computed in tiles: the intra-block part as masked attention and the inter-block part
    through the carried state, i.e. the engine's chunked mode (``chunk_size`` is the block size)."""
    if np.ndim(q) != 4:
        raise ValueError(f"lightning_attention: q must have shape [B, T, H, K], got {np.shape(q)}")
    g = _constant_decay("lightning_attention", q, lightning_log_decay(np.shape(q)[2], layer_idx, num_layers))
    return simple_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, reset=reset, reverse=reverse, mode=mode,
                      chunk_size=chunk_size, implementation=implementation)


def gla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state: bool = False, reset=None,
        reverse: bool = False, mode: str = "auto", chunk_size=None, implementation=None):
    """Gated linear attention (S. Yang et al., ICML 2024): a log decay per key dimension, gk [B, T, H, K]."""
    if np.ndim(gk) != 4:
        raise ValueError(f"gla: gk must have shape [B, T, H, K] (one decay per key dimension), "
                         f"got {np.shape(gk)}")
    o, state = matrix.apply(q, k, v, gk, scale=scale, initial_state=initial_state,
                            **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
    return _result(o, state, output_final_state)


def hgrn2(q, v, g, *, scale=None, initial_state=None, output_final_state: bool = False, reset=None,
          reverse: bool = False, mode: str = "auto", chunk_size=None, implementation=None):
    """HGRN2's state expansion (Z. Qin et al., "HGRN2: Gated Linear RNNs with State Expansion", 2024):
    ``S_t = Diag(f_t) S_{t-1} + (1 - f_t) v_tᵀ``, ``o_t = S_tᵀ q_t``, with g = log f [B, T, H, K]:
    GLA whose key is the forget gate's complement, computed as -expm1(g) (exact for f near 1)."""
    if np.ndim(g) != 4:
        raise ValueError(f"hgrn2: g must have shape [B, T, H, K] like q, got {np.shape(g)}")
    k = -jnp.expm1(g.astype(jnp.promote_types(jnp.float32, g.dtype))).astype(q.dtype)
    return gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
               reset=reset, reverse=reverse, mode=mode, chunk_size=chunk_size, implementation=implementation)


def gateloop(q, k, v, log_a, *, scale=None, initial_state=None, output_final_state: bool = False, reset=None,
             reverse: bool = False, mode: str = "auto", chunk_size=None, implementation=None):
    """GateLoop (T. Katsch, 2023): data-controlled diagonal transitions a_t = exp(log_a_t) per key
    dimension, complex when ``log_a`` is (log |a| + i·phase), and ``o_t = Re(S_tᵀ q_t)``. The state is
    complex64 for a complex ``log_a``; q, k, v may be real or complex."""
    if np.ndim(log_a) != 4:
        raise ValueError(f"gateloop: log_a must have shape [B, T, H, K], got {np.shape(log_a)}")
    o, state = matrix.apply(q, k, v, log_a, scale=scale, initial_state=initial_state,
                            **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
    if jnp.iscomplexobj(o):
        o = jnp.real(o).astype(jnp.real(jnp.zeros((), v.dtype)).dtype)
    return _result(o, state, output_final_state)


def rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state: bool = False, reset=None,
          reverse: bool = False, mode: str = "auto", chunk_size=None, implementation=None):
    """RWKV-6 "Finch" time mixing (B. Peng et al., "Eagle and Finch", 2024), FLA's ``chunk_rwkv6``:
    ``o_t = scale · r_tᵀ (S_{t-1} + Diag(u) k_t v_tᵀ)``, ``S_t = Diag(exp(w_t)) S_{t-1} + k_t v_tᵀ``,
    with w [B, T, H, K] the log decay (w = -exp(·) in the model) and u [H, K] the current-token bonus."""
    if np.ndim(w) != 4:
        raise ValueError(f"rwkv6: w must have shape [B, T, H, K] like r, got {np.shape(w)}")
    heads, dk = np.shape(r)[2:] if np.ndim(r) == 4 else (None, None)
    if np.shape(u) != (heads, dk):
        raise ValueError(f"rwkv6: u must have shape [H, K] = {(heads, dk)} to match r {np.shape(r)}, got "
                         f"{np.shape(u)}")
    o, state = matrix.apply(r, k, v, w, scale=scale, initial_state=initial_state, exclusive=True,
                            **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
    acc = jnp.promote_types(jnp.float32, o.dtype)
    scale = dk ** -0.5 if scale is None else scale
    bonus = scale * jnp.sum(r.astype(acc) * u.astype(acc) * k.astype(acc), axis=-1, keepdims=True)
    o = (o.astype(acc) + bonus * v.astype(acc)).astype(o.dtype)
    return _result(o, state, output_final_state)


def mlstm(q, k, v, i, f, *, forget_gate: str = "sigmoid", scale=None, eps: float = 1e-6, initial_state=None,
          output_final_state: bool = False, reset=None, reverse: bool = False, mode: str = "auto",
          chunk_size=None, implementation=None):
    """xLSTM's mLSTM cell (M. Beck et al., NeurIPS 2024), as ``mlstm_kernels`` computes it: per head,
    with the input gate exp(i_t) and the forget gate σ(f_t) (``forget_gate="sigmoid"``) or exp(f_t)::

        C_t = f_t C_{t-1} + i_t k_t v_tᵀ,   n_t = f_t n_{t-1} + i_t k_t,   m_t = max(log f_t + m_{t-1}, i_t)
        h_t = C̃_tᵀ q_t / (max(|ñ_tᵀ q_t|, exp(-m_t)) + eps)          (C̃, ñ scaled by exp(-m_t))

    i, f [B, T, H] are the pre-activations; q is scaled by ``scale`` (default K^-1/2). The state is
    ``(C [B, H, K, V], n [B, H, K], m [B, H])``, stabilised; a fresh state has m = 0."""
    if forget_gate not in ("sigmoid", "exp"):
        raise ValueError(f"mlstm: forget_gate must be 'sigmoid' or 'exp', got {forget_gate!r}")
    if np.ndim(f) != 3 or not hasattr(f, "dtype"):
        raise ValueError(f"mlstm: f must be an array [B, T, H], got shape {np.shape(f)}")
    log_f = f.astype(jnp.promote_types(jnp.float32, f.dtype))
    log_f = jax.nn.log_sigmoid(log_f) if forget_gate == "sigmoid" else log_f
    init = None if initial_state is None else MatrixState(*initial_state)
    o, state = matrix.apply(q, k, v, log_f, log_input_gate=i, normalizer="max_abs", eps=eps, scale=scale,
                            initial_state=init,
                            **_engine_kwargs(reset, reverse, mode, chunk_size, implementation))
    return _result(o, tuple(state), output_final_state)
