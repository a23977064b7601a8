"""S5: the simplified state space layer (one MIMO diagonal SSM over all channels).

Paper: J. T. H. Smith, A. Warrington, S. W. Linderman, "Simplified State Space Layers for Sequence
Modeling" (ICLR 2023).

One state of P = d_state complex entries is shared by all H = d_model channels (MIMO), in the
eigenbasis of a HiPPO-N matrix (Sections 3-4)::

    Λ = −exp(lam_re_log) + i lam_im ∈ C^P       Δ = step_rescale · exp(log_dt) ∈ R^P
    ZOH:      Λ̄ = exp(ΛΔ),  B̄ = Λ⁻¹ (Λ̄ − 1) ⊙ B̃       (bilinear also offered)
    x_k = Λ̄ ⊙ x_{k-1} + B̄ u_k,        B̃ ∈ C^{P×d_in}
    y_k = Re(C̃ x_k) + D u_k,           C̃ ∈ C^{H×P}

Conjugate symmetry (``conj_sym``, the paper's default): Λ, B̃, C̃ are real in the original basis, so
the eigenvalues come in conjugate pairs; only P/2 of them are kept and ``y = 2 Re(C̃ x) + D u``.
The state is then P/2 complex entries (P floats).

Initialisation: Λ = HiPPO-N eigenvalues (the diagonal of HiPPO-LegS's NPLR form,
``zoo.ops.hippo.nplr``) in ``blocks`` blocks of size P/blocks on the diagonal (the paper's block
initialisation), V the matching eigenvectors; B̃ = V* B and C̃ = C V with B, C LeCun-normal in the
original basis; D ~ N(0, 1); log Δ ~ U[log dt_min, log dt_max] per state entry.

``step_rescale`` multiplies every Δ (the paper's Section 6.2: evaluate at another sampling rate).

Irregular sampling (``time_input=True``, the paper's Section 6.3, Δ_k = Δ · (t_{k+1} − t_k)): the
last input channel carries the elapsed time τ_k ≥ 0 since the previous element, and the other
d_in − 1 channels are the input u_k. Then ``Λ̄_k = exp(Λ Δ τ_k)`` and ``B̄_k`` follow the same
discretisation with step ``Δ τ_k``: a time-varying diagonal recurrence that the diagonal engine runs
in every mode (τ = 1 everywhere gives the regular S5).

Bidirectional S5 (the paper's non-causal variant): ``zoo.bidirectional(zoo.get("s5"))`` runs one S5
forwards and another backwards and concatenates (or, with ``merge="sum"``, adds) their outputs.

Engine: ``zoo.ops.diagonal`` with the complex state as (real, imag) pairs: ``"sequential"`` and
``"associative"`` (the paper's parallel scan).

What differs from the paper, and why: Re Λ = −exp(·) keeps every eigenvalue stable during training
(the paper clips or leaves it free); when d_in ≠ d_model the skip D is a dense [d_in, H] matrix (the
paper has d_in = H and D diagonal). Λ̄ and B̄ stay float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import block_diag

from zoo.contract import make_recurrence
from zoo.models._common import cast, dense_init
from zoo.models.s4d import check_ssm_config, log_dt_init
from zoo.ops import diagonal, hippo, lti
from zoo.registry import register

MODES = ("sequential", "associative")


@dataclasses.dataclass(frozen=True)
class S5Config:
    d_model: int = 8               # H: output width
    d_state: int = 8               # P: state size (P/2 complex entries kept when conj_sym)
    blocks: int = 1                # HiPPO-N blocks on the diagonal of the initial Λ
    conj_sym: bool = True
    discretisation: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    step_rescale: float = 1.0
    time_input: bool = False       # the last input channel is the elapsed time τ_k (irregular sampling)

    def __post_init__(self):
        check_ssm_config("s5", self)
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks <= 0 \
                or self.d_state % self.blocks:
            raise ValueError(f"s5: blocks must be a positive int dividing d_state = {self.d_state}, "
                             f"got {self.blocks!r}")
        block = self.d_state // self.blocks
        if self.conj_sym and block % 2:
            raise ValueError(f"s5: conj_sym needs an even block size d_state/blocks, got {block}")
        if not self.step_rescale > 0:
            raise ValueError(f"s5: step_rescale must be positive, got {self.step_rescale}")


def hippo_n_blocks(p: int, blocks: int, conj_sym: bool):
    """(Λ [P'], V [P, P']): block-diagonal HiPPO-N eigen-decomposition (P' = P/2 with conj_sym)."""
    parts = [hippo.nplr("legs", p // blocks, half=conj_sym) for _ in range(blocks)]
    return np.concatenate([r.lam for r in parts]), block_diag(*[r.v for r in parts])


def _state_width(config: S5Config) -> int:
    return config.d_state // 2 if config.conj_sym else config.d_state


def _discretise(params, delta, method):
    """(Λ̄, B̄) for step Δ [..., P']: both complex, B̄ [..., P', d_u]."""
    lam = -jnp.exp(params["lam_re_log"]) + 1j * params["lam_im"]
    log_a, b_scale = lti.discretise_diagonal(lam, delta, method)
    b = params["b_re"] + 1j * params["b_im"]
    return jnp.exp(log_a), b_scale[..., None] * b


def _pair(z):
    return jnp.real(z), jnp.imag(z)


@register("s5", config=S5Config, paper="Simplified State Space Layers for Sequence Modeling",
          engine="diagonal", modes=MODES,
          state_size=lambda c: 2 * (c.d_state // 2 if c.conj_sym else c.d_state))
def build(config: S5Config):
    h = config.d_model
    lam0, v0 = hippo_n_blocks(config.d_state, config.blocks, config.conj_sym)
    scale = 2.0 if config.conj_sym else 1.0
    extra = 1 if config.time_input else 0

    def init(key, d_in):
        d_u = d_in - extra
        if d_u <= 0:
            raise ValueError(f"s5: time_input=True needs d_in >= 2 (inputs plus the time channel), "
                             f"got {d_in}")
        k_b, k_c, k_d, k_dt = jax.random.split(key, 4)
        b = np.asarray(jax.random.normal(k_b, (config.d_state, d_u))) / math.sqrt(d_u)
        c = np.asarray(jax.random.normal(k_c, (h, config.d_state))) / math.sqrt(config.d_state)
        b_tilde, c_tilde = v0.conj().T @ b, c @ v0
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return {
            "lam_re_log": f32(np.log(-lam0.real)), "lam_im": f32(lam0.imag),
            "b_re": f32(b_tilde.real), "b_im": f32(b_tilde.imag),
            "c_re": f32(c_tilde.real), "c_im": f32(c_tilde.imag),
            "d": jax.random.normal(k_d, (h,), jnp.float32) if d_u == h else dense_init(k_d, d_u, h),
            "log_dt": log_dt_init(k_dt, (_state_width(config),), config.dt_min, config.dt_max),
        }

    def split(params, x):
        """(u, Λ̄, B̄): Λ̄ [P'] or [.., P'] (time-varying), B̄ [P', d_u] or [.., P', d_u]."""
        delta = config.step_rescale * jnp.exp(params["log_dt"])
        if not config.time_input:
            a_bar, b_bar = _discretise(params, delta, config.discretisation)
            return x, a_bar, b_bar
        tau = x[..., -1:].astype(jnp.float32)
        a_bar, b_bar = _discretise(params, tau * delta, config.discretisation)
        return x[..., :-1], a_bar, b_bar

    def drive(b_bar, u):
        """B̄ u as a float32 (real, imag) pair [.., P']."""
        u32 = u.astype(jnp.float32)
        if b_bar.ndim == 2:
            return _pair(jnp.einsum("...u,pu->...p", u32, b_bar))
        return _pair(jnp.einsum("...u,...pu->...p", u32, b_bar))

    def readout(params, x, u):
        c_re, c_im, skip = cast((scale * params["c_re"], scale * params["c_im"], params["d"]), u.dtype)
        x_re, x_im = (s.astype(u.dtype) for s in x)
        direct = u * skip if skip.ndim == 1 else u @ skip
        return x_re @ c_re.T - x_im @ c_im.T + direct

    def initial_state(params, batch):
        zeros = jnp.zeros((batch, params["log_dt"].shape[0]), jnp.float32)
        return (zeros, zeros)

    def step(params, x, x_t):
        u, a_bar, b_bar = split(params, x_t)
        x_new = diagonal.step(_pair(a_bar), drive(b_bar, u), x)
        return x_new, readout(params, x_new, u)

    def apply(params, xs, x0, reset, mode, reverse):
        u, a_bar, b_bar = split(params, xs)
        states, final = diagonal.apply(_pair(a_bar), drive(b_bar, u), initial_state=x0, reset=reset,
                                       reverse=reverse, mode=mode)
        return readout(params, states, u), final

    return make_recurrence("s5", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["b_re"].shape[1] + extra, modes=MODES, default_d_in=h)
