"""S4D: the diagonal structured state space model, and the layer shared by the SISO SSMs here.

Paper: A. Gu, K. Goel, A. Gupta, C. Ré, "On the Parameterization and Initialization of Diagonal
State Space Models" (NeurIPS 2022).

Each of the H = d_model channels is a single-input single-output SSM with a diagonal complex
state, kept as one eigenvalue of each conjugate pair (M = d_state / 2 complex entries)::

    λ_n = −exp(a_re_log_n) + i a_im_n          (Re λ < 0 always, as in the paper's code)
    Δ   = exp(log_dt)                           log_dt ~ U[log dt_min, log dt_max]
    ZOH:      λ̄ = exp(Δλ),  B̄ = (exp(Δλ) − 1)/λ · B        (bilinear also offered)
    x_k = λ̄ ⊙ x_{k-1} + B̄ u_k,   y_k = 2 Re(Σ_n C_n x_{k,n}) + D u_k
    K_l = 2 Re(Σ_n C_n B̄_n λ̄_n^l)  (the Vandermonde kernel; y = K * u + D u)

Initialisation (Section 4 of the paper): S4D-Inv ``λ_n = −1/2 + i (N/π)(N/(2n+1) − 1)``, S4D-Lin
``λ_n = −1/2 + iπn``, or S4D-LegS (the diagonal of HiPPO-LegS's NPLR form); B = 1, C ~ N(0, 1)
complex (variance 1/2 per part).

The layer (S4's, used by s4, s4d, dss and lssl): ``u = x W_in`` (only when d_in ≠ d_model; the
paper has d_in = d_model and no projection), the SSM per channel, then ``out = GELU(y) W_out +
b_out``, the position-wise output mixing of the S4 layer. Norms and residuals come from
``zoo.residual``.

Engine: ``zoo.ops.lti`` (DiagonalSSM): modes ``"conv"`` (Vandermonde kernel + FFT), and the diagonal
engine's ``"sequential"`` and ``"associative"`` recurrences; ``"auto"`` follows ``zoo.ops.lti``
(the recurrence on CPU, conv elsewhere). With ``reset``
given, conv mode runs the sequential recurrence (see ``zoo.ops.lti``).

What differs from the paper, and why: the SSM itself is computed in float32 whatever the input dtype
(the eigenvalues and Δ must not be rounded to bfloat16; FFTs have no bfloat16), while the
projections run in the input dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import cast, dense_init
from zoo.ops import hippo, lti
from zoo.registry import register

# --------------------------------------------------------------------------------------------
# Shared by the SISO SSM layers (s4, s4d, dss, lssl).


def check_ssm_config(name: str, config) -> None:
    """Positive widths, an even d_state (conjugate pairs) and 0 < dt_min <= dt_max."""
    widths = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name.startswith("d_")}
    for field, value in widths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")
    if not 0 < config.dt_min <= config.dt_max:
        raise ValueError(f"{name}: need 0 < dt_min <= dt_max, got dt_min={config.dt_min}, "
                         f"dt_max={config.dt_max}")
    if hasattr(config, "discretisation") and config.discretisation not in lti.DISCRETISATIONS:
        raise ValueError(f"{name}: discretisation={config.discretisation!r}; choose one of "
                         f"{lti.DISCRETISATIONS}")


def check_even_state(name: str, d_state: int) -> None:
    if d_state % 2:
        raise ValueError(f"{name}: d_state must be even (the state is kept as conjugate pairs), "
                         f"got {d_state}")


def log_dt_init(key: jax.Array, shape, dt_min: float, dt_max: float) -> jax.Array:
    """log Δ uniform on [log dt_min, log dt_max] (S4's timescale initialisation)."""
    return jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))


def complex_normal(key: jax.Array, shape) -> tuple[jax.Array, jax.Array]:
    """(re, im) with E|z|² = 1."""
    k_re, k_im = jax.random.split(key)
    return (jax.random.normal(k_re, shape, jnp.float32) / math.sqrt(2),
            jax.random.normal(k_im, shape, jnp.float32) / math.sqrt(2))


def layer_init(key: jax.Array, d_in: int, d_model: int) -> dict:
    """The S4 layer's projections: W_in only when d_in ≠ d_model, then W_out, b_out."""
    k_in, k_out = jax.random.split(key)
    params = {"w_out": dense_init(k_out, d_model, d_model), "b_out": jnp.zeros((d_model,), jnp.float32)}
    if d_in != d_model:
        params["w_in"] = dense_init(k_in, d_in, d_model)
    return params


def layer_input(params: dict, x: jax.Array) -> jax.Array:
    return x @ params["w_in"].astype(x.dtype) if "w_in" in params else x


def layer_output(params: dict, y: jax.Array) -> jax.Array:
    w, b = cast((params["w_out"], params["b_out"]), y.dtype)
    return jax.nn.gelu(y) @ w + b


def layer_input_width(params: dict) -> int:
    return params["w_in"].shape[0] if "w_in" in params else params["w_out"].shape[0]


def ssm_layer(name: str, system_fn, *, init, d_model: int, modes):
    """The Recurrence of ``x -> layer_output(SSM(layer_input(x)))``; ``system_fn(params)`` is the lti
    system (rebuilt from the params on every call, so Δ, λ and the rest are trained)."""

    def initial_state(params, batch):
        return lti.zero_state(system_fn(params), batch)

    def step(params, state, x_t):
        state, y_t = lti.step(system_fn(params), state, layer_input(params, x_t))
        return state, layer_output(params, y_t)

    def apply(params, xs, state, reset, mode, reverse):
        ys, final = lti.apply(system_fn(params), layer_input(params, xs), initial_state=state, reset=reset,
                              reverse=reverse, mode=mode)
        return layer_output(params, ys), final

    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=layer_input_width, modes=modes, default_d_in=d_model)


# --------------------------------------------------------------------------------------------
# S4D.


@dataclasses.dataclass(frozen=True)
class S4DConfig:
    d_model: int = 8
    d_state: int = 8               # N: real state size per channel (N/2 complex pairs)
    init: str = "inv"              # "inv" (S4D-Inv), "lin" (S4D-Lin) or "legs" (S4D-LegS)
    discretisation: str = "zoh"    # "zoh" or "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        check_ssm_config("s4d", self)
        check_even_state("s4d", self.d_state)
        if self.init not in hippo.DIAGONAL_INITS:
            raise ValueError(f"s4d: init={self.init!r}; choose one of {hippo.DIAGONAL_INITS}")


def s4d_system(params: dict, discretisation: str) -> lti.DiagonalSSM:
    lam = -jnp.exp(params["a_re_log"]) + 1j * params["a_im"]
    delta = jnp.exp(params["log_dt"])[:, None]
    log_a, b_scale = lti.discretise_diagonal(lam, delta, discretisation)
    b = params["b_re"] + 1j * params["b_im"]
    c = params["c_re"] + 1j * params["c_im"]
    return lti.DiagonalSSM(log_a, b_scale * b, 2 * c, params["d"])


@register("s4d", config=S4DConfig,
          paper="On the Parameterization and Initialization of Diagonal State Space Models",
          engine="lti", modes=lti.DIAGONAL_MODES, state_size=lambda c: c.d_model * c.d_state)
def build(config: S4DConfig):
    h, m = config.d_model, config.d_state // 2

    def init(key, d_in):
        k_dt, k_c, k_d, k_layer = jax.random.split(key, 4)
        lam = np.tile(hippo.diagonal_init(config.init, m), (h, 1))
        c_re, c_im = complex_normal(k_c, (h, m))
        return {
            "a_re_log": jnp.asarray(np.log(-lam.real), jnp.float32),
            "a_im": jnp.asarray(lam.imag, jnp.float32),
            "b_re": jnp.ones((h, m), jnp.float32),
            "b_im": jnp.zeros((h, m), jnp.float32),
            "c_re": c_re, "c_im": c_im,
            "log_dt": log_dt_init(k_dt, (h,), config.dt_min, config.dt_max),
            "d": jax.random.normal(k_d, (h,), jnp.float32),
            **layer_init(k_layer, d_in, h),
        }

    return ssm_layer("s4d", lambda p: s4d_system(p, config.discretisation), init=init, d_model=h,
                     modes=lti.DIAGONAL_MODES)
