"""minLSTM: the LSTM with state-free gates, normalised so that forget + input = 1.

Paper: L. Feng, F. Tung, M. O. Ahmed, Y. Bengio, H. Hajimirsadeghi, "Were RNNs All We Needed?" (2024).

    f_t = σ(W_f x_t + b_f),   i_t = σ(W_i x_t + b_i),   h̃_t = g(W_h x_t + b_h)
    f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)
    h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t,     y_t = h_t

with the paper's ``g(v) = v + 1/2 (v ≥ 0), σ(v) (v < 0)``. The normalisation makes each step a
convex combination of the old state and the candidate, so the scale of ``h`` does not grow with
the sequence length (the paper's "length independence"). The recurrence is diagonal and linear
in the state (``a_t = f'_t``, ``b_t = i'_t h̃_t``) and runs on the diagonal engine. Log-space modes
``"log_sequential"`` / ``"log_associative"`` follow the paper's Appendix: with
``d_t = softplus(-k_f) - softplus(-k_i) = log(i_t / f_t)``,
``log f'_t = -softplus(d_t)`` and ``log i'_t = -softplus(-d_t)``, so
``log b_t = -softplus(-d_t) + log g(W_h x_t + b_h)``.

What differs from the paper, and why (as for minGRU, see ``zoo/models/mingru.py``): ``g`` is
applied in every mode (``positive_candidate=False`` gives the plain version without the log
modes); the state is ``h`` itself (any sign) rather than a pre-activation passed through ``g``;
the three projections have biases; log-space gates are computed in float32.

State: h [B, D] (D = d_model). Engine: diagonal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models._common import check_chunk_size
from zoo.models.mingru import (
    MODES,
    log_positive_candidate,
    min_rnn_recurrence,
    positive_candidate,
    project,
)
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class MinLSTMConfig:
    d_model: int = 32
    positive_candidate: bool = True
    chunk_size: int = 64  # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("minlstm", self.chunk_size)
        if self.d_model <= 0:
            raise ValueError(f"minlstm: d_model must be positive, got {self.d_model}")


@register("minlstm", config=MinLSTMConfig, paper="Were RNNs All We Needed?", engine="diagonal",
          modes=MODES, state_size=lambda c: c.d_model)
def build(config: MinLSTMConfig):
    candidate = positive_candidate if config.positive_candidate else (lambda v: v)

    def coefficients(params, x):
        # With d = log(i / f): f' = f / (f + i) = σ(-d) and i' = σ(d).
        odds = jax.nn.softplus(-project(params, x, "f")) - jax.nn.softplus(-project(params, x, "i"))
        return jax.nn.sigmoid(-odds), jax.nn.sigmoid(odds) * candidate(project(params, x, "h"))

    def log_coefficients(params, x):
        # At least float32: a logarithm rounded to bfloat16 loses precision after exp.
        wide = lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32))
        kf, ki = wide(project(params, x, "f")), wide(project(params, x, "i"))
        odds = jax.nn.softplus(-kf) - jax.nn.softplus(-ki)
        v = wide(project(params, x, "h"))
        return -jax.nn.softplus(odds), -jax.nn.softplus(-odds) + log_positive_candidate(v)

    return min_rnn_recurrence("minlstm", config, ("f", "i", "h"), coefficients, log_coefficients)
