"""Softmax attention as a many-to-many RNN: a running max, denominator and numerator per head.

Paper: L. Feng, F. Tung, H. Hajimirsadeghi, M. O. Ahmed, Y. Bengio, G. Mori, "Attention as an RNN"
(arXiv 2405.13956, 2024), Sections 3.1-3.2 (PAPERS.md §1.8). Given scores ``s_t`` (a query against
key t, already scaled by the caller) and values ``v_t``, output t is softmax attention over the tokens
of its segment up to t::

    o_t = Σ_{i ≤ t} e^{s_i} v_i / Σ_{i ≤ t} e^{s_i}

computed with the state ``(m, u, w)`` of the paper, m the running max of the scores, u = Σ e^{s_i − m}
the denominator, w = Σ e^{s_i − m} v_i the numerator, and o_t = w_t / u_t. Two summaries combine by the
associative operator (the same online softmax that flash attention uses)::

    (m_A, u_A, w_A) ⊕ (m_B, u_B, w_B) = (m, u_A e^{m_A−m} + u_B e^{m_B−m}, w_A e^{m_A−m} + w_B e^{m_B−m}),
    m = max(m_A, m_B)

so the outputs are a prefix scan over the tokens' summaries (s_t, 1, v_t), and one step is
``state ⊕ (s_t, 1, v_t)``. Every exponent is ≤ 0, so large scores cannot overflow.

The scores are an input, not q and k: Aaren's query is a learned constant, and the engine then needs
only the per-token scalars (any query/key/scale/positional scheme is the caller's). Shapes::

    s [B, T, H]      v [B, T, H, V]      reset [B, T] bool      o [B, T, H, V] in result_type(s, v)
    state = {"max": [B, H], "denominator": [B, H], "numerator": [B, H, V]}     float32

Public API::

    o, final_state = apply(s, v, *, initial_state=None, reset=None, reverse=False, mode="auto",
                           window=None)
    state, o_t     = step(state, s_t, v_t)                  # s_t [B, H], v_t [B, H, V]
    o, final_state = reference(s, v, *, initial_state=None, reset=None, reverse=False, window=None)
    state          = initial_state(batch, heads, value_dim, *, window=None)

Modes of ``apply`` (equal to ``reference`` in values and gradients):

* ``"associative"`` (also ``"auto"``): ``lax.associative_scan`` of ⊕ over time, O(log T) depth;
  with ``reset`` a segmented scan (a flag carried with each summary stops the combine from the left).
* ``"sequential"``: ``lax.scan`` of ``step``.

The empty state has ``m = FRESH_MAX`` (−1e30, finite: the harnesses perturb and difference states,
and ``−inf − (−inf)`` would be NaN) and u = w = 0. Each token's summary is ``empty ⊕ (s_t, 1, v_t)``,
so a score of ``−inf`` masks its token out (u = 0 for it) and an output that sees no unmasked token
is 0 (the division is guarded). A user state with ``m = −inf`` and u = w = 0 is also accepted: no
exponent then takes ``−inf − (−inf)``, because every token's summary has a finite max.

``window=W`` gives local causal attention: output t attends to its own token and the W tokens before
it, inside its segment (the convention of ``zoo.ops.softmax``: the state holds W tokens). That is
exactly ``zoo.ops.softmax`` with one key dimension holding the score and a query of 1 (q·k = s_t,
scale 1), so this file calls it rather than repeating it; the state is then its sliding buffer::

    state = {"scores": [B, W, H], "values": [B, W, H, V], "valid": [B, W]}      float32, oldest first

and the modes are its ``"chunked"`` (also ``"auto"``) and ``"sequential"``.

``reset[b, t] = True`` drops the state before step t (a segment starts at t); ``reverse=True`` runs
time backwards with the same meaning of ``reset`` (``zoo/ops/_time.py``). Arithmetic runs in float32
(float64 for float64 inputs). Differentiation is reverse-mode autodiff through these jnp operations;
the gradient reaching m is exact, as the state's m is the max of the segment's scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops import softmax
from zoo.ops._checks import check_float, check_positive_int, shape_of
from zoo.ops._checks import check_mode as resolve_mode
from zoo.ops._time import check_reset, reset_before, reset_for_reverse

MODES = ("associative", "sequential")
WINDOW_MODES = softmax.LOCAL_MODES
FRESH_MAX = -1e30
FULL_KEYS = ("max", "denominator", "numerator")
WINDOW_KEYS = ("scores", "values", "valid")


# --------------------------------------------------------------------------------------------
# The algebra: summaries (m, u, w) with m, u [..., H] and w [..., H, V].


def combine(a, b):
    """``a ⊕ b`` for summaries (m, u, w) of consecutive stretches, a before b (batched elementwise)."""
    m_a, u_a, w_a = a
    m_b, u_b, w_b = b
    m = jnp.maximum(m_a, m_b)
    scale_a, scale_b = jnp.exp(m_a - m), jnp.exp(m_b - m)                  # both <= 1
    return m, u_a * scale_a + u_b * scale_b, w_a * scale_a[..., None] + w_b * scale_b[..., None]


def _token(s, v):
    """``empty ⊕ (s, 1, v)``: one token's summary; a score of −inf (masked) gives u = w = 0."""
    m = jnp.maximum(s, FRESH_MAX)
    u = jnp.exp(s - m)
    return m, u, u[..., None] * v


def _read(summary):
    """o = w / u, and 0 where no unmasked token has been seen (u = 0)."""
    _, u, w = summary
    return w / jnp.where(u > 0, u, 1)[..., None]


def _as_summary(state):
    return state["max"], state["denominator"], state["numerator"]


def _as_state(summary):
    return dict(zip(FULL_KEYS, summary, strict=True))


# --------------------------------------------------------------------------------------------
# States, and validation.


def initial_state(batch: int, heads: int, value_dim: int, *, window: int | None = None, dtype=jnp.float32):
    """The empty state: m = FRESH_MAX, u = w = 0; with ``window`` an empty buffer of W slots."""
    if window is not None:
        window = check_positive_int("softmax_scan.initial_state", "window", window)
    return _empty(batch, heads, value_dim, window, dtype)


def _empty(batch, heads, value_dim, window, dtype):
    if window is not None:
        return {"scores": jnp.zeros((batch, window, heads), dtype),
                "values": jnp.zeros((batch, window, heads, value_dim), dtype),
                "valid": jnp.zeros((batch, window), dtype)}
    return {"max": jnp.full((batch, heads), FRESH_MAX, dtype),
            "denominator": jnp.zeros((batch, heads), dtype),
            "numerator": jnp.zeros((batch, heads, value_dim), dtype)}


def _acc_dtype(*xs):
    return jnp.promote_types(jnp.float32, jnp.result_type(*(x.dtype for x in xs)))


def _check_inputs(who, s, v, time_axis: bool):
    t = "T, " if time_axis else ""
    names = ("s", "v") if time_axis else ("s_t", "v_t")
    rank = 3 if time_axis else 2
    check_float(who, names[0], s, rank=rank, letters=f"[B, {t}H]")
    check_float(who, names[1], v, rank=rank + 1, letters=f"[B, {t}H, V]")
    if shape_of(v)[:-1] != shape_of(s):
        raise ValueError(f"{who}: {names[1]} has shape {shape_of(v)} but {names[0]} has {shape_of(s)}; "
                         f"{names[1]} must be {names[0]}'s shape plus a value axis V")
    if time_axis and shape_of(s)[1] == 0:
        raise ValueError(f"{who}: s has shape {shape_of(s)} with T = 0 steps; at least one step is needed")


def _state_kind(who, state):
    """"full" or "window", by the state's keys; anything else is a ValueError."""
    if isinstance(state, dict) and set(state) == set(FULL_KEYS):
        return "full"
    if isinstance(state, dict) and set(state) == set(WINDOW_KEYS):
        return "window"
    got = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{who}: the state must be a dict with keys {FULL_KEYS} (full attention) or "
                     f"{WINDOW_KEYS} (window), got {got}")


def _check_state(who, state, batch, heads, value_dim) -> int | None:
    """Checks a state's leaves against the inputs; returns its window W (None for a full state)."""
    if _state_kind(who, state) == "full":
        window = None
        want = {"max": (batch, heads), "denominator": (batch, heads), "numerator": (batch, heads, value_dim)}
    else:
        window = shape_of(state["scores"])[1] if np.ndim(state["scores"]) == 3 else 0
        want = {"scores": (batch, window, heads), "values": (batch, window, heads, value_dim),
                "valid": (batch, window)}
    for name, shape in want.items():
        check_float(who, f"state[{name!r}]", state[name])
        if shape_of(state[name]) != shape or window == 0:
            raise ValueError(f"{who}: state[{name!r}] must have shape {shape} for s and v of these shapes"
                             f"{' (W >= 1)' if window is not None else ''}, got {shape_of(state[name])}")
    return window


def _prepare(who, s, v, state, window, reset):
    """Checks; returns (state in the accumulation dtype, window or None, reset as bool or None)."""
    _check_inputs(who, s, v, time_axis=True)
    batch, time, heads = shape_of(s)
    value_dim = shape_of(v)[-1]
    if window is not None:
        window = check_positive_int(who, "window", window)
    acc = _acc_dtype(s, v)
    if state is None:
        state = _empty(batch, heads, value_dim, window, acc)
    else:
        held = _check_state(who, state, batch, heads, value_dim)
        if window is not None and held != window:
            kind = "a full-attention state" if held is None else f"a window of W = {held}"
            raise ValueError(f"{who}: window={window} but initial_state is {kind} "
                             f"(leaves {jax.tree.map(np.shape, state)})")
        window = held
        state = jax.tree.map(lambda x: jnp.asarray(x, acc), state)
    return state, window, check_reset(who, reset, batch, time)


# --------------------------------------------------------------------------------------------
# The window case: zoo.ops.softmax with the score as a one-dimensional key and a query of 1.


def _to_local(state):
    return {"keys": state["scores"][..., None], "values": state["values"], "valid": state["valid"]}


def _from_local(state):
    return {"scores": state["keys"][..., 0], "values": state["values"], "valid": state["valid"]}


def _unit_query(s, dtype):
    return jnp.ones(s.shape + (1,), dtype)


def _window_apply(s, v, state, reset, reverse, mode):
    out = jnp.result_type(s, v)
    o, final = softmax.apply(_unit_query(s, out), s[..., None], v, initial_state=_to_local(state),
                             reset=reset, reverse=reverse, mode=mode, scale=1.0)
    return o, _from_local(final)


# --------------------------------------------------------------------------------------------
# One step.


def step(state, s_t, v_t):
    """One token: ``(new_state, o_t)`` for s_t [B, H], v_t [B, H, V]; o_t [B, H, V] in
    result_type(s_t, v_t), the state float32 (float64 for float64 inputs)."""
    who = "softmax_scan.step"
    _check_inputs(who, s_t, v_t, time_axis=False)
    batch, heads = shape_of(s_t)
    window = _check_state(who, state, batch, heads, shape_of(v_t)[-1])
    acc, out = _acc_dtype(s_t, v_t), jnp.result_type(s_t, v_t)
    state = jax.tree.map(lambda x: jnp.asarray(x, acc), state)
    if window is not None:
        new, o_t = softmax.step(_to_local(state), _unit_query(s_t, out), s_t[..., None], v_t, scale=1.0)
        return _from_local(new), o_t
    summary = combine(_as_summary(state), _token(s_t.astype(acc), v_t.astype(acc)))
    return _as_state(summary), _read(summary).astype(out)


# --------------------------------------------------------------------------------------------
# Whole sequences (full attention). Both modes run forwards; reverse=True flips time around them.


def _rows(flag, x):
    """flag [B] or [B, T] broadcast against x [B, (T,) H, ...]."""
    return flag.reshape(flag.shape + (1,) * (x.ndim - flag.ndim))


def _where(flag, a, b):
    return tuple(jnp.where(_rows(flag, x), x, y) for x, y in zip(a, b, strict=True))


def _segmented(a, b):
    """⊕ on (flag, m, u, w) where a set flag on b (a segment starts in b) drops a."""
    flag_a, *summary_a = a
    flag_b, *summary_b = b
    joined = combine(summary_a, summary_b)
    return (flag_a | flag_b, *_where(flag_b, summary_b, joined))


def _associative(s, v, state, reset):
    tokens = _token(s, v)                                                    # each [B, T, H, ...]
    # The entering state joins the first token's summary, unless a segment starts there.
    first = combine(_as_summary(state), tuple(x[:, 0] for x in tokens))
    if reset is not None:
        first = _where(reset[:, 0], tuple(x[:, 0] for x in tokens), first)
    tokens = tuple(x.at[:, 0].set(f) for x, f in zip(tokens, first, strict=True))
    if reset is None:
        prefix = lax.associative_scan(combine, tokens, axis=1)
    else:
        prefix = lax.associative_scan(_segmented, (reset, *tokens), axis=1)[1:]
    return _read(prefix), _as_state(tuple(x[:, -1] for x in prefix))


def _sequential(s, v, state, reset):
    fresh = _as_summary(_empty(s.shape[0], s.shape[2], v.shape[-1], None, s.dtype))
    flags = jnp.zeros(s.shape[:2], bool) if reset is None else reset

    def body(carry, inputs):
        s_t, v_t, flag = inputs
        carry = combine(_where(flag, fresh, carry), _token(s_t, v_t))
        return carry, _read(carry)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    final, o = lax.scan(body, _as_summary(state), (time_major(s), time_major(v), time_major(flags)))
    return jnp.moveaxis(o, 0, 1), _as_state(final)


def _full_apply(s, v, state, reset, reverse, mode):
    acc, out = _acc_dtype(s, v), jnp.result_type(s, v)
    s, v = s.astype(acc), v.astype(acc)
    if reverse:
        s, v = jnp.flip(s, axis=1), jnp.flip(v, axis=1)
        reset = reset_for_reverse(reset)
    o, final = (_sequential if mode == "sequential" else _associative)(s, v, state, reset)
    if reverse:
        o = jnp.flip(o, axis=1)
    return o.astype(out), final


def apply(s, v, *, initial_state=None, reset=None, reverse: bool = False, mode: str = "auto",
          window: int | None = None):
    """Causal softmax attention with scores s [B, T, H] over values v [B, T, H, V]:
    ``(o [B, T, H, V], final_state)``. See the module docstring for modes, window and reset."""
    who = "softmax_scan.apply"
    state, window, reset = _prepare(who, s, v, initial_state, window, reset)
    if window is None:
        return _full_apply(s, v, state, reset, bool(reverse), resolve_mode(who, mode, MODES, "associative"))
    if mode == "associative":
        raise ValueError(f"{who}: mode='associative' is full attention; with window={window} choose one "
                         f"of {('auto', *WINDOW_MODES)}")
    return _window_apply(s, v, state, reset, bool(reverse), resolve_mode(who, mode, WINDOW_MODES, "chunked"))


def reference(s, v, *, initial_state=None, reset=None, reverse: bool = False, window: int | None = None):
    """A Python loop of ``step``; a reset swaps the state for an empty one. The check for ``apply``."""
    state, window, reset = _prepare("softmax_scan.reference", s, v, initial_state, window, reset)
    batch, time, heads = s.shape
    fresh = _empty(batch, heads, v.shape[-1], window, _acc_dtype(s, v))
    order = range(time - 1, -1, -1) if reverse else range(time)
    outputs = [None] * time
    for t in order:
        flag = reset_before(reset, t, time, reverse)
        if flag is not None:
            state = {k: jnp.where(_rows(flag, x), fresh[k], x) for k, x in state.items()}
        state, outputs[t] = step(state, s[:, t], v[:, t])
    return jnp.stack(outputs, axis=1), state
