"""The public ops of the delta-rule engine, with FLA's names and argument order: thin front ends to
``zoo.ops.delta``.

=====================  ==========================================================  ==========================
op                     recurrence (per head)                                       FLA
=====================  ==========================================================  ==========================
``delta_rule``         S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ; o = Sᵀq     ``chunk_delta_rule``
``gated_delta_rule``   S_t = exp(g_t)(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ      ``chunk_gated_delta_rule``
=====================  ==========================================================  ==========================

Both take q, k [B, T, H, K], v [B, T, H, V], β [B, T, H] (in (0, 1), already activated), the
gated one a log decay g [B, T, H]; ``scale`` (default K^-1/2) multiplies q; ``initial_state``
[B, H, K, V]; they return ``(o, final_state)`` with ``final_state`` None unless
``output_final_state``. ``use_qk_l2norm_in_kernel=True`` first divides q and k by
``sqrt(Σ x² + 1e-6)`` over the key dimension, as FLA's kernels do. Also the engine's ``reset``
(bool [B, T], packed sequences), ``reverse``, ``mode`` ("auto", "chunked", "sequential") and
``chunk_size``. States are float32 whatever the input dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from zoo.ops import delta
from zoo.ops._checks import check_float

L2NORM_EPS = 1e-6      # FLA's l2norm default (fla/modules/norm/l2norm.py)


def l2_normalize(x, eps: float = L2NORM_EPS):
    """x / sqrt(Σ x² + eps) over the last axis, computed in float32 or wider (FLA's ``l2norm``)."""
    x = x.astype(jnp.promote_types(jnp.float32, x.dtype))
    return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps))


def _run(who, q, k, v, beta, g, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, reset,
         reverse, mode, chunk_size, implementation):
    if use_qk_l2norm_in_kernel:
        check_float(who, "q", q)
        check_float(who, "k", k)
        q, k = l2_normalize(q), l2_normalize(k)
    o, state = delta.apply(q, k, v, beta, g, scale=scale, initial_state=initial_state, reset=reset,
                           reverse=reverse, mode=mode, chunk_size=chunk_size, implementation=implementation)
    return o, (state if output_final_state else None)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
               use_qk_l2norm_in_kernel: bool = False, reset=None, reverse: bool = False, mode: str = "auto",
               chunk_size=None, implementation=None):
    """DeltaNet's delta rule (S. Yang et al., "Parallelizing Linear Transformers with the Delta Rule
    over Sequence Length", NeurIPS 2024): ``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``,
    ``o_t = S_tᵀ q_t · scale``; FLA's ``chunk_delta_rule`` / ``fused_recurrent_delta_rule``.
    ``implementation``: see ``zoo.ops.delta.apply`` (the Pallas kernel ``chunked_delta`` or XLA)."""
    return _run("delta_rule", q, k, v, beta, None, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, reset, reverse, mode, chunk_size, implementation)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
                     use_qk_l2norm_in_kernel: bool = False, reset=None, reverse: bool = False,
                     mode: str = "auto", chunk_size=None, implementation=None):
    """The gated delta rule (S. Yang, J. Kautz, A. Hatamizadeh, "Gated Delta Networks", ICLR 2025):
    ``S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with g [B, T, H] the log decay (note
    FLA's order: g before beta); FLA's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule``.
    ``implementation``: see ``zoo.ops.delta.apply``."""
    return _run("gated_delta_rule", q, k, v, beta, g, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, reset, reverse, mode, chunk_size, implementation)
