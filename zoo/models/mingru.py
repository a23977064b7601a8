"""minGRU: the GRU with its gates cut loose from the state.

Paper: L. Feng, F. Tung, M. O. Ahmed, Y. Bengio, H. Hajimirsadeghi, "Were RNNs All We Needed?" (2024).

    k_t   = W_z x_t + b_z                 z_t = σ(k_t)
    h̃_t  = g(W_h x_t + b_h)               g(v) = v + 1/2 (v ≥ 0),  σ(v) (v < 0)
    h_t   = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t,      y_t = h_t

Neither gate reads ``h_{t-1}``, so the recurrence is diagonal and linear in the state,
``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a_t = σ(-k_t)`` and ``b_t = σ(k_t) h̃_t``; it runs on the
diagonal engine in its modes ``"sequential"``, ``"associative"`` and ``"chunked"``. The paper's
log-space form (its Appendix) is the pair of modes ``"log_sequential"`` / ``"log_associative"``
(the engine's ``apply_log`` in its two modes): with ``log a_t = log(1 - z_t) = -softplus(k_t)`` and
``log b_t = log z_t + log h̃_t = -softplus(-k_t) + log g(W_h x_t + b_h)`` the scan runs on
``log h``, which stays finite however saturated the gates are.

What differs from the paper, and why:

* ``g`` is applied in every mode (``positive_candidate=True``, the default). The paper uses the
  identity for its plain version and ``g`` for the log-space one; applying it everywhere makes all
  modes compute one function. ``positive_candidate=False`` gives the plain version
  (``h̃_t = W_h x_t + b_h``) without the log modes, which need ``h̃ > 0``.
* The paper's log-space code feeds ``log g(h_0)``, treating the initial state as a pre-activation.
  Here the state is ``h`` itself (float32, any sign; the engine keeps it out of the logarithm), so
  the state returned by one call can be passed to the next.
* Both projections have biases (the paper's ``nn.Linear`` default). The projections run in the
  compute dtype (the input dtype). In the log modes the gate logarithms are taken in float32,
  because a logarithm rounded to bfloat16 loses ~|log b|·2⁻⁸ of relative precision after ``exp``.
  The state is float32.

State: h [B, D] (D = d_model). Engine: diagonal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import cast, check_chunk_size, chunk_kwargs, dense_init
from zoo.ops import diagonal
from zoo.registry import register

# The engine's log-space scan, one model mode per engine mode.
LOG_MODES = tuple(f"log_{m}" for m in diagonal.LOG_MODES)
MODES = (*diagonal.MODES, *LOG_MODES)


def positive_candidate(v: jax.Array) -> jax.Array:
    """The paper's g: v + 1/2 for v >= 0 and σ(v) below; continuous, increasing, always > 0."""
    return jnp.where(v >= 0, v + 0.5, jax.nn.sigmoid(v))


def log_positive_candidate(v: jax.Array) -> jax.Array:
    """log g(v) without forming g: log(v + 1/2) for v >= 0, -softplus(-v) below."""
    return jnp.where(v >= 0, jnp.log(jnp.maximum(v, 0) + 0.5), -jax.nn.softplus(-v))


@dataclasses.dataclass(frozen=True)
class MinGRUConfig:
    d_model: int = 32
    positive_candidate: bool = True
    chunk_size: int = 64  # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("mingru", self.chunk_size)
        if self.d_model <= 0:
            raise ValueError(f"mingru: d_model must be positive, got {self.d_model}")


def init_projections(key: jax.Array, d_in: int, d: int, names: tuple[str, ...]) -> dict:
    """Independent LeCun-normal projections ``w_<name>`` [d_in, d] with zero biases ``bias_<name>``."""
    params = {}
    for k, n in zip(jax.random.split(key, len(names)), names, strict=True):
        params[f"w_{n}"] = dense_init(k, d_in, d)
        params[f"bias_{n}"] = jnp.zeros((d,), jnp.float32)
    return params


def project(params: dict, x: jax.Array, name: str) -> jax.Array:
    """``x @ w_<name> + bias_<name>`` in the compute dtype of ``x`` ([..., d_in] -> [..., d])."""
    w, b = cast((params[f"w_{name}"], params[f"bias_{name}"]), x.dtype)
    return x @ w + b


def min_rnn_recurrence(name: str, config, gate_names: tuple[str, ...], coefficients, log_coefficients):
    """The Recurrence shared by minGRU and minLSTM: projections, then one diagonal-engine call.

    ``coefficients(params, x) -> (a, b)`` and ``log_coefficients(params, x) -> (log_a, log_b)``
    map inputs [..., d_in] to the recurrence h_t = a_t ⊙ h_{t-1} + b_t. The log modes run
    ``diagonal.apply_log`` (only with the positive candidate, where b > 0); the others ``apply``.
    """
    d = config.d_model
    modes = MODES if config.positive_candidate else diagonal.MODES

    def init(key, d_in):
        return init_projections(key, d_in, d, gate_names)

    def initial_state(params, batch):
        return jnp.zeros((batch, d), jnp.float32)

    def step(params, h, x_t):
        h_new = diagonal.step(*coefficients(params, x_t), h)
        return h_new, h_new.astype(x_t.dtype)

    def apply(params, xs, h, reset, mode, reverse):
        if mode in LOG_MODES:
            log_a, log_b = log_coefficients(params, xs)
            hs, final = diagonal.apply_log(log_a, log_b=log_b, initial_state=h, reset=reset,
                                           reverse=reverse, mode=mode.removeprefix("log_"))
        else:
            a, b = coefficients(params, xs)
            hs, final = diagonal.apply(a, b, initial_state=h, reset=reset, reverse=reverse, mode=mode,
                                       **chunk_kwargs(mode, config.chunk_size))
        return hs.astype(xs.dtype), final

    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p[f"w_{gate_names[0]}"].shape[0], modes=modes,
                           default_d_in=d)


@register("mingru", config=MinGRUConfig, paper="Were RNNs All We Needed?", engine="diagonal",
          modes=MODES, state_size=lambda c: c.d_model)
def build(config: MinGRUConfig):
    candidate = positive_candidate if config.positive_candidate else (lambda v: v)

    def coefficients(params, x):
        k = project(params, x, "z")
        return jax.nn.sigmoid(-k), jax.nn.sigmoid(k) * candidate(project(params, x, "h"))

    def log_coefficients(params, x):
        # At least float32: a logarithm rounded to bfloat16 loses precision after exp.
        wide = lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32))
        k, v = wide(project(params, x, "z")), wide(project(params, x, "h"))
        return -jax.nn.softplus(k), -jax.nn.softplus(-k) + log_positive_candidate(v)

    return min_rnn_recurrence("mingru", config, ("z", "h"), coefficients, log_coefficients)
