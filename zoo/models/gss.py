"""GSS: the gated state space layer.

Paper: H. Mehta, A. Gupta, A. Cutkosky, B. Neyshabur, "Long Range Language Modeling via Gated State
Spaces" (ICLR 2023).

The layer (the paper's Figure 1 pseudocode), with E = d_model, F = d_expand, H = d_ssm (H < F: the
SSM runs on a reduced width, which is what makes GSS cheaper than DSS)::

    v = GELU(x W_v + b_v)                 [.., F]
    u = GELU(x W_u + b_u)                 [.., H]
    y = DSS(u)                            [.., H]   (DSS-exp, see zoo/models/dss.py)
    o = ((y W_y + b_y) ⊙ v) W_o + b_o     [.., E]

Engine: ``zoo.ops.lti.DiagonalSSM`` through ``zoo.models.dss.dss_system``: ``"conv"`` (Vandermonde
kernel + FFT), ``"sequential"`` and ``"associative"``; the state is the DSS state over the H
reduced channels, so ``step`` decodes with O(H · d_state) state.

What differs from the paper, and why: the paper's block also normalises x first and adds the
shortcut ``o + x``; here those come from ``zoo.residual(zoo.get("gss"), mlp_ratio=0)``, as for every
other mixer in the zoo. The SSM runs in float32 whatever the input dtype; the projections run in the
input dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import cast, dense_init
from zoo.models.dss import dss_system
from zoo.models.s4d import check_even_state, check_ssm_config, complex_normal, log_dt_init
from zoo.ops import hippo, lti
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class GSSConfig:
    d_model: int = 8          # E: input and output width
    d_expand: int = 16        # F: width of the gate v
    d_ssm: int = 4            # H: channels of the DSS
    d_state: int = 8          # real state size per DSS channel (d_state/2 complex entries)
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        check_ssm_config("gss", self)
        check_even_state("gss", self.d_state)


def _projections(params, x):
    p = cast({k: params[k] for k in ("w_v", "b_v", "w_u", "b_u")}, x.dtype)
    return jax.nn.gelu(x @ p["w_v"] + p["b_v"]), jax.nn.gelu(x @ p["w_u"] + p["b_u"])


def _gate_out(params, y, v):
    p = cast({k: params[k] for k in ("w_y", "b_y", "w_o", "b_o")}, v.dtype)
    return ((y.astype(v.dtype) @ p["w_y"] + p["b_y"]) * v) @ p["w_o"] + p["b_o"]


@register("gss", config=GSSConfig, paper="Long Range Language Modeling via Gated State Spaces",
          engine="lti", modes=lti.DIAGONAL_MODES, state_size=lambda c: c.d_ssm * c.d_state)
def build(config: GSSConfig):
    e, f, h, n = config.d_model, config.d_expand, config.d_ssm, config.d_state // 2

    def init(key, d_in):
        k_v, k_u, k_y, k_o, k_dt, k_w, k_d = jax.random.split(key, 7)
        lam = hippo.hippo_n(config.d_state)
        w_re, w_im = complex_normal(k_w, (h, n))
        return {
            "w_v": dense_init(k_v, d_in, f), "b_v": jnp.zeros((f,), jnp.float32),
            "w_u": dense_init(k_u, d_in, h), "b_u": jnp.zeros((h,), jnp.float32),
            "a_re_log": jnp.asarray(np.log(-lam.real), jnp.float32),
            "a_im": jnp.asarray(lam.imag, jnp.float32),
            "w_re": w_re, "w_im": w_im,
            "log_dt": log_dt_init(k_dt, (h,), config.dt_min, config.dt_max),
            "d": jax.random.normal(k_d, (h,), jnp.float32),
            "w_y": dense_init(k_y, h, f), "b_y": jnp.zeros((f,), jnp.float32),
            "w_o": dense_init(k_o, f, e), "b_o": jnp.zeros((e,), jnp.float32),
        }

    def initial_state(params, batch):
        return lti.zero_state(dss_system(params), batch)

    def step(params, state, x_t):
        v, u = _projections(params, x_t)
        state, y = lti.step(dss_system(params), state, u)
        return state, _gate_out(params, y, v)

    def apply(params, xs, state, reset, mode, reverse):
        v, u = _projections(params, xs)
        y, final = lti.apply(dss_system(params), u, initial_state=state, reset=reset, reverse=reverse,
                             mode=mode)
        return _gate_out(params, y, v), final

    return make_recurrence("gss", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_v"].shape[0], modes=lti.DIAGONAL_MODES, default_d_in=e)
