"""Titans: a neural long-term memory learned at test time, with attention, in three variants.

Paper: A. Behrouz, P. Zhong, V. Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663,
2024), Sections 3 and 4 (PAPERS.md §1.7). Registered as ``titans_mac``, ``titans_mag`` and ``titans_mal``.

The long-term memory (Section 3.1), per head h, is an MLP ``M`` of ``memory_depth`` layers (SiLU between
layers; depth 1 is a linear map) whose weights are the state. For a token with memory input u_t::

    q_t = l2(SiLU(u_t W_Q)),  k_t = l2(SiLU(u_t W_K)),  v_t = SiLU(u_t W_V)          (per head, §4.4)
    θ_t = σ(u_t W_θ + b_θ),  η_t = σ(u_t W_η + b_η),  α_t = σ(u_t W_α + b_α)          (per head)
    ℓ(M; k_t, v_t) = ½ ‖M(k_t) − v_t‖²                          (the paper's loss without its ½)
    S_t = η_t S_{t-1} − θ_t ∇ℓ(M_base(t); k_t, v_t)             surprise with momentum
    M_t = (1 − α_t) M_{t-1} + S_t                                forgetting
    read: M_t*(q_t) = M_t(q_t), with no update

Chunked training (Section 3.2): within a chunk of ``chunk_size`` tokens the gradients are taken at the
chunk-start weights (M_base(t) = the weights when t's chunk began), so they are computed in parallel; the
momentum and forgetting recurrences still act token by token inside the chunk. Chunks start at t = 0 and
at every reset. M_0 is learned (``memory_0`` ... params, one MLP per head), S_0 = 0.

Variants (Section 4; x̃ is the input after ``w_in``; every output goes through ``w_out``):

* MAC, memory as context (eqs. 21-25), segments = memory chunks of ``chunk_size`` tokens: token i of a
  segment retrieves h_i = M_seg*(q(x̃_i)) from the memory as it was when the segment began, attends
  (multi-head softmax attention) over [persistent tokens; h_j, x̃_j for j ≤ i in the segment], giving
  y_i; the memory is then updated with y_i (keys, values, gates from y) and the output is the gate
  g(y_i, M_t*(q(y_i))).
* MAG, memory as gate: sliding-window attention (each token sees itself and the ``window``
  tokens before it, plus the persistent tokens) and the memory run side by side on x̃; the output is
  g(attention, M_t*(q(x̃_t))).
* MAL, memory as layer: the memory read M_t*(q(x̃_t)) feeds sliding-window attention with
  persistent tokens.

The gate is g(a, m) = RMSNorm(a)·s_a ⊙ σ(RMSNorm(m)·s_m), the paper's "normalise both with learnable
vector-valued weights, then a non-linearity". Persistent memory is ``n_persistent`` learned
tokens in d_model space, projected by the attention's key and value maps and visible to every query.

Causality, and how it differs from the paper's segment-level equations: the paper writes MAC per
segment, so a token could see h and y of later tokens of its own segment; here the attention is causal
inside the segment (token i sees h_j and x̃_j for j ≤ i), and the output reads the memory after the
update of token i itself (the recurrent form of eq. 25), so every variant is causal and has an exact
``step``. The persistent tokens enter the attention only (the paper also prepends them to the memory's
input in MAG and MAL; with a learned M_0 that adds nothing a recurrence can express, and it would make
the fresh state depend on a forward pass). The paper's 1-D convolutions after the q, k, v projections,
and the residual/MLP around the mixer, are left to combinators (``zoo.residual``).

The memory runs on the fast-weight engine ``zoo.ops.fast_weights`` (``memory_fn`` = ``memory_forward``,
``mini_batch`` = ``chunk_size``, momentum and decay given), whose state it keeps.

State (float32): ``memory``, the engine's state: ``weights`` (the chunk-start weights; at a chunk start,
the current ones), ``delta`` (the current weights minus those inside a chunk), ``momentum`` (S), each a
tuple of [B, H, d_in, d_out] per layer, and ``position`` [B], the place inside the chunk (read with floor,
zero gradient). MAC adds ``segment`` = {keys, values} [B, chunk_size, 2, H, D/H]: the projected h_j and x̃_j
of the tokens of the current segment (slots past ``position`` unused). MAG and MAL add ``window`` = {keys,
values [B, W, H, D/H], valid [B, W]}, the last W keys and values, slot j holding the key W - j steps back
(``valid`` multiplies its softmax weight, as in ``zoo.ops.softmax``).

Modes of ``apply`` (both equal to folding ``step``, in values and gradients):

* ``"chunked"`` (also ``"auto"``). MAG and MAL: the engine's chunked mode (whole chunks at once: all
  gradients of a chunk together, the momentum and forgetting recurrences in closed form; its own
  ``lax.cond`` falls back to tokens when a row enters partway through a chunk or a reset falls in the
  sequence), and the attention in blocks of ``chunk_size`` queries (a ``lax.scan``; token by token when
  there are resets). MAC: when every row enters at a segment start and ``reset`` is None, a ``lax.scan``
  over whole segments (retrieval, attention and the engine's mini-batch for all tokens of a segment at
  once), then the last T mod chunk_size tokens as one partial segment the same way; otherwise
  (``lax.cond``, or any reset) the sequential form.
* ``"sequential"``: token by token (``lax.scan``).

Compute: the input is cast to float32 (float64 for float64 inputs) before ``w_in`` and everything runs
there (in bfloat16 the memory's gradient steps would be lost to rounding); the output is cast back to
x's dtype. Sliding-window attention is written here rather than taken from ``zoo.ops.softmax``, whose
window has no persistent (always visible) keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.contract import make_recurrence
from zoo.models._common import check_chunk_size, dense_init
from zoo.models._matrix_common import check_positive_ints, merge_heads, split_heads
from zoo.ops import fast_weights
from zoo.ops._time import reset_for_reverse
from zoo.registry import register

PAPER = "Titans: Learning to Memorize at Test Time"
MODES = ("chunked", "sequential")
VARIANTS = ("mac", "mag", "mal")
NORM_EPS = 1e-6
L2_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TitansConfig:
    """Fields shared by the three variants; each registered name fixes ``variant``."""

    variant: ClassVar[str] = "mac"
    d_model: int = 16
    n_heads: int = 2
    d_memory: int = 16           # hidden width of the memory MLP
    memory_depth: int = 2        # layers of the memory MLP (1: a linear memory)
    chunk_size: int = 4          # memory chunk (gradients at its start); MAC's segment length
    window: int = 4              # MAG / MAL: each token also sees the `window` tokens before it
    n_persistent: int = 2        # learned persistent memory tokens
    lr_bias: float = -2.0        # initial biases of the gates θ (step size), η (momentum), α (forgetting)
    momentum_bias: float = 2.0
    decay_bias: float = -4.0

    def __post_init__(self):
        name = f"titans_{self.variant}"
        check_chunk_size(name, self.chunk_size)
        check_positive_ints(name, self, ("d_model", "n_heads", "d_memory", "memory_depth", "window"))
        persistent = self.n_persistent
        if isinstance(persistent, bool) or not isinstance(persistent, int) or persistent < 0:
            raise ValueError(f"{name}: n_persistent must be a non-negative int, got {self.n_persistent!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"{name}: d_model = {self.d_model} must be a multiple of n_heads = "
                             f"{self.n_heads}")
        if self.variant not in VARIANTS:
            raise ValueError(f"titans: variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def memory_dims(self) -> tuple[int, ...]:
        """Widths through the memory MLP: D/H -> d_memory -> ... -> D/H."""
        return (self.d_head, *(self.d_memory,) * (self.memory_depth - 1), self.d_head)


@dataclasses.dataclass(frozen=True)
class TitansMACConfig(TitansConfig):
    variant: ClassVar[str] = "mac"


@dataclasses.dataclass(frozen=True)
class TitansMAGConfig(TitansConfig):
    variant: ClassVar[str] = "mag"


@dataclasses.dataclass(frozen=True)
class TitansMALConfig(TitansConfig):
    variant: ClassVar[str] = "mal"


def state_size(c: TitansConfig) -> int:
    dims = c.memory_dims
    w0 = tuple(np.zeros((c.n_heads, a, b)) for a, b in zip(dims[:-1], dims[1:], strict=True))
    memory = fast_weights.state_size(w0, momentum=True)
    attention = 4 * c.chunk_size * c.d_model if c.variant == "mac" else c.window * (2 * c.d_model + 1)
    return memory + attention


# --------------------------------------------------------------------------------------------
# The neural memory: one head's MLP, its per-token gradient, and the update.


def memory_forward(layers, x):
    """One head's memory M(x): ``layers`` a tuple of [d_in, d_out] matrices, SiLU between them."""
    for i, w in enumerate(layers):
        x = x @ w if i == 0 else jax.nn.silu(x) @ w
    return x


def _layer(x, w):
    """x [..., H, i] times each head's w [..., H, i, o] (leading axes broadcast)."""
    return jnp.einsum("...hi,...hio->...ho", x, w)


def memory_read(layers, q):
    """M(q) for every head: layers leaves [B, H, i, o] (or broadcastable), q [..., H, D/H]."""
    for i, w in enumerate(layers):
        q = _layer(q if i == 0 else jax.nn.silu(q), w)
    return q


# --------------------------------------------------------------------------------------------
# Attention with persistent tokens, and small pieces.


def attend(q, keys, values, weights, persistent_kv, scale):
    """Σ_s w_s e^{q·k_s σ} v_s / Σ_s w_s e^{q·k_s σ} over the persistent keys (weight 1) and ``keys``.

    q [B, Q, H, E], keys and values [B, S, H, E], weights broadcastable to [B, Q, S]. Keys of weight 0
    are left out, also of the running maximum (as in ``zoo.ops.softmax``).
    """
    pk, pv = persistent_kv
    batch, n_q = q.shape[:2]
    weights = jnp.broadcast_to(weights, (batch, n_q, keys.shape[1]))
    if pk.shape[0]:
        keys = jnp.concatenate([jnp.broadcast_to(pk, (batch, *pk.shape)), keys], axis=1)
        values = jnp.concatenate([jnp.broadcast_to(pv, (batch, *pv.shape)), values], axis=1)
        weights = jnp.concatenate([jnp.ones((batch, n_q, pk.shape[0]), weights.dtype), weights], axis=-1)
    scores = jnp.einsum("bqhe,bshe->bhqs", q, keys) * scale
    weights = weights[:, None]
    seen = weights > 0
    top = lax.stop_gradient(jnp.max(jnp.where(seen, scores, -jnp.inf), axis=-1, keepdims=True))
    e = weights * jnp.exp(jnp.where(seen, scores - top, -jnp.inf))
    return jnp.einsum("bhqs,bshe->bqhe", e / jnp.sum(e, axis=-1, keepdims=True), values)


def rms_norm(x, scale):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS) * scale


def l2_normalise(x):
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def _where_rows(flag, fresh, carried):
    return jnp.where(flag.reshape((-1,) + (1,) * (carried.ndim - 1)), fresh, carried)


def _build(config: TitansConfig):
    variant, heads, e = config.variant, config.n_heads, config.d_head
    chunk, window, d = config.chunk_size, config.window, config.d_model
    name = f"titans_{variant}"
    scale = 1.0 / math.sqrt(e)
    dims = config.memory_dims

    def init(key, d_in):
        keys = iter(jax.random.split(key, 16 + len(dims)))
        params = {"w_in": dense_init(next(keys), d_in, d)}
        for proj in ("w_mq", "w_mk", "w_mv", "w_q", "w_k", "w_v", "w_out"):
            params[proj] = dense_init(next(keys), d, d)
        for gate, bias in (("lr", config.lr_bias), ("momentum", config.momentum_bias),
                           ("decay", config.decay_bias)):
            params[f"w_{gate}"] = dense_init(next(keys), d, heads)
            params[f"b_{gate}"] = jnp.full((heads,), bias, jnp.float32)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            params[f"memory_{i}"] = jax.random.normal(next(keys), (heads, a, b), jnp.float32) / math.sqrt(a)
        params["persistent"] = jax.random.normal(next(keys), (config.n_persistent, d), jnp.float32)
        params["scale_memory"] = jnp.ones((d,), jnp.float32)
        if variant != "mal":
            params["scale_attention"] = jnp.ones((d,), jnp.float32)
        return params

    def memory_w0(params):
        """M_0: one MLP per head, leaves [H, d_in, d_out] (the engine's W0)."""
        return tuple(params[f"memory_{i}"] for i in range(len(dims) - 1))

    def initial_state(params, batch):
        state = {"memory": fast_weights.initial_state(memory_w0(params), batch, momentum=True)}
        if variant == "mac":
            zeros = jnp.zeros((batch, chunk, 2, heads, e), jnp.float32)
            state["segment"] = {"keys": zeros, "values": zeros}
        else:
            zeros = jnp.zeros((batch, window, heads, e), jnp.float32)
            state["window"] = {"keys": zeros, "values": zeros,
                               "valid": jnp.zeros((batch, window), jnp.float32)}
        return state

    # ---- pieces on the float32 (float64) stream; u [..., D] -----------------------------------

    def p32(params, key, acc):
        return params[key].astype(acc)

    def memory_query(params, u):
        return l2_normalise(split_heads(jax.nn.silu(u @ p32(params, "w_mq", u.dtype)), heads))

    def memory_inputs(params, u):
        """(q, k, v, θ, η, α) of the memory for inputs u [..., D]; per head."""
        acc = u.dtype
        k = l2_normalise(split_heads(jax.nn.silu(u @ p32(params, "w_mk", acc)), heads))
        v = split_heads(jax.nn.silu(u @ p32(params, "w_mv", acc)), heads)
        gate = lambda g: jax.nn.sigmoid(u @ p32(params, f"w_{g}", acc) + p32(params, f"b_{g}", acc))
        return memory_query(params, u), k, v, gate("lr"), gate("momentum"), gate("decay")

    def qkv(params, u):
        acc = u.dtype
        return tuple(split_heads(u @ p32(params, w, acc), heads) for w in ("w_q", "w_k", "w_v"))

    def persistent_kv(params, acc):
        p = p32(params, "persistent", acc)
        return tuple(split_heads(p @ p32(params, w, acc), heads) for w in ("w_k", "w_v"))

    def gated(params, a, m):
        acc = a.dtype
        return rms_norm(a, p32(params, "scale_attention", acc)) * jax.nn.sigmoid(
            rms_norm(m, p32(params, "scale_memory", acc)))

    def layer_norm(params, m):
        """MAL: the memory layer's output is RMS-normalised before the attention reads it (the raw read
        can be large, and the attention's softmax then saturates)."""
        return rms_norm(m, p32(params, "scale_memory", m.dtype))

    def output(params, o):
        return o @ p32(params, "w_out", o.dtype)

    # ---- the memory, on the fast-weight engine -----------------------------------------------------

    def memory_step(params, memory, u_t):
        """One token of the memory with inputs from u_t [B, D]: (new engine state, read [B, D])."""
        q, k, v, lr, eta, alpha = memory_inputs(params, u_t)
        memory, m = fast_weights.step(memory_forward, memory, q, k, v, lr, eta, alpha, mini_batch=chunk)
        return memory, merge_heads(m)

    def memory_sequence(params, memory, u, reset, mode):
        """The memory over u [B, T, D]: (reads [B, T, D], final engine state)."""
        q, k, v, lr, eta, alpha = memory_inputs(params, u)
        m, memory = fast_weights.apply(memory_forward, memory_w0(params), q, k, v, lr=lr, momentum=eta,
                                       decay=alpha, mini_batch=chunk, initial_state=memory, reset=reset,
                                       mode=mode)
        return merge_heads(m), memory

    # ---- sliding-window attention with persistent tokens (MAG, MAL) ----------------------------------

    def window_step(params, win, u_t):
        q, k, v = qkv(params, u_t)
        keys = jnp.concatenate([win["keys"], k[:, None]], axis=1)
        values = jnp.concatenate([win["values"], v[:, None]], axis=1)
        weights = jnp.concatenate([win["valid"], jnp.ones_like(win["valid"][:, :1])], axis=1)
        o = attend(q[:, None], keys, values, weights[:, None], persistent_kv(params, u_t.dtype), scale)
        return {"keys": keys[:, 1:], "values": values[:, 1:], "valid": weights[:, 1:]}, merge_heads(o[:, 0])

    def window_block(params, win, u):
        """A block of n tokens u [B, n, D] at once: query i sees extended key j (time j - W from the
        block start) when i <= j <= i + W."""
        n = u.shape[1]
        ext = np.arange(window + n)[None, :]
        band = (np.arange(n)[:, None] <= ext) & (ext <= np.arange(n)[:, None] + window)
        q, k, v = qkv(params, u)
        keys = jnp.concatenate([win["keys"], k], axis=1)
        values = jnp.concatenate([win["values"], v], axis=1)
        weights = jnp.concatenate([win["valid"], jnp.ones(u.shape[:2], u.dtype)], axis=1)
        o = attend(q, keys, values, weights[:, None] * band, persistent_kv(params, u.dtype), scale)
        tail = slice(n, n + window)
        return {"keys": keys[:, tail], "values": values[:, tail], "valid": weights[:, tail]}, merge_heads(o)

    def window_sequence(params, win, u, reset, mode):
        """u [B, T, D]: blocks of ``chunk`` queries (a lax.scan), or token by token when resets fall
        in the sequence (a reset empties the window) or in the sequential mode."""
        if mode == "sequential" or reset is not None:
            fresh = jax.tree.map(jnp.zeros_like, win)

            def body(carry, inputs):
                u_t, flag = inputs
                if flag is not None:
                    carry = jax.tree.map(lambda f, s: _where_rows(flag, f, s), fresh, carry)
                return window_step(params, carry, u_t)

            flags = None if reset is None else jnp.swapaxes(reset, 0, 1)
            win, o = lax.scan(body, win, (jnp.swapaxes(u, 0, 1), flags))
            return jnp.swapaxes(o, 0, 1), win
        batch, time = u.shape[:2]
        whole, parts = time // chunk * chunk, []
        if whole:
            blocks = jnp.moveaxis(u[:, :whole].reshape(batch, whole // chunk, chunk, d), 1, 0)
            win, o = lax.scan(lambda s, b: window_block(params, s, b), win, blocks)
            parts.append(jnp.moveaxis(o, 0, 1).reshape(batch, whole, d))
        if whole < time:
            win, o = window_block(params, win, u[:, whole:])
            parts.append(o)
        return jnp.concatenate(parts, axis=1), win

    # ---- MAC: one token, and one whole segment -------------------------------------------------------

    def segment_keys(params, u, h):
        """Keys and values of the segment tokens: [..., 2, H, D/H], the retrieved h_j first, then x̃_j."""
        _, k_x, v_x = qkv(params, u)
        _, k_h, v_h = qkv(params, h)
        return jnp.stack([k_h, k_x], axis=-3), jnp.stack([v_h, v_x], axis=-3)

    def flat(a):
        return a.reshape(a.shape[0], 2 * chunk, heads, e)

    def mac_step(params, state, u_t):
        memory = state["memory"]
        position = fast_weights.read_position(memory["position"], chunk)
        # The engine keeps the weights of the segment start ("weights") until the segment ends.
        h = merge_heads(memory_read(memory["weights"], memory_query(params, u_t)))
        k_t, v_t = segment_keys(params, u_t, h)
        slot = (jnp.arange(chunk)[None, :] == position[:, None])[:, :, None, None, None]
        seg = {"keys": jnp.where(slot, k_t[:, None], state["segment"]["keys"]),
               "values": jnp.where(slot, v_t[:, None], state["segment"]["values"])}
        seen = jnp.repeat(jnp.arange(chunk)[None, :] <= position[:, None], 2, axis=1).astype(u_t.dtype)
        q = qkv(params, u_t)[0]
        y = merge_heads(attend(q[:, None], flat(seg["keys"]), flat(seg["values"]), seen[:, None],
                               persistent_kv(params, u_t.dtype), scale)[:, 0])
        memory, m = memory_step(params, memory, y)
        return {"memory": memory, "segment": seg}, output(params, gated(params, y, m))

    def mac_segment(params, state, u):
        """n <= chunk_size tokens u [B, n, D] entered at a segment start: retrieval, attention and the
        memory's mini-batch for all n tokens at once."""
        n = u.shape[1]
        memory = state["memory"]
        h = merge_heads(memory_read(tuple(w[:, None] for w in memory["weights"]), memory_query(params, u)))
        keys, values = segment_keys(params, u, h)
        causal_pairs = np.repeat(np.arange(n)[None, :] <= np.arange(n)[:, None], 2, axis=1)
        flat_n = lambda a: a.reshape(a.shape[0], 2 * n, heads, e)  # noqa: E731
        q = qkv(params, u)[0]
        y = merge_heads(attend(q, flat_n(keys), flat_n(values), jnp.asarray(causal_pairs, u.dtype),
                               persistent_kv(params, u.dtype), scale))
        # The engine's mini-batch path alone: this state is at a mini-batch start by construction, and
        # fast_weights.apply would compile its token path as well, behind a lax.cond, in every segment.
        q_m, k_m, v_m, lr, eta, alpha = memory_inputs(params, y)
        m, memory = fast_weights.apply_aligned(memory_forward, memory, q_m, k_m, v_m, lr, eta, alpha,
                                               mini_batch=chunk)
        m = merge_heads(m)
        # Slots past n keep what they held, as n steps would leave them.
        seg = {name: jnp.concatenate([new_slots, state["segment"][name][:, n:]], axis=1)
               for name, new_slots in (("keys", keys), ("values", values))}
        new = {"memory": memory, "segment": seg}
        return new, output(params, gated(params, y, m))

    # ---- whole sequences -------------------------------------------------------------------------------

    def step_core(params, state, u_t):
        if variant == "mac":
            return mac_step(params, state, u_t)
        memory, m = memory_step(params, state["memory"], u_t)
        if variant == "mag":
            win, a = window_step(params, state["window"], u_t)
            o = gated(params, a, m)
        else:
            win, o = window_step(params, state["window"], layer_norm(params, m))
        return {"memory": memory, "window": win}, output(params, o)

    def mac_tokens(params, u, state, reset):
        fresh = as_acc(initial_state(params, u.shape[0]), u.dtype)

        def body(carry, inputs):
            u_t, flag = inputs
            if flag is not None:
                carry = jax.tree.map(lambda f, s: _where_rows(flag, f, s), fresh, carry)
            return mac_step(params, carry, u_t)

        flags = None if reset is None else jnp.swapaxes(reset, 0, 1)
        state, ys = lax.scan(body, state, (jnp.swapaxes(u, 0, 1), flags))
        return jnp.swapaxes(ys, 0, 1), state

    def mac_segments(params, u, state):
        batch, time = u.shape[:2]
        whole, parts = time // chunk * chunk, []
        if whole:
            segments = jnp.moveaxis(u[:, :whole].reshape(batch, whole // chunk, chunk, d), 1, 0)
            state, ys = lax.scan(lambda s, c: mac_segment(params, s, c), state, segments)
            parts.append(jnp.moveaxis(ys, 0, 1).reshape(batch, whole, d))
        if whole < time:
            state, ys = mac_segment(params, state, u[:, whole:])
            parts.append(ys)
        return jnp.concatenate(parts, axis=1), state

    def sequence_core(params, u, state, reset, mode):
        if variant == "mac":
            if mode == "sequential" or reset is not None:
                return mac_tokens(params, u, state, reset)
            aligned = jnp.all(fast_weights.read_position(state["memory"]["position"], chunk) == 0)
            return lax.cond(aligned, lambda s: mac_segments(params, u, s),
                            lambda s: mac_tokens(params, u, s, None), state)
        m, memory = memory_sequence(params, state["memory"], u, reset, mode)
        if variant == "mag":
            a, win = window_sequence(params, state["window"], u, reset, mode)
            o = gated(params, a, m)
        else:
            o, win = window_sequence(params, state["window"], layer_norm(params, m), reset, mode)
        return output(params, o), {"memory": memory, "window": win}

    def read_input(params, x):
        acc = jnp.promote_types(x.dtype, jnp.float32)
        return x.astype(acc) @ p32(params, "w_in", acc)

    def as_acc(state, acc):
        return jax.tree.map(lambda s: s.astype(acc), state)

    def step(params, state, x_t):
        u_t = read_input(params, x_t)
        state, y = step_core(params, as_acc(state, u_t.dtype), u_t)
        return state, y.astype(x_t.dtype)

    def apply(params, xs, state, reset, mode, reverse):
        if reverse:
            xs, reset = jnp.flip(xs, axis=1), reset_for_reverse(reset)
        u = read_input(params, xs)
        mode = "chunked" if mode == "auto" else mode
        ys, state = sequence_core(params, u, as_acc(state, u.dtype), reset, mode)
        ys = ys.astype(xs.dtype)
        return (jnp.flip(ys, axis=1) if reverse else ys), state

    step, apply = jax.jit(step), jax.jit(apply, static_argnums=(4, 5))
    return make_recurrence(name, init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda params: params["w_in"].shape[0], modes=MODES,
                           default_d_in=config.d_model)


def _register(variant: str, config: type):
    return register(f"titans_{variant}", config=config, paper=PAPER, engine="fast_weights", modes=MODES,
                    state_size=state_size)(_build)


build_mac = _register("mac", TitansMACConfig)
build_mag = _register("mag", TitansMAGConfig)
build_mal = _register("mal", TitansMALConfig)
