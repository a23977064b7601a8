"""LRU: the Linear Recurrent Unit.

Paper: A. Orvieto, S. L. Smith, A. Gu, A. Fernando, C. Gulcehre, R. Pascanu, S. De, "Resurrecting
Recurrent Neural Networks for Long Sequences" (ICML 2023).

    λ_j  = exp(-exp(ν_j) + i exp(θ_j))                     (|λ_j| = exp(-exp(ν_j)) < 1 always)
    γ_j  = exp(γ_log_j),  initialised to sqrt(1 - |λ_j|²)
    x_k  = λ ⊙ x_{k-1} + γ ⊙ (B u_k)                       x_k ∈ C^N (N = d_state)
    y_k  = Re(C x_k) + D ⊙ u_k                             y_k ∈ R^D (D = d_model)

Initialisation (the paper's Section 3 and Appendix A): λ uniform on the ring
``r_min ≤ |λ| ≤ r_max`` of the complex plane, i.e. ``|λ|²`` uniform on ``[r_min², r_max²]`` and the
phase ``arg λ`` uniform on ``[0, max_phase]``; ``B = (B_re + i B_im)`` with entries N(0, 1/(2 d_in))
each, so that ``E|B u|² = |u|²/d_in``; ``C`` with entries N(0, 1/N); ``D`` N(0, 1).

The γ normalisation makes the state of white-noise input keep the variance of ``B u``: a channel
with ``E|(B u)_j|² = s_j`` has, after k steps, ``E|x_k,j|² = γ_j² s_j (1 - |λ_j|^{2k}) / (1 - |λ_j|²)``,
which tends to ``s_j`` when γ_j = sqrt(1 - |λ_j|²), instead of growing like ``1/(1 - |λ_j|)``.

Engine: diagonal, time-invariant complex decay λ passed as a (real, imag) pair; all its modes.

What differs from the paper, and why:

* γ is a separate trainable parameter ``gamma_log`` (as in the paper's Appendix A code, which
  initialises it from λ and then learns it). ``learn_gamma=False`` ties it to λ instead:
  ``γ = sqrt(1 - |λ|²) = sqrt(-expm1(-2 exp(ν)))``, computed without cancellation near |λ| = 1.
* The projections are stored input-major as elsewhere in zoo (``u @ b`` with ``b_re, b_im``
  [d_in, N], ``x @ c`` with ``c_re, c_im`` [N, D]), the paper's ``B`` and ``C`` transposed.
* The paper has d_in = D and an element-wise skip ``D ⊙ u``. When ``init`` is given another input
  width the skip ``d_skip`` becomes a dense [d_in, D] matrix (LeCun-normal), the only way to add
  ``u`` to ``y`` of another width.
* λ and γ are always float32 (never cast to a bfloat16 compute dtype): |λ| = 0.999 rounds to 1.0 in
  bfloat16, which would remove the decay. ``B u`` and ``C x`` run in the compute dtype.
* The complex state is kept as a (real, imag) pair of float32 [B, N] arrays, so every state leaf is
  float32 and no kernel sees a complex dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import cast, check_chunk_size, chunk_kwargs, dense_init
from zoo.ops import diagonal
from zoo.registry import register


@dataclasses.dataclass(frozen=True)
class LRUConfig:
    d_model: int = 32
    d_state: int = 32
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = 2 * math.pi
    learn_gamma: bool = True
    chunk_size: int = 64  # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("lru", self.chunk_size)
        if self.d_model <= 0 or self.d_state <= 0:
            raise ValueError(f"lru: d_model and d_state must be positive, got d_model={self.d_model}, "
                             f"d_state={self.d_state}")
        if not 0.0 <= self.r_min < self.r_max < 1.0:
            raise ValueError(f"lru: need 0 <= r_min < r_max < 1 for a stable ring, got r_min={self.r_min}, "
                             f"r_max={self.r_max}")
        if not self.max_phase > 0:
            raise ValueError(f"lru: max_phase must be positive, got {self.max_phase}")


def ring_init(key: jax.Array, n: int, r_min: float, r_max: float, max_phase: float):
    """``(nu_log, theta_log)`` [n] for λ uniform on the ring r_min ≤ |λ| ≤ r_max, arg λ ∈ [0, max_phase].

    Uniform on the ring means |λ|² uniform on [r_min², r_max²]; then ν = log(-log|λ|) so that
    |λ| = exp(-exp(ν)). The uniforms are drawn in (0, 1] so that no logarithm sees a zero.
    """
    k_mod, k_phase = jax.random.split(key)
    u_mod = 1.0 - jax.random.uniform(k_mod, (n,), jnp.float32)
    u_phase = 1.0 - jax.random.uniform(k_phase, (n,), jnp.float32)
    modulus_sq = r_min**2 + u_mod * (r_max**2 - r_min**2)
    nu_log = jnp.log(-0.5 * jnp.log(modulus_sq))
    theta_log = jnp.log(max_phase * u_phase)
    return nu_log, theta_log


def eigenvalues(params: dict):
    """λ as a float32 (real, imag) pair [N]."""
    modulus = jnp.exp(-jnp.exp(params["nu_log"]))
    phase = jnp.exp(params["theta_log"])
    return modulus * jnp.cos(phase), modulus * jnp.sin(phase)


def normalisation(params: dict) -> jax.Array:
    """γ [N]: learned (``gamma_log``) or tied to λ as sqrt(1 - |λ|²)."""
    if "gamma_log" in params:
        return jnp.exp(params["gamma_log"])
    return jnp.sqrt(-jnp.expm1(-2.0 * jnp.exp(params["nu_log"])))


@register("lru", config=LRUConfig, paper="Resurrecting Recurrent Neural Networks for Long Sequences",
          engine="diagonal", modes=diagonal.MODES, state_size=lambda c: 2 * c.d_state)
def build(config: LRUConfig):
    d, n = config.d_model, config.d_state

    def init(key, d_in):
        k_ring, k_b_re, k_b_im, k_c_re, k_c_im, k_d = jax.random.split(key, 6)
        nu_log, theta_log = ring_init(k_ring, n, config.r_min, config.r_max, config.max_phase)
        params = {
            "nu_log": nu_log,
            "theta_log": theta_log,
            "b_re": jax.random.normal(k_b_re, (d_in, n), jnp.float32) / math.sqrt(2 * d_in),
            "b_im": jax.random.normal(k_b_im, (d_in, n), jnp.float32) / math.sqrt(2 * d_in),
            "c_re": jax.random.normal(k_c_re, (n, d), jnp.float32) / math.sqrt(n),
            "c_im": jax.random.normal(k_c_im, (n, d), jnp.float32) / math.sqrt(n),
            "d_skip": (jax.random.normal(k_d, (d,), jnp.float32) if d_in == d else dense_init(k_d, d_in, d)),
        }
        if config.learn_gamma:
            params["gamma_log"] = 0.5 * jnp.log(-jnp.expm1(-2.0 * jnp.exp(nu_log)))
        return params

    def drive(params, u):
        """γ ⊙ (B u) as a (real, imag) pair [..., N] in u's dtype."""
        gamma = normalisation(params)
        b_re, b_im = cast((params["b_re"] * gamma, params["b_im"] * gamma), u.dtype)
        return u @ b_re, u @ b_im

    def readout(params, x, u):
        """Re(C x) + D u in u's dtype; x is a (real, imag) pair [..., N]."""
        c_re, c_im, skip = cast((params["c_re"], params["c_im"], params["d_skip"]), u.dtype)
        x_re, x_im = (v.astype(u.dtype) for v in x)
        direct = u * skip if skip.ndim == 1 else u @ skip
        return x_re @ c_re - x_im @ c_im + direct

    def initial_state(params, batch):
        zeros = jnp.zeros((batch, n), jnp.float32)
        return (zeros, zeros)

    def step(params, x, u_t):
        x_new = diagonal.step(eigenvalues(params), drive(params, u_t), x)
        return x_new, readout(params, x_new, u_t)

    def apply(params, us, x0, reset, mode, reverse):
        xs, final = diagonal.apply(eigenvalues(params), drive(params, us), initial_state=x0, reset=reset,
                                   reverse=reverse, mode=mode, **chunk_kwargs(mode, config.chunk_size))
        return readout(params, xs, us), final

    return make_recurrence("lru", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["b_re"].shape[0], modes=diagonal.MODES, default_d_in=d)
