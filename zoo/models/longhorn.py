"""Longhorn: a state-space block whose state update is an online regression step.

Paper: B. Liu, R. Wang, L. Wu, Y. Feng, P. Stone, Q. Liu, "Longhorn: State Space Models are
Amortized Online Learners" (2024, arXiv:2407.14207). Each state row S[d] ∈ R^N is the weight of a
linear regressor that reads the key k_t ∈ R^N and should predict the channel's input x_t[d]. The
implicit (proximal) update of ``‖S − S_{t-1}‖² + β_t (S k_t − x_t)²`` has the closed form
``S_t = S_{t-1} − ε_t (S_{t-1} k_t − x_t) k_tᵀ`` with ``ε_t = β_t / (1 + β_t k_tᵀk_t)``; Longhorn
keeps only the diagonal of the rank-one transition ``I − ε_t k_t k_tᵀ`` (PAPERS.md §1.4), which
makes it a diagonal selective SSM with no separate forget gate.

The block is the authors' ``Longhorn`` module (github:Cranial-XIX/longhorn, ``models/longhorn.py``;
the scan is ``selective_scan_online7`` of github:Cranial-XIX/longhorn_cuda, whose reference
``selective_scan_online7_ref``, CUDA forward kernel and the module's ``step`` compute the same
discretisation). With E = expand · d_model channels, N = d_state, R = dt_rank, for each t::

    [x_t, z_t]      = W_in u_t                                      x_t, z_t ∈ R^E
    x_t             = SiLU(conv1d_K(x_t) + b_conv)                   causal depthwise conv, K = d_conv
    [δ_t, k_t, q_t] = W_x x_t                                       δ_t ∈ R^R, k_t, q_t ∈ R^N (this order)
    β_t             = sigmoid(W_Δ δ_t + b_Δ)                         β_t ∈ R^E, one step size per channel
    ε_t             = β_t / (1 + β_t ‖k_t‖²)
    S_t             = (1 − ε_t ⊗ k_t^{⊙2}) ⊙ S_{t-1} + (ε_t ⊙ x_t) ⊗ k_t      S_t ∈ R^{E×N}
    y_t             = S_t q_t + D ⊙ x_t
    out_t           = W_out (y_t ⊙ SiLU(z_t))

Note the decay ``1 − ε_t k_t²`` lies in (0, 1] because ``ε_t k_{t,n}² ≤ ε_t ‖k_t‖² < 1``: the
model is stable without any A parameter (the authors' module has none).

Engine: ``zoo.ops.diagonal`` runs ``S_t = a_t ⊙ S_{t-1} + b_t`` over the [E, N] state in its
sequential, associative or chunked mode (``"auto"``: the engine's choice). ``zoo.ops.selective``
cannot express this recurrence exactly: its decay ``exp(Δ_t A)`` has a time-invariant A, whereas
Longhorn's decay depends on k_t per state index. The cost of the diagonal engine is that ``apply``
holds the [B, T, E, N] states (the authors' kernel, like Mamba's, keeps them in SRAM).
``zoo.ops.conv1d`` runs the convolution.

State: ``(conv_window [B, K-1, E], S [B, E, N])``, both float32.

Initialisation follows the authors' code: the convolution uniform(±1/√K) (torch's Conv1d default),
``W_Δ`` uniform(±1/√R) (torch's Linear default) and ``b_Δ = 0`` (their ``_init_weights`` zeroes
every Linear bias, so β starts near 1/2), ``D = 1``. Projections are LeCun-normal (zoo's default)
and stored input-major (``u @ w``), the torch weights transposed; the conv kernel is [K, E].

Differences from the authors' code, and why: ``reset`` (packed sequences) drops both parts of the
state before step t and ``reverse=True`` runs the block backwards in time (neither is in the
paper); in bfloat16 compute β, ε and the whole scan run in float32 (the authors' kernel computes
them in float32 too).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, chunk_kwargs, dense_init
from zoo.models._matrix_common import check_positive_ints, project
from zoo.models.mamba2 import conv_init
from zoo.ops import conv1d, diagonal
from zoo.registry import register

PAPER = "Longhorn: State Space Models are Amortized Online Learners"
MODES = diagonal.MODES


@dataclasses.dataclass(frozen=True)
class LonghornConfig:
    d_model: int = 16
    d_state: int = 4                    # N (the authors use 16)
    d_conv: int = 4                     # K
    expand: int = 2                     # E = expand * d_model
    dt_rank: int | None = None          # R; None: ceil(d_model / 16), as the authors' "auto"
    conv_bias: bool = True
    bias: bool = False                  # biases of the in and out projections
    chunk_size: int = 4                 # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("longhorn", self.chunk_size)
        check_positive_ints("longhorn", self, ("d_model", "d_state", "d_conv", "expand"))
        if self.dt_rank is not None:
            check_positive_ints("longhorn", self, ("dt_rank",))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


def state_size(config: LonghornConfig) -> int:
    return (config.d_conv - 1) * config.d_inner + config.d_inner * config.d_state


def init_params(key: jax.Array, config: LonghornConfig, d_in: int) -> dict:
    e, n, r = config.d_inner, config.d_state, config.rank
    keys = jax.random.split(key, 5)
    dt_bound = 1.0 / math.sqrt(r)
    params = {
        "w_in": dense_init(keys[0], d_in, 2 * e),
        **conv_init(keys[1], config.d_conv, e, config.conv_bias),
        "w_x": dense_init(keys[2], e, r + 2 * n),
        "w_dt": jax.random.uniform(keys[3], (r, e), jnp.float32, -dt_bound, dt_bound),
        "dt_bias": jnp.zeros((e,), jnp.float32),
        "d_skip": jnp.ones((e,), jnp.float32),
        "w_out": dense_init(keys[4], e, config.d_model),
    }
    if config.bias:
        params["b_in"] = jnp.zeros((2 * e,), jnp.float32)
        params["b_out"] = jnp.zeros((config.d_model,), jnp.float32)
    return params


def online_step_inputs(params: dict, x: jax.Array, config: LonghornConfig):
    """(decay a [..., E, N], input b [..., E, N], query q [..., N]) in float32 from the conv output
    x [..., E]: the implicit online-regression update with its diagonal transition."""
    r, n = config.rank, config.d_state
    dkq = project(x, params["w_x"]).astype(jnp.float32)
    delta, k, q = dkq[..., :r], dkq[..., r:r + n], dkq[..., r + n:]
    beta = jax.nn.sigmoid(delta @ params["w_dt"] + params["dt_bias"])                  # [..., E]
    eps = beta / (1.0 + beta * jnp.sum(k * k, axis=-1, keepdims=True))               # ε_t
    a = 1.0 - eps[..., :, None] * (k * k)[..., None, :]
    b = (eps * x.astype(jnp.float32))[..., :, None] * k[..., None, :]
    return a, b, q


def read_out(params: dict, states: jax.Array, q: jax.Array, x: jax.Array, z: jax.Array) -> jax.Array:
    """W_out ((S q + D x) ⊙ SiLU(z)); the readout in float32, W_out in x's dtype."""
    y = jnp.einsum("...en,...n->...e", states, q) + params["d_skip"] * x.astype(jnp.float32)
    y = y * jax.nn.silu(z.astype(jnp.float32))
    return project(y.astype(x.dtype), params["w_out"], params.get("b_out"))


@register("longhorn", config=LonghornConfig, paper=PAPER, engine="diagonal", modes=MODES,
          state_size=state_size)
def build(config: LonghornConfig):
    e, n, taps = config.d_inner, config.d_state, config.d_conv

    def initial_state(params, batch):
        return (jnp.zeros((batch, taps - 1, e), jnp.float32), jnp.zeros((batch, e, n), jnp.float32))

    def conv_inputs(params, u):
        x, z = jnp.split(project(u, params["w_in"], params.get("b_in")), 2, axis=-1)
        return x, z, params["conv_kernel"].astype(x.dtype), params.get("conv_bias")

    def step(params, state, u_t):
        window, s = state
        x, z, kernel, bias = conv_inputs(params, u_t)
        window, x = conv1d.step(kernel, bias, window, x)
        x = jax.nn.silu(x)
        a, b, q = online_step_inputs(params, x, config)
        s = diagonal.step(a, b, s)
        return (window, s), read_out(params, s, q, x, z)

    def apply(params, us, state, reset, mode, reverse):
        window, s = state
        x, z, kernel, bias = conv_inputs(params, us)
        x, window = conv1d.apply(x, kernel, bias, initial_state=window, reset=reset, reverse=reverse)
        x = jax.nn.silu(x)
        a, b, q = online_step_inputs(params, x, config)
        states, s = diagonal.apply(a, b, initial_state=s, reset=reset, reverse=reverse, mode=mode,
                                   **chunk_kwargs(mode, config.chunk_size))
        return read_out(params, states, q, x, z), (window, s)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("longhorn", init=lambda key, d_in: init_params(key, config, d_in),
                           initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_in"].shape[0], modes=MODES,
                           default_d_in=config.d_model)
