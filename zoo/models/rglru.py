"""RG-LRU: the Real-Gated Linear Recurrent Unit, and the recurrent block of Hawk and Griffin.

Paper: S. De, S. L. Smith, A. Fernando, A. Botev, G. Cristian-Muraru, A. Gu, R. Haroun, L. Berrada,
Y. Chen, S. Srinivasan, G. Desjardins, A. Doucet, D. Budden, Y. W. Teh, R. Pascanu, N. De Freitas,
C. Gulcehre, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models" (arXiv 2402.19427, 2024), Section 2.4. Numerical reference: google-deepmind/recurrentgemma
(``recurrentgemma.jax.layers.RGLRU`` and ``modules.RecurrentBlock``), whose conventions are kept so
that ``zoo.convert.from_recurrentgemma`` reproduces its outputs.

The RG-LRU layer, per channel (x_t ∈ R^D, D = d_model, gates block-diagonal over ``n_heads`` blocks)::

    r_t = σ(W_a x_t + b_a)                      recurrence gate
    i_t = σ(W_x x_t + b_x)                      input gate
    log a_t = -c · r_t · softplus(Λ)            c = 8; a = σ(Λ)^(c r_t) in the paper's notation
    h_t = a_t ⊙ h_{t-1} + m_t ⊙ (i_t ⊙ x_t),    m_t = sqrt(1 - a_t²), or 1 at a segment start
    y_t = h_t

``Λ`` (``a_param``) is initialised so that the base decay ``exp(-softplus(Λ))`` (the decay at
c·r = 1) is uniform in area on the ring ``[min_rad, max_rad]`` (recurrentgemma's
``rnn_real_param_init``). ``W_a`` and ``W_x`` are [H, D/H, D/H] blocks (``w_a_gate``,
``w_input_gate``), LeCun-normal per block; the biases start at zero.

The recurrent block (Figure 2 of the paper; ``recurrent_block_*`` below), x_t ∈ R^{d_in}::

    g_t = GeLU(W_y x_t + b_y)                   tanh-approximate GeLU, width d_rnn
    u_t = Conv1D_K(W_x' x_t + b_x')             causal depthwise, K = 4 taps (zoo.ops.conv1d)
    out_t = W_out (RG-LRU(u)_t ⊙ g_t) + b_out

Engines: ``zoo.ops.diagonal`` for the scan (all its modes), ``zoo.ops.conv1d`` for the convolution.

Segment starts (recurrentgemma's ``segment_pos == 0``): the first token of a segment is not scaled
down by sqrt(1 - a²), and its carried state is dropped. In zoo a segment starts at a ``reset`` flag
and at the first step from a fresh ``initial_state``, so the state carries a float flag ``start``
[B]: 1.0 in ``initial_state`` (the next token begins a segment), 0.0 after any step. The first
step's multiplier is ``m + start · (1 - m)``; a state returned by ``apply`` or ``step`` continues its
segment (start = 0). The carried ``h`` is always used (it is zero in a fresh state), and a reset
replaces the whole state, ``h``, ``start`` and the conv window, by a fresh one.

What differs from recurrentgemma, and why:

* ``1 - a²`` is computed as ``-expm1(2 log a)``, exact near a = 1 where ``1 - exp(2 log a)``
  cancels (a relative difference of up to ~1e-5 in the multiplier for the slowest channels). Its
  square root has recurrentgemma's bounded derivative (at most 1000, as ``sqrt_bound_derivative``).
* The decay ``log a``, ``a`` and the multiplier are always float32, whatever the compute dtype, so
  that bfloat16 compute cannot round a slow decay to 1; the gate products take operands in the
  compute dtype, and the scan input ``m ⊙ i ⊙ x`` is formed in float32. In the recurrent block the
  convolution runs in float32 too (its small taps sum terms of both signs).
* Only the real RG-LRU (recurrentgemma's ``only_real=True``, the released models) is provided.
* The registered ``rglru`` is the layer alone. Given an input width other than ``d_model`` it reads
  the input through a dense [d_in, d_model] projection ``w_in`` (the layer itself maps width D to
  width D); with d_in = d_model (``rec.init(key)``) it is exactly the paper's layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, chunk_kwargs, dense_init
from zoo.ops import conv1d, diagonal
from zoo.ops._time import reset_for_reverse
from zoo.registry import register

C = 8.0                  # the paper's c: log a = -c · r · softplus(Λ)
MAX_SQRT_GRADIENT = 1000.0


@dataclasses.dataclass(frozen=True)
class RGLRUConfig:
    d_model: int = 16
    n_heads: int = 2         # blocks of the block-diagonal gate weights
    c: float = C
    min_rad: float = 0.9     # exp(-softplus(Λ)) starts uniform on [min_rad, max_rad] in area
    max_rad: float = 0.999
    chunk_size: int = 64     # steps per chunk in mode="chunked"

    def __post_init__(self):
        check_chunk_size("rglru", self.chunk_size)
        check_widths("rglru", self.d_model, self.n_heads)
        check_radii("rglru", self.min_rad, self.max_rad)
        if not self.c > 0:
            raise ValueError(f"rglru: c must be positive, got {self.c!r}")


def check_widths(model: str, d: int, n_heads: int) -> None:
    if d <= 0 or n_heads <= 0 or d % n_heads:
        raise ValueError(f"{model}: the RG-LRU width {d} must be a positive multiple of n_heads = {n_heads} "
                         f"(the gates are block-diagonal over heads)")


def check_radii(model: str, min_rad: float, max_rad: float) -> None:
    if not 0.0 < min_rad < max_rad < 1.0:
        raise ValueError(f"{model}: need 0 < min_rad < max_rad < 1, got min_rad={min_rad}, max_rad={max_rad}")


# --------------------------------------------------------------------------------------------
# The layer.


def a_param_init(key: jax.Array, d: int, min_rad: float, max_rad: float) -> jax.Array:
    """Λ [d] with exp(-softplus(Λ)) uniform in area on the ring [min_rad, max_rad]."""
    u = jax.random.uniform(key, (d,), jnp.float32)
    log_radius = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2)
    return jnp.log(jnp.expm1(-log_radius))          # softplus⁻¹(-log radius)


def layer_init(key: jax.Array, d: int, n_heads: int, min_rad: float = 0.9, max_rad: float = 0.999) -> dict:
    k_a, k_x, k_r = jax.random.split(key, 3)
    block = d // n_heads
    gate = lambda k: jax.random.normal(k, (n_heads, block, block), jnp.float32) / math.sqrt(block)
    return {
        "a_param": a_param_init(k_a, d, min_rad, max_rad),
        "w_input_gate": gate(k_x), "b_input_gate": jnp.zeros((n_heads, block), jnp.float32),
        "w_a_gate": gate(k_r), "b_a_gate": jnp.zeros((n_heads, block), jnp.float32),
    }


def layer_initial_state(batch: int, d: int) -> dict:
    """h = 0, and start = 1: the next token begins a segment."""
    return {"h": jnp.zeros((batch, d), jnp.float32), "start": jnp.ones((batch,), jnp.float32)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _bounded_sqrt(x, max_gradient):
    return jnp.sqrt(x)


def _bounded_sqrt_fwd(x, max_gradient):
    return jnp.sqrt(x), x


def _bounded_sqrt_bwd(max_gradient, x, g):
    # d sqrt(x)/dx = 1/(2 sqrt x) is unbounded as a -> 1; recurrentgemma caps it at max_gradient
    # (bfloat16 training otherwise meets NaNs), by evaluating it no lower than 1/(4 max²).
    return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, 0.25 / max_gradient**2)),)


_bounded_sqrt.defvjp(_bounded_sqrt_fwd, _bounded_sqrt_bwd)


def accumulation_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None, dtype=None) -> jax.Array:
    """x @ w + b as a product in ``dtype`` (default x's), returned in float32 (float64 for float64).

    In bfloat16 compute the product's operands and result are rounded once each, and what follows
    it (biases, gates, norms, residual sums) stays float32. (XLA on CPU has no bfloat16 product
    with a float32 result, ``preferred_element_type``, so the result is rounded.)
    """
    dtype = x.dtype if dtype is None else dtype
    acc = accumulation_dtype(dtype)
    y = jnp.matmul(x.astype(dtype), w.astype(dtype)).astype(acc)
    return y if b is None else y + b.astype(acc)


def _gate_preactivations(params: dict, x: jax.Array, dtype):
    """(W_x x + b_x, W_a x + b_a), both [..., D] in float32: one block-diagonal product for both."""
    heads, block = params["w_a_gate"].shape[:2]
    acc = accumulation_dtype(dtype)
    w = jnp.concatenate([params["w_input_gate"], params["w_a_gate"]], axis=-1).astype(dtype)
    b = jnp.concatenate([params["b_input_gate"], params["b_a_gate"]], axis=-1).astype(acc)
    xb = x.astype(dtype).reshape(*x.shape[:-1], heads, block)
    z = jnp.einsum("...hi,hij->...hj", xb, w).astype(acc) + b
    return z[..., :block].reshape(x.shape), z[..., block:].reshape(x.shape)


def _decay_and_input(params: dict, x: jax.Array, start: jax.Array, c: float, dtype):
    """a and the scan input m ⊙ i ⊙ x, both float32; ``start`` broadcasts against x[..., 0].

    The gate products run in the compute dtype; the gates, the multiplier and their product with x
    in float32, which in bfloat16 compute saves three roundings of the input to the scan.
    """
    pre_x, pre_a = _gate_preactivations(params, x, dtype)
    log_a = -c * jax.nn.sigmoid(pre_a) * jax.nn.softplus(params["a_param"])
    norm = _bounded_sqrt(-jnp.expm1(2.0 * log_a), MAX_SQRT_GRADIENT)
    multiplier = norm + start[..., None] * (1.0 - norm)
    return jnp.exp(log_a), x.astype(pre_x.dtype) * jax.nn.sigmoid(pre_x) * multiplier


def _start_weights(reset, start0: jax.Array, time: int, reverse: bool) -> jax.Array:
    """[B, T] float32: 1 where a step begins a segment, start0 at the first processed step."""
    batch = start0.shape[0]
    if reset is None:
        flags = jnp.zeros((batch, time), bool)
    else:
        # Backwards, step t begins a segment when the carry from t + 1 is dropped.
        reset = jnp.asarray(reset, bool)
        flags = jnp.flip(reset_for_reverse(reset), axis=1) if reverse else reset
    first = time - 1 if reverse else 0
    weights = flags.astype(accumulation_dtype(start0.dtype))
    return weights.at[:, first].set(jnp.where(flags[:, first], 1.0, start0))


def layer_step(params: dict, state: dict, x_t: jax.Array, c: float = C, dtype=None):
    """One token: x_t [B, D] -> (new state, y_t [B, D] in x_t's dtype); ``dtype`` as in layer_apply."""
    dtype = x_t.dtype if dtype is None else dtype
    a, b = _decay_and_input(params, x_t, state["start"], c, dtype)
    h = diagonal.step(a, b, state["h"])
    return {"h": h, "start": jnp.zeros_like(state["start"])}, h.astype(x_t.dtype)


def layer_apply(params: dict, x: jax.Array, state: dict, reset=None, mode: str = "auto",
                reverse: bool = False, c: float = C, chunk_size: int = 64, dtype=None):
    """x [B, T, D] -> (y [B, T, D] in x's dtype, final state). ``dtype`` (default x's) is the operand
    dtype of the gate products: a float32 x with a bfloat16 ``dtype`` keeps its precision in the
    scan input."""
    dtype = x.dtype if dtype is None else dtype
    starts = _start_weights(reset, state["start"], x.shape[1], reverse)
    a, b = _decay_and_input(params, x, starts, c, dtype)
    h, final = diagonal.apply(a, b, initial_state=state["h"], reset=reset, reverse=reverse, mode=mode,
                              **chunk_kwargs(mode, chunk_size))
    return h.astype(x.dtype), {"h": final, "start": jnp.zeros_like(state["start"])}


# --------------------------------------------------------------------------------------------
# The recurrent block of Hawk and Griffin.


def recurrent_block_init(key: jax.Array, d_in: int, d_rnn: int, d_out: int, n_heads: int, conv_width: int = 4,
                         min_rad: float = 0.9, max_rad: float = 0.999, out_scale: float = 1.0) -> dict:
    """``out_scale`` multiplies the variance of the output projection (Griffin uses 2 / n_layers)."""
    k_x, k_y, k_conv, k_lru, k_out = jax.random.split(key, 5)
    return {
        "w_x": dense_init(k_x, d_in, d_rnn), "b_x": jnp.zeros((d_rnn,), jnp.float32),
        "w_y": dense_init(k_y, d_in, d_rnn), "b_y": jnp.zeros((d_rnn,), jnp.float32),
        # Small taps (variance 0.01 / K), as recurrentgemma starts them.
        "conv_w": jax.random.normal(k_conv, (conv_width, d_rnn), jnp.float32) * math.sqrt(0.01 / conv_width),
        "conv_b": jnp.zeros((d_rnn,), jnp.float32),
        "rglru": layer_init(k_lru, d_rnn, n_heads, min_rad, max_rad),
        "w_out": dense_init(k_out, d_rnn, d_out) * math.sqrt(out_scale),
        "b_out": jnp.zeros((d_out,), jnp.float32),
    }


def recurrent_block_initial_state(params: dict, batch: int) -> dict:
    taps, d_rnn = params["conv_w"].shape
    return {"conv": jnp.zeros((batch, taps - 1, d_rnn), jnp.float32),
            "rglru": layer_initial_state(batch, d_rnn)}


def recurrent_block_step(params: dict, state: dict, x_t: jax.Array, dtype=None):
    """One token: x_t [B, d_in] -> (new state, out [B, d_out] in float32); ``dtype`` as in apply."""
    dtype = x_t.dtype if dtype is None else dtype
    gate = jax.nn.gelu(dense(x_t, params["w_y"], params["b_y"], dtype), approximate=True)
    conv_state, u = conv1d.step(params["conv_w"], params["conv_b"], state["conv"],
                                dense(x_t, params["w_x"], params["b_x"], dtype))
    lru_state, h = layer_step(params["rglru"], state["rglru"], u, dtype=dtype)
    return {"conv": conv_state, "rglru": lru_state}, dense(h * gate, params["w_out"], params["b_out"], dtype)


def recurrent_block_apply(params: dict, x: jax.Array, state: dict, reset=None, mode: str = "auto",
                          reverse: bool = False, chunk_size: int = 64, dtype=None):
    """x [B, T, d_in] -> (out [B, T, d_out] in float32, final state).

    ``dtype`` (default x's) is the operand dtype of the products; the convolution, the gates and
    the scan run in float32 (in bfloat16 the conv's small taps summing terms of both signs alone
    would cost a percent of its output; its window state is float32 anyway).
    """
    dtype = x.dtype if dtype is None else dtype
    gate = jax.nn.gelu(dense(x, params["w_y"], params["b_y"], dtype), approximate=True)
    u, conv_state = conv1d.apply(dense(x, params["w_x"], params["b_x"], dtype), params["conv_w"],
                                 params["conv_b"], initial_state=state["conv"], reset=reset, reverse=reverse)
    h, lru_state = layer_apply(params["rglru"], u, state["rglru"], reset, mode, reverse,
                               chunk_size=chunk_size, dtype=dtype)
    out = dense(h * gate, params["w_out"], params["b_out"], dtype)
    return out, {"conv": conv_state, "rglru": lru_state}


def recurrent_block_state_size(d_rnn: int, conv_width: int) -> int:
    return (conv_width - 1) * d_rnn + d_rnn + 1


# --------------------------------------------------------------------------------------------
# The registered layer.


@register("rglru", config=RGLRUConfig,
          paper="Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models",
          engine="diagonal", modes=diagonal.MODES, state_size=lambda c: c.d_model + 1)
def build(config: RGLRUConfig):
    d = config.d_model

    def init(key, d_in):
        k_layer, k_in = jax.random.split(key)
        params = layer_init(k_layer, d, config.n_heads, config.min_rad, config.max_rad)
        if d_in != d:
            params["w_in"] = dense_init(k_in, d_in, d)
        return params

    def read(params, x):
        return x @ params["w_in"].astype(x.dtype) if "w_in" in params else x

    def initial_state(params, batch):
        return layer_initial_state(batch, d)

    def step(params, state, x_t):
        return layer_step(params, state, read(params, x_t), config.c)

    def apply(params, xs, state, reset, mode, reverse):
        return layer_apply(params, read(params, xs), state, reset, mode, reverse, config.c, config.chunk_size)

    def input_width(params):
        return params["w_in"].shape[0] if "w_in" in params else params["a_param"].shape[0]

    return make_recurrence("rglru", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=input_width, modes=diagonal.MODES, default_d_in=d)
