"""xLSTM's sLSTM: the scalar-memory LSTM with exponential gating and head-wise memory mixing.

Paper: M. Beck, K. Pöppel, M. Spanring, A. Auer, O. Prudnikova, M. Kopp, G. Klambauer, J. Brandstetter,
S. Hochreiter, "xLSTM: Extended Long Short-Term Memory" (NeurIPS 2024), §2.2 (the sLSTM cell) and the
post-up-projection residual block it sits in. Code consulted: the authors' ``xlstm`` package (NX-AI/xlstm:
``xlstm/blocks/slstm/{layer,cell,block}.py``, ``blocks/slstm/src/vanilla/{__init__,slstm}.py``,
``blocks/xlstm_block.py``, ``components/{ln,conv,linear_headwise,feedforward,init}.py``), written here anew.

The cell, per channel, with D = d_model channels in H heads of d = D / H (PAPERS.md §1.6)::

    [ĩ, f̃, z̃, õ]_t = W x̂_t + R h_{t-1} + b       R block-diagonal: head k mixes only its own d channels
    log f_t = log σ(f̃_t)   (forget_gate="sigmoid", xlstm's choice)   or  f̃_t   ("exp")
    m_t  = max(log f_t + m_{t-1}, ĩ_t)                                 the stabiliser (log scale)
    i'_t = exp(ĩ_t − m_t),   f'_t = exp(log f_t + m_{t-1} − m_t)        both <= 1: nothing overflows
    c_t  = f'_t c_{t-1} + i'_t tanh(z̃_t)                               cell
    n_t  = f'_t n_{t-1} + i'_t                                         normaliser
    h_t  = σ(õ_t) ⊙ c_t / n_t                                          hidden state, fed back through R

c and n are the paper's c̄, n̄ scaled by e^{−m_t}, so h is the paper's exactly. Where n_{t-1} = 0 (a
fresh sequence) the step sets m_t = ĩ_t, as ``xlstm`` does (per channel like its CUDA kernel; its
vanilla torch step tests the whole batch at once, the same for a batch that starts together): the
empty history has no scale to keep, and the stored (c, n, m) then equal the package's.

The sLSTM layer (``block=False``; xlstm's ``sLSTMLayer``) and block (``block=True``, the default;
xlstm's ``sLSTMBlock`` inside ``xLSTMBlockStack``)::

    x̂ = LN(u)                  (block only; LayerNorm without bias)  — the layer takes x̂ = u
    x̂_c = SiLU(conv1d_K(x̂))    causal depthwise convolution, K = d_conv (none for d_conv = 0)
    ĩ = BD_i(x̂_c), f̃ = BD_f(x̂_c), z̃ = BD_z(x̂), õ = BD_o(x̂)   block-diagonal per head, no bias
    y = GroupNorm_H(h)          per-head LayerNorm with a scale (xlstm's MultiHeadLayerNorm)
    layer: out = y
    block: u' = u + y;  out = u' + W_down(act(g) ⊙ p),  [g, p] = LN(u') W_up     (the gated FFN)

Engine: nonlinear (sequential ``lax.scan``, or ``mode="newton"`` with the head-wise block Jacobian
declared, H blocks of 4·d_head). The convolution and the four input projections run over
the whole sequence before the scan (``W x̂`` is hoisted); the scanned cell ``f(params, state, pre_t)``
adds R h_{t-1} and applies the pointwise update; the GroupNorm and the FFN run after it.

Parameters (input-major, ``x @ w``): ``w_i, w_f, w_z, w_o`` [H, d, d] (head k's block maps input
channels k·d.. to output channels k·d..); ``r`` [H, d, 4, d] (r[k, a, g, b]: h channel k·d+a into gate g
∈ (i, f, z, o), channel k·d+b; xlstm's external ``recurrent_kernel`` layout); ``bias`` [4, D] (rows i, f,
z, o); ``conv_kernel`` [K, D], ``conv_bias`` [D]; ``out_norm_scale`` [D]; block only: ``norm_scale`` [D],
``ffn_norm_scale`` [D], ``w_up`` [D, 2F] (gate columns first), ``w_down`` [F, D] (F = d_ffn, no FFN for
F = 0), ``b_up``/``b_down`` with ``ffn_bias``; ``w_in`` [d_in, D] only when d_in ≠ D.

State: ``(window [B, K-1, D], h, c, n, m [B, D])`` float32 (no window for d_conv = 0): the last K − 1
convolution inputs and the cell's (h, c, n, m), as ``xlstm`` keeps them (``conv_state``,
``slstm_state`` = (y, c, n, m)); a fresh state is zeros. ``reset`` drops the whole state (window
included) at a segment start; ``reverse`` runs time backwards through the convolution and the cell.

Differences from ``xlstm``, and why:

* FFN width F = round(ffn_proj_factor · D); the package rounds it up to a multiple of 64, which would
  make the tiny defaults large. Pass ``ffn_proj_factor = F / D`` to reproduce a package width.
* ``r`` starts uniform(±1/√D) (xlstm's ``recurrent_weight_init="standard"``) rather than the
  package's default zeros, so that memory mixing is present (and tested) from the start.
* ``w_down`` is LeCun-normal (std F^-1/2), not xlstm's "Wang init" (std 2/(n_blocks √D), meant for
  deep stacks), as in zoo's mlstm; ``w_up`` and the gate blocks use xlstm's small init
  (std sqrt(2 / (5 D))); the forget bias its "powerlaw_blockdependent" start for one block
  (5 − 12 (a / (d − 1))^0.3 over each head's channels a); other biases zero.
* xlstm also clips i', f' at 1, which changes nothing: m_t is their arguments' maximum, except on
  a step from n = 0, where the clipped f' multiplies c_{t-1} = 0 (a fresh state; a hand-made state
  with n = 0 and c ≠ 0 would differ). The norms store their multiplier (1 at init) where the
  package stores ``weight − 1``.
* Compute dtype: the input's for the dense products (``w_in``, the FFN); the residual stream, norms,
  convolution, block-diagonal projections and the cell in float32 (float64 for float64 inputs, the
  state rounded to float32 after each step as every zoo state is). Dropout is the caller's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from zoo.contract import make_recurrence
from zoo.models._common import dense_init
from zoo.models._fused import check_implementation, fused_apply
from zoo.models._matrix_common import head_norm, split_heads
from zoo.models.mamba2 import conv_init
from zoo.models.mlstm import block_diagonal, layer_norm
from zoo.models.rglru import accumulation_dtype, dense
from zoo.ops import conv1d, nonlinear
from zoo.registry import register

PAPER = "xLSTM: Extended Long Short-Term Memory"
FORGET_GATES = ("sigmoid", "exp")
# xlstm's FeedForwardConfig.act_fn names; "gelu" is torch's exact (erf) GELU.
FFN_ACTIVATIONS = {
    "gelu": lambda a: jax.nn.gelu(a, approximate=False),
    "relu": jax.nn.relu,
    "relu^2": lambda a: jnp.square(jax.nn.relu(a)),
    "sigmoid": jax.nn.sigmoid,
    "swish": jax.nn.silu,
    "selu": jax.nn.selu,
}
GATES = ("i", "f", "z", "o")


@dataclasses.dataclass(frozen=True)
class SLSTMConfig:
    d_model: int = 16
    n_heads: int = 2               # H; heads of d_model / H channels (R is block-diagonal over them)
    d_conv: int = 4                # K, taps of the causal convolution feeding i and f (0: none)
    forget_gate: str = "sigmoid"   # "sigmoid" (xlstm) or "exp" (the paper's alternative)
    block: bool = True             # True: the residual sLSTM block with FFN; False: the bare sLSTM layer
    ffn_proj_factor: float = 1.3   # F = round(ffn_proj_factor * d_model); 0: no FFN
    ffn_act: str = "gelu"
    ffn_bias: bool = False
    norm_eps: float = 1e-5         # the LayerNorms and the per-head GroupNorm
    # "xla", "pallas" (pallas_kernels.fused_rnn_cell for the cell's time loop), a tuple tried in turn,
    # or None: the kernel on GPU/TPU in mode "auto" (zoo/models/_fused.py).
    implementation: str | tuple[str, ...] | None = None

    def __post_init__(self):
        check_config(self)
        check_implementation("slstm", self.implementation)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_ffn(self) -> int:
        return int(round(self.ffn_proj_factor * self.d_model)) if self.block else 0


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_config(c: SLSTMConfig) -> None:
    for name in ("d_model", "n_heads"):
        if not _is_int(getattr(c, name)) or getattr(c, name) <= 0:
            raise ValueError(f"slstm: {name} must be a positive int, got {getattr(c, name)!r}")
    if c.d_model % c.n_heads:
        raise ValueError(f"slstm: d_model = {c.d_model} must be a multiple of n_heads = {c.n_heads}")
    if not _is_int(c.d_conv) or c.d_conv < 0:
        raise ValueError(f"slstm: d_conv must be a non-negative int (0: no convolution), got {c.d_conv!r}")
    if c.forget_gate not in FORGET_GATES:
        raise ValueError(f"slstm: forget_gate={c.forget_gate!r}; choose one of {FORGET_GATES}")
    if not isinstance(c.block, bool):
        raise ValueError(f"slstm: block must be a bool, got {c.block!r}")
    if (isinstance(c.ffn_proj_factor, bool) or not isinstance(c.ffn_proj_factor, (int, float))
            or not c.ffn_proj_factor >= 0):
        raise ValueError(f"slstm: ffn_proj_factor must be a number >= 0 (0: no FFN), got "
                         f"{c.ffn_proj_factor!r}")
    if c.ffn_act not in FFN_ACTIVATIONS:
        raise ValueError(f"slstm: ffn_act={c.ffn_act!r}; choose one of {tuple(FFN_ACTIVATIONS)}")
    if not isinstance(c.norm_eps, (int, float)) or isinstance(c.norm_eps, bool) or not c.norm_eps > 0:
        raise ValueError(f"slstm: norm_eps must be positive, got {c.norm_eps!r}")


def _state_size(c: SLSTMConfig) -> int:
    return max(c.d_conv - 1, 0) * c.d_model + 4 * c.d_model


# --------------------------------------------------------------------------------------------
# The cell (pure functions; the scan runs ``cell`` on the hoisted input pre-activations).


def log_forget(f_pre: jax.Array, forget_gate: str) -> jax.Array:
    return jax.nn.log_sigmoid(f_pre) if forget_gate == "sigmoid" else f_pre


def cell_update(pre: jax.Array, state, forget_gate: str):
    """The pointwise sLSTM update. ``pre`` [B, 4, D] = rows (ĩ, f̃, z̃, õ), recurrent part included;
    ``state`` = (h, c, n, m) [B, D]. Returns the new (h, c, n, m)."""
    _, c, n, m = state
    i_pre, f_pre, z_pre, o_pre = (pre[..., k, :] for k in range(4))
    log_f = log_forget(f_pre, forget_gate)
    # A fresh state (n = 0) has no history to scale: the stabiliser starts at ĩ (as xlstm does).
    m_new = jnp.where(n == 0, i_pre, jnp.maximum(log_f + m, i_pre))
    i_act = jnp.exp(i_pre - m_new)
    f_act = jnp.exp(log_f + m - m_new)
    c_new = f_act * c + i_act * jnp.tanh(z_pre)
    n_new = f_act * n + i_act
    h_new = jax.nn.sigmoid(o_pre) * c_new / n_new
    return h_new, c_new, n_new, m_new


def recurrent_preactivation(r: jax.Array, h: jax.Array) -> jax.Array:
    """R h for the block-diagonal R [H, d, 4, d]: h [B, D] -> [B, 4, D] (rows i, f, z, o)."""
    heads, width = r.shape[0], r.shape[1]
    mixed = jnp.einsum("bka,kagc->bgkc", split_heads(h, heads), r.astype(h.dtype))
    return mixed.reshape(*mixed.shape[:2], heads * width)


def make_cell(forget_gate: str):
    """``cell(params, (h, c, n, m), pre_x_t) -> (new state, h_t)``: pre_x_t [B, 4, D] = W x̂_t + b."""

    def cell(params, state, pre_x):
        dtype = jnp.promote_types(pre_x.dtype, jnp.float32)
        h = state[0].astype(dtype)
        pre = pre_x.astype(dtype) + recurrent_preactivation(params["r"], h)
        new = cell_update(pre, tuple(s.astype(dtype) for s in state), forget_gate)
        return new, new[0]

    return cell


# --------------------------------------------------------------------------------------------
# Initialisation.


def _small_init(key, shape, dim: int) -> jax.Array:
    """normal(0, sqrt(2 / (5 dim))): xlstm's "small init"."""
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / (5.0 * dim))


def forget_bias_init(heads: int, width: int) -> jax.Array:
    """xlstm's "powerlaw_blockdependent" forget bias for a single block: 5 − 12 (a / (d − 1))^0.3."""
    ramp = jnp.linspace(0.0, 1.0, width, dtype=jnp.float32)
    return jnp.tile(5.0 - 12.0 * ramp ** 0.3, heads)


# --------------------------------------------------------------------------------------------
# The model.


@register("slstm", config=SLSTMConfig, paper=PAPER, engine="nonlinear", modes=nonlinear.MODES,
          state_size=_state_size)
def build(config: SLSTMConfig):
    d, heads, dh, taps = config.d_model, config.n_heads, config.d_head, config.d_conv
    d_ffn, eps = config.d_ffn, config.norm_eps
    act = FFN_ACTIVATIONS[config.ffn_act]
    cell = make_cell(config.forget_gate)

    def init(key, d_in):
        keys = jax.random.split(key, 9)
        bias = jnp.zeros((4, d), jnp.float32).at[1].set(forget_bias_init(heads, dh))
        params = {f"w_{g}": _small_init(k, (heads, dh, dh), d) for g, k in zip(GATES, keys[:4], strict=True)}
        bound = 1.0 / math.sqrt(d)
        params.update(r=jax.random.uniform(keys[4], (heads, dh, 4, dh), jnp.float32, -bound, bound),
                      bias=bias, out_norm_scale=jnp.ones((d,), jnp.float32))
        if taps:
            params.update(conv_init(keys[5], taps, d, with_bias=True))
        if config.block:
            params["norm_scale"] = jnp.ones((d,), jnp.float32)
            if d_ffn:
                params.update(ffn_norm_scale=jnp.ones((d,), jnp.float32),
                              w_up=_small_init(keys[6], (d, 2 * d_ffn), d),
                              w_down=dense_init(keys[7], d_ffn, d))
                if config.ffn_bias:
                    params.update(b_up=jnp.zeros((2 * d_ffn,), jnp.float32),
                                  b_down=jnp.zeros((d,), jnp.float32))
        if d_in != d:
            params["w_in"] = dense_init(keys[8], d_in, d)
        return params

    def read(params, xs):
        """The residual stream / layer input in float32 (float64 for float64 inputs)."""
        return dense(xs, params["w_in"]) if "w_in" in params else xs.astype(accumulation_dtype(xs.dtype))

    def layer_input(params, u):
        return layer_norm(u, params["norm_scale"], eps) if config.block else u

    def input_preactivation(params, x, x_conv):
        """W x̂ + b [..., 4, D]: i and f read the convolved input, z and o the plain one."""
        sources = {"i": x_conv, "f": x_conv, "z": x, "o": x}
        pre = jnp.stack([block_diagonal(sources[g], params[f"w_{g}"]) for g in GATES], axis=-2)
        return pre + params["bias"].astype(pre.dtype)

    def readout(params, u, h, dtype):
        """GroupNorm over heads; in the block, the residual and the gated FFN."""
        y = head_norm(split_heads(h, heads), params["out_norm_scale"], kind="group", eps=eps)
        if not config.block:
            return y
        u = u + y
        if not d_ffn:
            return u
        g_p = dense(layer_norm(u, params["ffn_norm_scale"], eps), params["w_up"], params.get("b_up"), dtype)
        gate, up = jnp.split(g_p, 2, axis=-1)
        return u + dense(act(gate) * up, params["w_down"], params.get("b_down"), dtype)

    def split_state(state):
        return (state[0], state[1:]) if taps else (None, state)

    def join_state(window, memory):
        return (window, *memory) if taps else tuple(memory)

    def initial_state(params, batch):
        zeros = jnp.zeros((batch, d), jnp.float32)
        window = jnp.zeros((batch, taps - 1, d), jnp.float32) if taps else None
        return join_state(window, (zeros,) * 4)

    def step(params, state, x_t):
        window, memory = split_state(state)
        u = read(params, x_t)
        x = layer_input(params, u)
        x_conv = x
        if taps:
            window, x_conv = conv1d.step(params["conv_kernel"], params["conv_bias"], window, x)
            x_conv = jax.nn.silu(x_conv)
        memory, h = nonlinear.step(cell, params, memory, input_preactivation(params, x, x_conv))
        return join_state(window, memory), readout(params, u, h, x_t.dtype).astype(x_t.dtype)

    def apply(params, xs, state, reset, mode, reverse):
        window, memory = split_state(state)
        u = read(params, xs)
        x = layer_input(params, u)
        x_conv = x
        if taps:
            x_conv, window = conv1d.apply(x, params["conv_kernel"], params["conv_bias"], initial_state=window,
                                          reset=reset, reverse=reverse)
            x_conv = jax.nn.silu(x_conv)
        pre = input_preactivation(params, x, x_conv)
        kernel = fused(params, pre, memory, reset, mode, reverse)
        hs, memory = kernel if kernel is not None else nonlinear.apply(
            cell, params, pre, initial_state=memory, reset=reset, reverse=reverse, mode=mode,
            structure=head_blocks)
        return readout(params, u, hs, xs.dtype).astype(xs.dtype), join_state(window, memory)

    def head_blocks(like):
        """The recurrence is head-wise: head k of (h, c, n, m) at t depends on head k at t - 1 alone,
        so mode="newton" solves H blocks of 4·d_head instead of one of 4·D."""
        def to_blocks(memory):
            z = jnp.stack(memory, axis=-2)                                  # [..., 4, D]
            z = z.reshape(z.shape[:-1] + (heads, dh))                       # [..., 4, H, dh]
            return jnp.swapaxes(z, -3, -2).reshape(z.shape[:-3] + (heads, 4 * dh))

        def from_blocks(z):
            z = jnp.swapaxes(z.reshape(z.shape[:-1] + (4, dh)), -3, -2)    # [..., 4, H, dh]
            z = z.reshape(z.shape[:-2] + (d,))
            return tuple(z[..., k, :] for k in range(4))

        return nonlinear.Blocks(to_blocks, from_blocks)

    # The cell's time loop as one fused Pallas kernel where it applies: pre [B, T, 4, D] is the input
    # part (W x̂ + b), R the block-diagonal recurrent matrix.
    fused = fused_apply("slstm", config.implementation, cell="slstm", width=d,
                        prepare=lambda params, pre: (pre, params["r"], {"forget_gate": config.forget_gate}))

    # Jitted once here so that eager calls are one dispatch; under an outer jit they are inlined.
    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence("slstm", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_in"].shape[0] if "w_in" in params else d,
                           modes=nonlinear.MODES, default_d_in=d)
