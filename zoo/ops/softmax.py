"""The softmax engine: softmax attention written as a recurrence over time.

Local (sliding-window) causal attention, the temporal-mixing layer of Griffin (S. De, S. L. Smith,
A. Fernando, et al., "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models", arXiv 2402.19427, 2024). Query t attends to its own key and to the ``W`` keys
before it, inside its segment::

    o_t = Σ_{s ∈ S(t)} w_s exp(σ q_t·k_s) v_s  /  Σ_{s ∈ S(t)} w_s exp(σ q_t·k_s)
    S(t) = {s : t - W ≤ s ≤ t, no segment starts in (s, t]}

with ``σ = K^-1/2`` by default. The weight ``w_s`` is 1 for every token of the sequence; for a key
held in the state it is the state's ``valid`` entry (1 for a real key, 0 for an empty slot). As a
recurrence the state is what the next query can see, the last ``W`` keys and values, so decoding
keeps O(W) memory whatever the length.

Shapes (letters as in DESIGN.md; G key/value heads, H = G·R query heads; G = 1 is multi-query
attention, as in Griffin)::

    q  [B, T, H, K]      k  [B, T, G, K]      v  [B, T, G, V]      reset [B, T] bool
    o  [B, T, H, V] in q's dtype
    state = {"keys": [B, W, G, K], "values": [B, W, G, V], "valid": [B, W]}   float32, oldest first

Public API::

    o, final_state = apply(q, k, v, *, window=None, initial_state=None, reset=None, reverse=False,
                           mode="auto", scale=None, rope=None, chunk_size=None)
    state, o_t     = step(state, q_t, k_t, v_t, *, scale=None, rope=None)   # q_t [B, H, K], ...
    o, final_state = reference(q, k, v, *, window=None, initial_state=None, reset=None,
                               reverse=False, scale=None, rope=None)
    state          = initial_state(batch, window, kv_heads, key_dim, value_dim)

Modes of ``apply`` (equal to ``reference`` in values and gradients):

* ``"chunked"`` (the default): queries in blocks of ``C = chunk_size`` (default ``W``); block i
  attends to the ``C + W`` keys ending with its own last key, under a static band mask, so the
  cost is O(T (C + W)) and no [T, T] matrix is formed.
* ``"sequential"``: ``lax.scan`` of ``step`` over time, O(T W) work in T serial steps.

The state is a sliding buffer, not a ring buffer with a write pointer: slot ``j`` always holds the
key ``W - j`` steps back, so the state needs no integer position (every state leaf stays a float32
that can be saved, averaged or differentiated), and the shift costs the same O(W) per step as the
attention read itself.

Rotary position embedding (``rope=Rope(dims, base)``, RoFormer, Su et al. 2021) rotates the first
``dims`` entries of each query and key head, pairing entry ``i`` with ``i + dims/2`` at frequency
``base^(-2i/dims)`` (Griffin rotates half of each head: ``dims = K/2``). The scores depend only on
the offset between query and key, so the keys are stored unrotated and rotated by their offset
from the query when read: the state needs no absolute position either. The chunked mode rotates by
positions relative to each block's start, so the angles stay below ``C + W`` whatever T is (an
absolute position loses float32 precision in ``position · frequency`` after ~10^5 tokens).

``reset[b, t] = True`` drops the state before step ``t``: the keys held in the state and every key
before ``t`` become invisible, exactly as if the segment were run alone from an empty state; a
final state then holds zeros in the slots before the segment start. ``reverse=True`` runs time
backwards (query t sees keys t..t+W), with ``reset`` keeping its meaning (``zoo/ops/_time.py``).

The weights ``valid`` enter as multipliers of ``exp``, so a state with weights between 0 and 1 (an
average of states, say) is still a well-defined, differentiable input. A weight of exactly 0 marks
an empty slot: it is left out of the softmax (also out of its running maximum), and its gradient is
taken as 0 (the one-sided derivative there grows without bound with the slot's score).

Scores, the softmax and the weighted sums run in float32 (float64 for float64 inputs, for tests);
``o`` is cast to q's dtype.
Differentiation is reverse-mode autodiff through these jnp operations.

Aaren's full-attention prefix scan ("Attention as an RNN", Feng et al. 2024) lives in
``zoo/ops/softmax_scan.py``, which calls this module for its windowed case.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops._checks import check_float
from zoo.ops._time import check_reset, reset_before, reset_for_reverse

LOCAL_MODES = ("chunked", "sequential")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of the first ``dims`` entries of each head (``dims`` even), at frequencies
    ``base^(-2i/dims)``, i < dims/2, pairing entry i with entry i + dims/2."""

    dims: int
    base: float = 10_000.0

    def __post_init__(self):
        if isinstance(self.dims, bool) or not isinstance(self.dims, int) or self.dims <= 0 or self.dims % 2:
            raise ValueError(f"softmax.Rope: dims must be a positive even int, got {self.dims!r}")
        if not self.base > 1:
            raise ValueError(f"softmax.Rope: base must be > 1, got {self.base!r}")


# --------------------------------------------------------------------------------------------
# Small pieces.


def _acc_dtype(dtype):
    return jnp.promote_types(jnp.float32, dtype)


def rotate(x: jax.Array, positions, rope: Rope | None) -> jax.Array:
    """x [..., K] rotated at ``positions`` (broadcastable against x.shape[:-1]); entries past
    ``rope.dims`` are unchanged. Static (numpy) positions give constant cos/sin tables."""
    if rope is None:
        return x
    half = rope.dims // 2
    inv_freq = 1.0 / rope.base ** (2 * np.arange(half) / rope.dims)
    if isinstance(positions, np.ndarray):
        angle = positions.astype(np.float64)[..., None] * inv_freq
        cos, sin = jnp.asarray(np.cos(angle), x.dtype), jnp.asarray(np.sin(angle), x.dtype)
    else:
        angle = jnp.asarray(positions, x.dtype)[..., None] * jnp.asarray(inv_freq, x.dtype)
        cos, sin = jnp.cos(angle), jnp.sin(angle)
    first, second, rest = x[..., :half], x[..., half:rope.dims], x[..., rope.dims:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, rest], axis=-1)


def _weighted_softmax_average(scores, weights, values, spec: str):
    """Σ_s w_s e^{scores_s} v_s / Σ_s w_s e^{scores_s} over the last axis of ``scores``.

    Entries with weight 0 are left out before the maximum is taken, so a large score in an empty
    slot cannot push the others to underflow; every row has at least one positive weight (the
    query's own key). ``spec`` contracts the normalised weights with ``values``.
    """
    seen = weights > 0
    top = lax.stop_gradient(jnp.max(jnp.where(seen, scores, -jnp.inf), axis=-1, keepdims=True))
    # -inf (not a where after exp) keeps the gradient finite where scores - top would overflow.
    e = weights * jnp.exp(jnp.where(seen, scores - top, -jnp.inf))
    return jnp.einsum(spec, e / jnp.sum(e, axis=-1, keepdims=True), values)


# --------------------------------------------------------------------------------------------
# The empty state, and validation.


def initial_state(batch: int, window: int, kv_heads: int, key_dim: int, value_dim: int, dtype=jnp.float32):
    """The empty window: zero keys and values with weight 0."""
    return {"keys": jnp.zeros((batch, window, kv_heads, key_dim), dtype),
            "values": jnp.zeros((batch, window, kv_heads, value_dim), dtype),
            "valid": jnp.zeros((batch, window), dtype)}


def _check_float(who: str, arg: str, x, rank: int, letters: str) -> None:
    check_float(who, arg, x, rank=rank, letters=letters)


def _check_qkv(who, q, k, v, time_axis: bool):
    rank = 4 if time_axis else 3
    t = "T, " if time_axis else ""
    _check_float(who, "q", q, rank, f"[B, {t}H, K]")
    _check_float(who, "k", k, rank, f"[B, {t}G, K]")
    _check_float(who, "v", v, rank, f"[B, {t}G, V]")
    lead = q.shape[:rank - 2]
    if k.shape[:rank - 2] != lead or v.shape[:rank - 2] != lead:
        raise ValueError(f"{who}: q {q.shape}, k {k.shape} and v {v.shape} must share [B, {t}...]")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{who}: k has shape {k.shape} but q has {q.shape}; q and k must share K")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{who}: v has shape {v.shape} but k has {k.shape}; k and v must share G")
    heads, groups = q.shape[-2], k.shape[-2]
    if groups == 0 or heads % groups:
        raise ValueError(f"{who}: q has {heads} heads (shape {q.shape}), not a multiple of the {groups} "
                         f"key/value heads of k {k.shape}")
    if time_axis and q.shape[1] == 0:
        raise ValueError(f"{who}: q has shape {q.shape} with T = 0 steps; at least one step is needed")


def _check_state(who, state, batch, groups, key_dim, value_dim):
    if not isinstance(state, dict) or set(state) != {"keys", "values", "valid"}:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{who}: the state must be a dict with keys, values and valid, got {got}")
    window = np.shape(state["keys"])[1] if np.ndim(state["keys"]) == 4 else -1
    want = {"keys": (batch, window, groups, key_dim), "values": (batch, window, groups, value_dim),
            "valid": (batch, window)}
    for name, shape in want.items():
        if tuple(np.shape(state[name])) != shape or window < 1:
            raise ValueError(f"{who}: state[{name!r}] must have shape {shape} for the given q, k and v "
                             f"(window W >= 1), got {tuple(np.shape(state[name]))}")
    return window


def _check_rope(who, rope, key_dim):
    if rope is not None and (not isinstance(rope, Rope) or rope.dims > key_dim):
        raise ValueError(f"{who}: rope must be a softmax.Rope with dims <= K = {key_dim}, got {rope!r}")


def _prepare(who, q, k, v, window, state, reset, rope):
    """Checks; returns (window, state in the accumulation dtype, reset as bool or None)."""
    _check_qkv(who, q, k, v, time_axis=True)
    batch, time, _, key_dim = q.shape
    groups, value_dim = v.shape[2], v.shape[3]
    _check_rope(who, rope, key_dim)
    acc = _acc_dtype(q.dtype)
    if state is None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"{who}: window must be a positive int when no initial_state is given, "
                             f"got {window!r}")
        state = initial_state(batch, int(window), groups, key_dim, value_dim, acc)
    else:
        held = _check_state(who, state, batch, groups, key_dim, value_dim)
        if window is not None and window != held:
            raise ValueError(f"{who}: window={window!r} but initial_state holds W = {held} keys "
                             f"(state['keys'] shape {np.shape(state['keys'])})")
        window = held
        state = jax.tree.map(lambda s: jnp.asarray(s, acc), state)
    return int(window), state, check_reset(who, reset, batch, time)


def _scale(scale, key_dim):
    return 1.0 / math.sqrt(key_dim) if scale is None else scale


# --------------------------------------------------------------------------------------------
# One step.


def _step(state, q_t, k_t, v_t, scale, rope):
    """The recurrence in the accumulation dtype: q_t [B, G, R, K], k_t [B, G, K], v_t [B, G, V]."""
    window = state["keys"].shape[1]
    keys = jnp.concatenate([state["keys"], k_t[:, None]], axis=1)              # [B, W+1, G, K]
    values = jnp.concatenate([state["values"], v_t[:, None]], axis=1)
    weights = jnp.concatenate([state["valid"], jnp.ones_like(state["valid"][:, :1])], axis=1)
    # The query sits at offset 0; slot j holds the key W - j steps back.
    keys_seen = rotate(keys, np.arange(-window, 1)[:, None], rope)
    scores = jnp.einsum("bgrk,bsgk->bgrs", q_t * scale, keys_seen)
    o_t = _weighted_softmax_average(scores, weights[:, None, None], values, "bgrs,bsgv->bgrv")
    return {"keys": keys[:, 1:], "values": values[:, 1:], "valid": weights[:, 1:]}, o_t


def _split_heads(q, groups):
    return q.reshape(*q.shape[:-2], groups, q.shape[-2] // groups, q.shape[-1])


def step(state, q_t, k_t, v_t, *, scale=None, rope: Rope | None = None):
    """One token: ``(new_state, o_t)`` for q_t [B, H, K], k_t [B, G, K], v_t [B, G, V].

    ``o_t`` [B, H, V] is in q_t's dtype; the new state is float32 (float64 for float64 inputs).
    """
    who = "softmax.step"
    _check_qkv(who, q_t, k_t, v_t, time_axis=False)
    batch, heads, key_dim = q_t.shape
    groups, value_dim = v_t.shape[1], v_t.shape[2]
    _check_rope(who, rope, key_dim)
    _check_state(who, state, batch, groups, key_dim, value_dim)
    acc = _acc_dtype(q_t.dtype)
    state = jax.tree.map(lambda s: jnp.asarray(s, acc), state)
    new, o_t = _step(state, _split_heads(q_t.astype(acc), groups), k_t.astype(acc), v_t.astype(acc),
                     _scale(scale, key_dim), rope)
    return new, o_t.reshape(batch, heads, value_dim).astype(q_t.dtype)


# --------------------------------------------------------------------------------------------
# Whole sequences. Both modes run forwards; reverse=True flips time around them.


def _fresh_where(flag, fresh, state):
    return jax.tree.map(lambda f, s: jnp.where(flag.reshape((-1,) + (1,) * (s.ndim - 1)), f, s), fresh, state)


def _sequential(q, k, v, state, reset, scale, rope):
    fresh = jax.tree.map(jnp.zeros_like, state)
    flags = jnp.zeros(q.shape[:2], bool) if reset is None else reset

    def body(carry, inputs):
        q_t, k_t, v_t, flag = inputs
        return _step(_fresh_where(flag, fresh, carry), q_t, k_t, v_t, scale, rope)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    final, o = lax.scan(body, state, (time_major(q), time_major(k), time_major(v), time_major(flags)))
    return jnp.moveaxis(o, 0, 1), final


def _blocks(x, n, size):
    """x [B, n·size, ...] -> [B, n, size, ...]."""
    return x.reshape(x.shape[0], n, size, *x.shape[2:])


def _pad_time(x, pad, value=0):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _chunked(q, k, v, state, reset, scale, rope, chunk):
    """Block-local attention; q [B, T, G, R, K] etc. in the accumulation dtype."""
    batch, time = q.shape[:2]
    window = state["keys"].shape[1]
    chunk = min(chunk, time)
    n = -(-time // chunk)
    pad = n * chunk - time
    segment = (jnp.zeros((batch, time), jnp.int32) if reset is None
               else jnp.cumsum(reset, axis=1, dtype=jnp.int32))              # segment index of each t

    # The keys in time order, the state's first: key e of this extended sequence is at time e - W.
    # Padding keys get weight 1 and segment -1 (the padding queries' own), so that every query row,
    # real or padding, has a visible key; the band mask hides them from every real query.
    ext_keys = _pad_time(jnp.concatenate([state["keys"], k], axis=1), pad)
    ext_values = _pad_time(jnp.concatenate([state["values"], v], axis=1), pad)
    ext_weights = _pad_time(jnp.concatenate([state["valid"], jnp.ones((batch, time), q.dtype)], axis=1),
                            pad, 1)
    held_segment = jnp.concatenate([jnp.zeros((batch, window), jnp.int32), segment], axis=1)
    ext_segment = _pad_time(held_segment, pad, -1)

    # Block i's queries are times [iC, iC + C); its keys are extended positions [iC, iC + C + W).
    span = chunk + window
    gather = np.arange(n)[:, None] * chunk + np.arange(span)[None, :]            # [n, C + W]
    keys_seen = rotate(ext_keys[:, gather], (np.arange(span) - window)[:, None], rope)  # [B, n, C+W, G, K]
    queries = rotate(_blocks(_pad_time(q, pad), n, chunk), np.arange(chunk)[:, None, None], rope) * scale

    c, s = np.arange(chunk)[:, None], np.arange(span)[None, :]
    band = jnp.asarray((s >= c) & (s <= c + window))                              # key in [t - W, t]
    q_segment = _blocks(_pad_time(segment, pad, -1), n, chunk)                    # [B, n, C]
    same = q_segment[..., :, None] == ext_segment[:, gather][:, :, None, :]       # [B, n, C, C+W]
    weights = jnp.where(band & same, ext_weights[:, gather][:, :, None, :], 0)

    scores = jnp.einsum("bncgrk,bnsgk->bngrcs", queries, keys_seen)
    o = _weighted_softmax_average(scores, weights[:, :, None, None], ext_values[:, gather],
                                  "bngrcs,bnsgv->bncgrv")
    o = o.reshape(batch, n * chunk, *o.shape[3:])[:, :time]

    # The last W keys; those before the last segment start are dropped, as a fresh state would be.
    keep = held_segment[:, time:] == segment[:, -1:]
    tail = lambda x: jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x[:, time:time + window], 0)
    final = {"keys": tail(ext_keys), "values": tail(ext_values), "valid": tail(ext_weights)}
    return o, final


def _run(q, k, v, state, reset, reverse, scale, rope, mode, chunk):
    batch, _, heads, key_dim = q.shape
    acc = _acc_dtype(q.dtype)
    groups = k.shape[2]
    q5, k4, v4 = _split_heads(q.astype(acc), groups), k.astype(acc), v.astype(acc)
    if reverse:
        flip = lambda x: jnp.flip(x, axis=1)
        q5, k4, v4 = flip(q5), flip(k4), flip(v4)
        reset = reset_for_reverse(reset)
    if mode == "sequential":
        o, final = _sequential(q5, k4, v4, state, reset, _scale(scale, key_dim), rope)
    else:
        o, final = _chunked(q5, k4, v4, state, reset, _scale(scale, key_dim), rope, chunk)
    if reverse:
        o = jnp.flip(o, axis=1)
    return o.reshape(*o.shape[:2], heads, v.shape[-1]).astype(q.dtype), final


def apply(q, k, v, *, window: int | None = None, initial_state=None, reset=None, reverse: bool = False,
          mode: str = "auto", scale: float | None = None, rope: Rope | None = None,
          chunk_size: int | None = None):
    """Local causal attention over axis 1: ``(o [B, T, H, V], final_state)``.

    ``window`` W is needed when ``initial_state`` is None (the state then starts empty); with a state
    it is read from the state (and, if also given, must agree). See the module docstring.
    """
    who = "softmax.apply"
    if mode != "auto" and mode not in LOCAL_MODES:
        raise ValueError(f"{who}: mode={mode!r} is not supported; choose one of {('auto', *LOCAL_MODES)}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"{who}: chunk_size must be a positive int, got {chunk_size!r}")
        if mode == "sequential":
            raise ValueError(f"{who}: chunk_size={chunk_size} only applies to mode='chunked'")
    window, state, reset = _prepare(who, q, k, v, window, initial_state, reset, rope)
    mode = "chunked" if mode == "auto" else mode
    return _run(q, k, v, state, reset, bool(reverse), scale, rope, mode,
                int(chunk_size) if chunk_size is not None else window)


def reference(q, k, v, *, window: int | None = None, initial_state=None, reset=None, reverse: bool = False,
              scale: float | None = None, rope: Rope | None = None):
    """A Python loop of ``step``; a reset swaps the state for an empty one. The check for ``apply``."""
    window, state, reset = _prepare("softmax.reference", q, k, v, window, initial_state, reset, rope)
    time = q.shape[1]
    fresh = jax.tree.map(jnp.zeros_like, state)
    order = range(time - 1, -1, -1) if reverse else range(time)
    outputs = [None] * time
    for t in order:
        flag = reset_before(reset, t, time, reverse)
        if flag is not None:
            state = _fresh_where(flag, fresh, state)
        state, outputs[t] = step(state, q[:, t], k[:, t], v[:, t], scale=scale, rope=rope)
    return jnp.stack(outputs, axis=1), state
