"""xLSTM's mLSTM block: the pre-up-projection residual block around the matrix-memory LSTM.

Paper: M. Beck, K. Pöppel, M. Spanring, A. Auer, O. Prudnikova, M. Kopp, G. Klambauer, J. Brandstetter,
S. Hochreiter, "xLSTM: Extended Long Short-Term Memory" (NeurIPS 2024): the mLSTM cell and the
pre-up-projection residual block it sits in. Code consulted: the authors' ``xlstm`` package (NX-AI/xlstm:
``xlstm/blocks/xlstm_block.py``, ``blocks/mlstm/layer.py``, ``blocks/mlstm/cell.py``,
``blocks/mlstm/backends.py``, ``components/{ln,conv,linear_headwise,init}.py``), written here anew.

With the residual stream u_t ∈ R^D (D = d_model), E = proj_factor · D inner channels, H heads of
d = E / H channels, and block-diagonal projections of ``qkv_block_size`` channels per block::

    [x_t, z_t] = LN(u_t) W_up                                 x, z ∈ R^E; LN without bias
    c_t = SiLU(conv1d_K(x)_t)                                 causal depthwise convolution, K = d_conv
    q_t = BD_q(c_t),  k_t = BD_k(c_t),  v_t = BD_v(x_t)         block-diagonal (headwise) projections
    ĩ_t = W_i [q_t; k_t; v_t] + b_i,  f̃_t = W_f [q_t; k_t; v_t] + b_f       one scalar per head
    per head (zoo.ops.mlstm, with k scaled by d^-1/2 and the forget gate σ(f̃)):
        m_t = max(log σ(f̃_t) + m_{t-1}, ĩ_t)
        C_t = σ(f̃_t) e^{m_{t-1} - m_t} C_{t-1} + e^{ĩ_t - m_t} k_t v_tᵀ / √d      (n_t likewise with k_t / √d)
        h̃_t = C_tᵀ q_t / (max(|n_tᵀ q_t|, e^{-m_t}) + eps)
    h_t = (GroupNorm_H(h̃_t) + s ⊙ c_t) ⊙ SiLU(z_t)            per-head LayerNorm; learnable skip s
    u_t ← u_t + h_t W_down

Initialisation as in ``xlstm`` except for the k and v blocks and W_down (below): the gates' weights
zero, the forget bias linspace(3, 6) over the heads, the input bias normal(0, 0.1); W_up and the q
blocks "small init" (std sqrt(2 / (5 D))); skip and norm scales 1; the convolution as torch's
``Conv1d`` default.

State: ``(conv_window [B, K-1, E], C [B, H, d, d], n [B, H, d], m [B, H])``, all float32, where C
and n are the stabilised memories of ``xlstm``'s recurrent step (keys scaled by d^-1/2 inside C and
n, as the package does) and a fresh state has m = 0. ``step`` decodes one token in O(1);
``apply`` runs the convolution over the sequence and the cell in ``zoo.ops.mlstm``'s
``"chunked"`` (also ``"auto"``, with ``chunk_size``), ``"parallel"`` or ``"sequential"`` mode.
``reset`` drops the whole state (window included) at a segment start; ``reverse`` runs time
backwards through the convolution and the cell.

Differences from ``xlstm``, and why:

* The inner width is ``round(proj_factor · D)``; the package rounds it up to a multiple of 64
  (``round_proj_up_to_multiple_of``), which would make the tiny defaults large. Set ``proj_factor``
  to reproduce a package width.
* The package's parallel form (``parallel_stabilized_simple``) stabilises each row by its own
  maximum, so its normaliser's floor e^{-m} differs from the recurrent step's (which starts from
  m = 0); like ``mlstm_kernels`` and ``xlstm``'s recurrent step, every mode here uses the recurrent
  stabiliser, so that ``step`` and ``apply`` agree exactly.
* The k and v blocks are LeCun-normal over their block (std block^-1/2, zoo's default for
  projections); xlstm draws them, like q, with the small init of the embedding width, std
  sqrt(2 / (5 D)), a few times smaller. Why: the per-head GroupNorm is blind to a common scale of
  h̃, so when a memory carried in from a previous segment dwarfs each new e^ĩ k vᵀ, the gradient with
  respect to the carried (C, n, m) is the small remainder of a near-cancellation. With xlstm's
  draw, the float32 step loop and ``apply`` disagreed by up to 1.7e-5 of the gradient with respect
  to m on the conformance harness's data (random states of order 0.3), over its 1e-5 tolerance;
  with these k, v by 4e-6. q keeps xlstm's small draw: it keeps |nᵀq| under the normaliser's
  floor at init, where h̃ does not depend on n (a LeCun q leaves the floor, and the gradient with
  respect to n, which the GroupNorm makes vanish up to its eps, is then float32 noise). Pass
  xlstm-initialised weights in for the package's init.
* W_down is LeCun-normal (std E^-1/2) rather than xlstm's "Wang init", std 2 / (n_blocks sqrt(D)),
  which is meant for deep stacks (n_blocks is the stack's depth) and for one block is 2.8 times
  larger at the default widths: the block's branch then dominates its residual and, in bfloat16,
  its rounding moved the output by 1.1% of its scale on the conformance harness's data (0.4% here).
* Params are stored input-major (``u @ w``; the torch weights transposed; the block-diagonal
  projections as [E / block, block_in, block_out]); the norms store their multiplier (1 at init)
  where the package stores ``weight - 1``.
* Packed sequences use ``reset``; the optional input projection ``w_in`` (only when d_in ≠ D) is a
  zoo addition so that the block accepts any input width (none for d_in = D, the stacked case).
* Compute dtype: the input's. The dense products (W_in, W_up, W_down) run on its operands; the
  residual stream, the norms, and the cheap per-channel rest (the convolution, the block-diagonal
  q/k/v projections, the gates, the cell) are float32. Why: early in a segment h̃ is a short sum of
  k·q-weighted values with cancellations, which the GroupNorm rescales to unit size; on the
  conformance harness's data, rounding q, k, v to bfloat16 moved one head's h̃ by 13% of its spread.
  Dropout is the caller's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import head_norm, run_op, run_op_one_token, split_heads
from zoo.models.mamba2 import conv_init
from zoo.models.rglru import accumulation_dtype, dense
from zoo.ops import conv1d, mlstm
from zoo.ops.matrix import MODES
from zoo.registry import register

PAPER = "xLSTM: Extended Long Short-Term Memory"


@dataclasses.dataclass(frozen=True)
class MLSTMConfig:
    d_model: int = 16
    proj_factor: float = 2.0      # E = round(proj_factor * d_model) inner channels
    n_heads: int = 4              # H; heads of E / H channels (xlstm's default num_heads = 4)
    qkv_block_size: int = 4       # channels per block of the q, k, v projections (xlstm's qkv_proj_blocksize)
    d_conv: int = 4               # K, taps of the causal convolution (xlstm's conv1d_kernel_size)
    forget_bias_range: tuple[float, float] = (3.0, 6.0)   # forget-gate bias linspace over the heads
    input_bias_std: float = 0.1   # input-gate bias ~ normal(0, std)
    norm_eps: float = 1e-5        # the block's LayerNorm and the per-head GroupNorm
    eps: float = 1e-6             # added to the cell's normaliser
    chunk_size: int = 8           # cell chunk in mode="chunked" (and "auto")

    def __post_init__(self):
        check_config(self)

    @property
    def d_inner(self) -> int:
        return int(round(self.proj_factor * self.d_model))

    @property
    def d_head(self) -> int:
        return self.d_inner // self.n_heads


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


def check_config(c: MLSTMConfig) -> None:
    check_chunk_size("mlstm", c.chunk_size)
    for name in ("d_model", "n_heads", "qkv_block_size", "d_conv"):
        if not _positive_int(getattr(c, name)):
            raise ValueError(f"mlstm: {name} must be a positive int, got {getattr(c, name)!r}")
    if isinstance(c.proj_factor, bool) or not isinstance(c.proj_factor, (int, float)) or c.d_inner < 1:
        raise ValueError(f"mlstm: proj_factor must be a number with round(proj_factor * d_model) >= 1, got "
                         f"{c.proj_factor!r}")
    if c.d_inner % c.n_heads:
        raise ValueError(f"mlstm: the inner width round(proj_factor * d_model) = {c.d_inner} must be a "
                         f"multiple of n_heads = {c.n_heads}")
    if c.d_inner % c.qkv_block_size:
        raise ValueError(f"mlstm: the inner width round(proj_factor * d_model) = {c.d_inner} must be a "
                         f"multiple of qkv_block_size = {c.qkv_block_size}")
    if len(c.forget_bias_range) != 2 or not c.forget_bias_range[0] <= c.forget_bias_range[1]:
        raise ValueError(f"mlstm: forget_bias_range must be (low, high) with low <= high, got "
                         f"{c.forget_bias_range!r}")
    for name in ("norm_eps", "eps"):
        if not getattr(c, name) > 0:
            raise ValueError(f"mlstm: {name} must be positive, got {getattr(c, name)!r}")
    if not c.input_bias_std >= 0:
        raise ValueError(f"mlstm: input_bias_std must be >= 0, got {c.input_bias_std!r}")


def _state_size(c: MLSTMConfig) -> int:
    return (c.d_conv - 1) * c.d_inner + c.n_heads * (c.d_head * c.d_head + c.d_head + 1)


# --------------------------------------------------------------------------------------------
# Pieces of the block (pure functions of params and arrays).


def layer_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without bias over the last axis, in float32 or wider (xlstm's ``LayerNorm(bias=False)``)."""
    x32 = x.astype(accumulation_dtype(x.dtype))
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps) * scale


def block_diagonal(x: jax.Array, w: jax.Array) -> jax.Array:
    """xlstm's ``LinearHeadwiseExpand``: x [..., nb * bi] times nb independent [bi, bo] blocks,
    -> [..., nb * bo] in x's dtype."""
    blocks, width_in, width_out = w.shape
    y = jnp.einsum("...ni,nio->...no", x.reshape(*x.shape[:-1], blocks, width_in), w.astype(x.dtype))
    return y.reshape(*x.shape[:-1], blocks * width_out)


def _small_init(key, shape, dim: int) -> jax.Array:
    """normal(0, sqrt(2 / (5 dim))): "small init" (Nguyen & Salazar 2019), as xlstm uses it."""
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / (5.0 * dim))


def _block_init(key, blocks: int, block: int) -> jax.Array:
    """[blocks, block, block] LeCun-normal over each block's inputs (see the module docstring)."""
    return jax.random.normal(key, (blocks, block, block), jnp.float32) / math.sqrt(block)


@register("mlstm", config=MLSTMConfig, paper=PAPER, engine="matrix", modes=MODES, state_size=_state_size)
def build(config: MLSTMConfig):
    d, e, heads, dh = config.d_model, config.d_inner, config.n_heads, config.d_head
    block, taps = config.qkv_block_size, config.d_conv

    def init(key, d_in):
        keys = jax.random.split(key, 9)
        qkv_blocks = e // block
        params = {
            "norm_scale": jnp.ones((d,), jnp.float32),
            "w_up": _small_init(keys[0], (d, 2 * e), d),
            **conv_init(keys[1], taps, e, with_bias=True),
            "w_q": _small_init(keys[2], (qkv_blocks, block, block), d),
            "w_k": _block_init(keys[3], qkv_blocks, block),
            "w_v": _block_init(keys[4], qkv_blocks, block),
            "w_igate": jnp.zeros((3 * e, heads), jnp.float32),
            "b_igate": config.input_bias_std * jax.random.normal(keys[5], (heads,), jnp.float32),
            "w_fgate": jnp.zeros((3 * e, heads), jnp.float32),
            "b_fgate": jnp.linspace(*config.forget_bias_range, heads, dtype=jnp.float32),
            "out_norm_scale": jnp.ones((e,), jnp.float32),
            "skip": jnp.ones((e,), jnp.float32),
            "w_down": dense_init(keys[6], e, d),
        }
        if d_in != d:
            params["w_in"] = dense_init(keys[7], d_in, d)
        return params

    def read(params, xs):
        """The residual stream (float32, float64 for float64 inputs)."""
        return dense(xs, params["w_in"]) if "w_in" in params else xs.astype(accumulation_dtype(xs.dtype))

    def up(params, u, dtype):
        """(x, z) from the residual stream u: a product in the compute dtype, returned in float32."""
        x_z = dense(layer_norm(u, params["norm_scale"], config.norm_eps), params["w_up"], dtype=dtype)
        x, z = jnp.split(x_z, 2, axis=-1)
        return x, z

    def cell_inputs(params, x, c):
        """q, k (scaled by d^-1/2), v [..., H, d] and ĩ, f̃ [..., H] from the float32 x and c."""
        q, k = block_diagonal(c, params["w_q"]), block_diagonal(c, params["w_k"])
        v = block_diagonal(x, params["w_v"])
        qkv = jnp.concatenate([q, k, v], axis=-1)                          # the gates see the unscaled k
        i = qkv @ params["w_igate"].astype(qkv.dtype) + params["b_igate"].astype(qkv.dtype)
        f = qkv @ params["w_fgate"].astype(qkv.dtype) + params["b_fgate"].astype(qkv.dtype)
        k = k * dh ** -0.5                                   # as xlstm scales k: C matches its state
        return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), i, f

    def readout(params, u, h, c, z, dtype):
        """u + W_down((GroupNorm(h) + skip ⊙ c) ⊙ SiLU(z)), the product in the compute dtype."""
        h = head_norm(h, params["out_norm_scale"], kind="group", eps=config.norm_eps)
        h = (h + params["skip"].astype(h.dtype) * c) * jax.nn.silu(z)
        return u + dense(h, params["w_down"], dtype=dtype)

    cell = {"forget_gate": "sigmoid", "scale": 1.0, "eps": config.eps}

    def initial_state(params, batch):
        return (jnp.zeros((batch, taps - 1, e), jnp.float32), jnp.zeros((batch, heads, dh, dh), jnp.float32),
                jnp.zeros((batch, heads, dh), jnp.float32), jnp.zeros((batch, heads), jnp.float32))

    def step(params, state, x_t):
        window, memory = state[0], state[1:]
        u = read(params, x_t)
        x, z = up(params, u, x_t.dtype)
        window, c = conv1d.step(params["conv_kernel"], params["conv_bias"], window, x)
        c = jax.nn.silu(c)
        h, memory = run_op_one_token(mlstm, *cell_inputs(params, x, c), state=memory, **cell)
        return (window, *memory), readout(params, u, h, c, z, x_t.dtype).astype(x_t.dtype)

    def apply(params, xs, state, reset, mode, reverse):
        window, memory = state[0], state[1:]
        u = read(params, xs)
        x, z = up(params, u, xs.dtype)
        c, window = conv1d.apply(x, params["conv_kernel"], params["conv_bias"], initial_state=window,
                                 reset=reset, reverse=reverse)
        c = jax.nn.silu(c)
        # "auto" is the chunked form; naming it lets the configured chunk size reach the op.
        mode = "chunked" if mode == "auto" else mode
        h, memory = run_op(mlstm, *cell_inputs(params, x, c), state=memory, reset=reset, mode=mode,
                           reverse=reverse, chunk_size=config.chunk_size, **cell)
        return readout(params, u, h, c, z, xs.dtype).astype(xs.dtype), (window, *memory)

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("mlstm", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_in"].shape[0] if "w_in" in params else d,
                           modes=MODES, default_d_in=d)
