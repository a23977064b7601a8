"""Hydra: the bidirectional quasiseparable mixer built from two SSD scans with shared projections.

Paper: S. Hwang, A. Lahoti, T. Dao, A. Gu, "Hydra: Bidirectional State Space Models Through
Generalized Matrix Mixers" (NeurIPS 2024; arXiv 2407.09941). The block follows ``Hydra`` of the
authors' code (goombalab/hydra, ``hydra/modules/hydra.py``), itself Mamba-2's block made
bidirectional. With E = expand · d_model, H = E / d_head heads, G = n_groups, N = d_state::

    [z, x̃, B̃_f, C̃_f, B̃_b, C̃_b, dt_f, dt_b] = u W_in        one shared input projection
    [x, B_f, C_f, B_b, C_b] = SiLU(conv1d_K(...))           depthwise, centred (non-causal), K = d_conv
    SS_f = SSD(x, Δ_f, A, B_f, C_f)                          forward scan (zoo.ops.ssd)
    SS_b = SSD(x, Δ_b, A, B_b, C_b) run backwards in time    = flip(SS(flip(x))); both scans are one
                                                             SSD call on the doubled batch
    y_t  = SS_f[t-1] + SS_b[t+1] + δ_t ⊙ x_t                 the paper's QS(X) = shift(SS(X))
                                                             + flip(shift(SS(flip(X)))) + D X
    δ_t  = D + x_t W_D                                       per head, data dependent
    o_t  = (RMSNorm(y_t) ⊙ SiLU(z_t)) W_out

with Δ_{f,b} = softplus(dt_{f,b} + dt_bias) and A = -exp(A_log) shared by both directions. The
shifts (SS_f[-1] = SS_b[T] = 0) make the two scans strictly lower and strictly upper triangular, so
the whole mixer is the quasiseparable matrix (per head, acting on x_j ∈ R^P)::

    m_ij = C_f,i-1ᵀ (Π_{k=j+1..i-1} a_f,k) Δ_f,j B_f,j     i > j      a_{f,b},k = exp(Δ_{f,b},k A)
    m_ii = δ_i
    m_ij = C_b,i+1ᵀ (Π_{k=i+1..j-1} a_b,k) Δ_b,j B_b,j     i < j

i.e. the paper's quasiseparable form whose generators c_i are read from the neighbouring token
(the authors' code computes exactly this). ``tests/test_hydra.py`` builds this matrix densely.

Initialisation as in the authors' code: every A_h = 1 (``a_init_range=(1, 1)``), Δ's bias the
inverse softplus of a log-uniform draw in [dt_min, dt_max], D = 1, norm scale 1, convolution
uniform(±1/sqrt(K)); projections (W_in, W_D, W_out) LeCun-normal.

State and segments. Hydra reads the future, so it has no ``step`` (``causal=False``, like
``zoo.bidirectional``). Its state is the pair of SSD states ``(forward [B, H, P, N], backward
[B, H, P, N])``: a given state enters the forward scan before step 0 and the backward scan after
step T-1, and the final state holds the forward scan after step T-1 and the backward scan after
step 0. ``reset`` makes each segment independent: both scans drop their state at the segment's
edges, the shifted read-outs do not cross them, and the centred convolution reads zeros outside
the segment. ``reverse=True`` runs the block on the time-reversed sequence and flips the result
back (the mirror image; the convolution is not symmetric, so it is a different function).

Differences from the authors' code: input-major params; the convolution taps are [K, C]
(``weight[k]`` multiplies x_{t+k-K//2}, torch's ``Conv1d(padding=K//2)``; for even K the first T
of torch's T+1 outputs); no fused kernel, ``learnable_init_states`` (pass a state instead) or
``dt_limit``; Δ, A and the scans' accumulation stay float32 in bfloat16 compute.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import dense_init
from zoo.models.mamba2 import (
    Mamba2Config,
    conv_init,
    decay_rate,
    dt_bias_init,
    gated_rms_norm,
    projection,
)
from zoo.ops._time import reset_for_reverse
from zoo.ops.ssd_scan import MODES, ssd
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class HydraConfig(Mamba2Config):
    """Mamba-2's fields; here ``d_conv`` is the width of the centred convolution, ``n_groups`` counts
    the (B, C) groups per direction, and A starts at 1 (the authors' defaults; they use chunks of 256)."""

    name: ClassVar[str] = "hydra"
    d_conv: int = 7
    a_init_range: tuple[float, float] = (1.0, 1.0)


def centred_conv(x, kernel, bias, segment):
    """Depthwise non-causal convolution: ``y_t = bias + Σ_k kernel[k] ⊙ x_{t+k-K//2}``.

    x [B, T, C], kernel [K, C], bias [C] or None, segment [B, T] int (or None): a tap reads zero
    outside the sequence and wherever its segment differs from that of t.
    """
    taps, time = kernel.shape[0], x.shape[1]
    left, right = taps // 2, taps - 1 - taps // 2
    padded = jnp.pad(x, [(0, 0), (left, right), (0, 0)])
    if segment is not None:
        seg_padded = jnp.pad(segment, [(0, 0), (left, right)], constant_values=-1)
    kernel = kernel.astype(x.dtype)
    y = jnp.zeros_like(x)
    for k in range(taps):
        window = padded[:, k:k + time]
        if segment is not None:
            window = jnp.where((seg_padded[:, k:k + time] == segment)[..., None], window, 0)
        y = y + kernel[k] * window
    return y if bias is None else y + bias.astype(x.dtype)


def shift_from(y, reset, later: bool):
    """y [B, T, ...] moved one step so that step t reads t-1 (or t+1 when ``later``), with zeros
    where that neighbour is outside the sequence or in another segment."""
    zeros = jnp.zeros_like(y[:, :1])
    if later:
        shifted = jnp.concatenate([y[:, 1:], zeros], axis=1)
        crossing = None if reset is None else jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], 1)
    else:
        shifted = jnp.concatenate([zeros, y[:, :-1]], axis=1)
        crossing = reset
    if crossing is None:
        return shifted
    return jnp.where(crossing.reshape(crossing.shape + (1,) * (y.ndim - 2)), 0, shifted)


def _state_size(c: HydraConfig) -> int:
    return 2 * c.d_inner * c.d_state


@register("hydra", config=HydraConfig,
          paper="Hydra: Bidirectional State Space Models Through Generalized Matrix Mixers",
          engine="ssd", modes=MODES, state_size=_state_size)
def build(config: HydraConfig):
    e, n, g = config.d_inner, config.d_state, config.n_groups
    heads, p, taps = config.n_heads, config.d_head, config.d_conv
    conv_width = e + 4 * g * n
    proj_width = 2 * e + 4 * g * n + 2 * heads
    name = "hydra"

    def init(key, d_in):
        k_in, k_conv, k_dt, k_a, k_diag, k_out = jax.random.split(key, 6)
        params = {
            "w_in": dense_init(k_in, d_in, proj_width),
            **conv_init(k_conv, taps, conv_width, config.conv_bias),
            "dt_bias": dt_bias_init(k_dt, heads, config.dt_min, config.dt_max, config.dt_init_floor),
            "a_log": jnp.log(jax.random.uniform(k_a, (heads,), jnp.float32, *config.a_init_range)),
            "d_skip": jnp.ones((heads,), jnp.float32),
            "w_diag": dense_init(k_diag, e, heads),
            "norm_scale": jnp.ones((e,), jnp.float32),
            "w_out": dense_init(k_out, e, config.d_model),
        }
        if config.bias:
            params["b_in"] = jnp.zeros((proj_width,), jnp.float32)
            params["b_out"] = jnp.zeros((config.d_model,), jnp.float32)
        return params

    def initial_state(params, batch):
        zeros = jnp.zeros((batch, heads, p, n), jnp.float32)
        return (zeros, zeros)

    def step(params, state, x_t):
        raise TypeError(f"{name}: step is undefined because Hydra's backward scan and centred convolution "
                        f"read the future; use apply over the whole sequence (causal=False)")

    def mix(params, us, state, reset, mode):
        """The block forwards in time; ``reset`` marks segment starts (or None)."""
        batch, time, _ = us.shape
        z, xbc, dt = jnp.split(projection(params, "in", us), (e, e + conv_width), axis=-1)
        segment = None if reset is None else jnp.cumsum(reset, axis=1)
        xbc = jax.nn.silu(centred_conv(xbc, params["conv_kernel"], params.get("conv_bias"), segment))
        x, b_f, c_f, b_b, c_b = jnp.split(xbc, [e + i * g * n for i in range(4)], axis=-1)
        x_heads = x.reshape(batch, time, heads, p)
        dt_f, dt_b = jnp.split(dt, 2, axis=-1)
        groups = lambda v: v.reshape(batch, time, g, n)
        # Both scans in one SSD call, as in the authors' code: the batch doubled, its second half
        # time-reversed (so it runs backwards), with the reset flags of the reversed direction.
        flip = lambda v: jnp.flip(v, axis=1)
        both = lambda f, b: jnp.concatenate([f, flip(b)], axis=0)
        flags = None if reset is None else jnp.concatenate([reset, reset_for_reverse(reset)], axis=0)
        ss, h = ssd(both(x_heads, x_heads), both(dt_f, dt_b), decay_rate(params),
                    both(groups(b_f), groups(b_b)), both(groups(c_f), groups(c_b)), config.chunk_size,
                    dt_bias=params["dt_bias"],
                    dt_softplus=True, initial_states=jnp.concatenate(state, axis=0), return_final_states=True,
                    reset=flags, mode=mode)
        ss_f, ss_b, h_f, h_b = ss[:batch], flip(ss[batch:]), h[:batch], h[batch:]
        delta = projection(params, "diag", x) + params["d_skip"].astype(x.dtype)           # [B, T, H]
        y = (shift_from(ss_f, reset, later=False) + shift_from(ss_b, reset, later=True)
             + delta[..., None] * x_heads)
        y = gated_rms_norm(y.reshape(batch, time, e), z, params["norm_scale"], groups=1, eps=config.norm_eps,
                           norm_before_gate=True)
        return projection(params, "out", y), (h_f, h_b)

    def apply(params, us, state, reset, mode, reverse):
        if not reverse:
            return mix(params, us, state, reset, mode)
        ys, final = mix(params, jnp.flip(us, axis=1), state, reset_for_reverse(reset), mode)
        return jnp.flip(ys, axis=1), final

    # Jitted once here so that eager calls are one dispatch; under an outer jit it is inlined.
    rec = make_recurrence(name, init=init, initial_state=initial_state, step=step,
                          apply=jax.jit(apply, static_argnums=(4, 5)),
                          input_width=lambda params: params["w_in"].shape[0], modes=MODES,
                          default_d_in=config.d_model)
    # step raises before any input check: no input could make it defined.
    return rec._replace(step=step, causal=False)
