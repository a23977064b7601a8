"""zoo.ops.softmax (local sliding-window attention): every mode against an independent dense form.

The reference here is not the engine's step loop: it is plain masked attention over the whole
extended sequence (the state's keys, then the sequence's), with the visibility of each key written
out from the definition (window, causality, segments, the state's weights) and RoPE applied at
absolute positions in the form recurrentgemma writes it. It runs in float64 (``jax.enable_x64``),
where every mode agrees to 1e-10: they differ only in the order of float operations and in the
frame of the rotary angles (relative offsets instead of absolute positions). Float32 holds to 1e-5
relative, bfloat16 inputs to 1e-2 (8 bits of mantissa in q, k and v; float32 softmax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import softmax

# Small shapes checked for values: compiled without XLA's optimisation passes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, G, R, K, V, W = 2, 11, 2, 2, 8, 5, 3
H = G * R
ROPE = softmax.Rope(dims=4)


def _random(seed, dtype=np.float64, time=T, window=W):
    rng = np.random.default_rng(seed)
    data = {
        "q": rng.normal(size=(B, time, H, K)),
        "k": rng.normal(size=(B, time, G, K)),
        "v": rng.normal(size=(B, time, G, V)),
        "state": {"keys": rng.normal(size=(B, window, G, K)), "values": rng.normal(size=(B, window, G, V)),
                  "valid": rng.uniform(0.2, 1.0, (B, window))},
        "reset": rng.random((B, time)) < 0.2,
        "w_o": rng.normal(size=(B, time, H, V)),
    }
    data["state"]["valid"][1, 0] = 0.0                                   # one empty slot
    data["reset"][0, 6] = True
    data["reset"][1, [0, time - 1]] = True
    cast = lambda x: x if x.dtype == bool else x.astype(dtype)
    return jax.tree.map(cast, data)


# --------------------------------------------------------------------------------------------
# The dense reference.


def _rope_absolute(x, positions, rope):
    """recurrentgemma's form: the first dims entries in two halves, rotated at absolute positions."""
    if rope is None:
        return x
    half = rope.dims // 2
    freq = 1.0 / rope.base ** (2.0 * np.arange(half) / rope.dims)
    angle = positions[:, None] * freq[None, :]                           # [P, half]
    cos = jnp.asarray(np.cos(angle))[:, None, :]
    sin = jnp.asarray(np.sin(angle))[:, None, :]
    a, b, rest = x[..., :half], x[..., half:rope.dims], x[..., rope.dims:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)


def _segment_starts(reset, reverse):
    """bool [B, T] in processing order: True where a segment starts (its carry is dropped)."""
    reset = np.zeros((B, T), bool) if reset is None else np.asarray(reset)
    if not reverse:
        return reset
    time = reset.shape[1]
    # Backwards, step t (processed as p = T-1-t) starts a segment when t + 1 did.
    return np.stack([[p > 0 and reset[b, time - p] for p in range(time)] for b in range(reset.shape[0])])


def dense_attention(q, k, v, initial_state, reset=None, reverse=False, scale=None, rope=None):
    """o [B, T, H, V] and the final state, by masked attention over [state keys; sequence keys]."""
    state = initial_state
    batch, time, heads, key_dim = q.shape
    window, groups = state["keys"].shape[1], k.shape[2]
    if reverse:
        q, k, v = (jnp.flip(x, axis=1) for x in (q, k, v))
    segment = np.cumsum(_segment_starts(reset, reverse), axis=1)         # processing order
    positions = np.arange(-window, time)                                 # extended key positions
    key_segment = np.concatenate([np.zeros((batch, window), int), segment], axis=1)
    visible = np.zeros((batch, time, window + time), bool)
    for b in range(batch):
        for p in range(time):
            for e, pos in enumerate(positions):
                visible[b, p, e] = p - window <= pos <= p and key_segment[b, e] == segment[b, p]
    keys = jnp.concatenate([state["keys"], k], axis=1)
    values = jnp.concatenate([state["values"], v], axis=1)
    held = jnp.concatenate([state["valid"], jnp.ones((batch, time), q.dtype)], axis=1)   # [B, W+T]
    # A slot of weight 0 is empty: invisible, so its weight gets no gradient either (the engine's
    # convention; the one-sided derivative there is unbounded in the slot's score).
    visible = jnp.asarray(visible) & (held[:, None, :] > 0)
    weights = jnp.where(visible, held[:, None, :], 0.0)                  # [B, T, W+T]

    scale = 1 / np.sqrt(key_dim) if scale is None else scale
    q_rot = _rope_absolute(q, np.arange(time, dtype=np.float64), rope)
    k_rot = _rope_absolute(keys, positions.astype(np.float64), rope)
    q_grouped = q_rot.reshape(batch, time, groups, heads // groups, key_dim)
    scores = jnp.einsum("btgrk,begk->btgre", q_grouped, k_rot) * scale
    scores = jnp.where(visible[:, :, None, None], scores, -np.inf)
    numer = weights[:, :, None, None] * jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    o = jnp.einsum("btgre,begv->btgrv", numer / numer.sum(-1, keepdims=True), values)
    o = o.reshape(batch, time, heads, -1)
    if reverse:
        o = jnp.flip(o, axis=1)

    keep = key_segment[:, time:] == segment[:, -1:]
    final = {"keys": jnp.where(keep[..., None, None], keys[:, time:], 0.0),
             "values": jnp.where(keep[..., None, None], values[:, time:], 0.0),
             "valid": jnp.where(keep, held[:, time:], 0.0)}
    return o, final


def _apply(mode, chunk_size=None):
    kwargs = {"chunk_size": chunk_size} if chunk_size is not None else {}
    return functools.partial(softmax.apply, mode=mode, **kwargs)


def _loss(fn, data, **kwargs):
    """A random linear read-out of o and of the final state, so that every output gets a cotangent."""
    def loss(q, k, v, state):
        o, final = fn(q, k, v, initial_state=state, **kwargs)
        return jnp.sum(o * data["w_o"]) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(final))

    return loss


def _values_and_grads(fn, data, **kwargs):
    args = (data["q"], data["k"], data["v"], data["state"])
    o, final = fn(*args[:3], initial_state=args[3], **kwargs)
    grads = jax.grad(_loss(fn, data, **kwargs), argnums=(0, 1, 2, 3))(*args)
    return o, final, grads


def _assert_tree_close(got, want, rtol, atol=0.0):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


# (mode, chunk_size, reset, reverse, rope): the default mode in every combination; the other chunk
# sizes (1, a non-divisor of T, more than T) and the sequential mode with resets in both directions.
_GRID = [(r, d, p) for r in (False, True) for d in (False, True) for p in (None, ROPE)]
CASES = ([("chunked", None, *g) for g in _GRID]
         + [("chunked", c, True, d, ROPE) for c in (1, 4, 64) for d in (False, True)]
         + [("sequential", None, True, d, ROPE) for d in (False, True)]
         + [("sequential", None, False, False, None)])


def _case_id(case):
    mode, chunk, with_reset, reverse, rope = case
    return "-".join([mode + ("" if chunk is None else str(chunk)), "reset" if with_reset else "no_reset",
                     "reverse" if reverse else "forward", "rope" if rope else "no_rope"])


# --------------------------------------------------------------------------------------------
# Every mode equals the dense form, in values and gradients.


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_mode_matches_dense_float64_attention_in_values_and_gradients(case):
    mode, chunk, with_reset, reverse, rope = case
    with jax.enable_x64(True):
        data = _random(0)
        kwargs = {"reverse": reverse, "reset": data["reset"] if with_reset else None, "rope": rope}
        want = _values_and_grads(dense_attention, data, **kwargs)
        got = _values_and_grads(_apply(mode, chunk), data, **kwargs)
        _assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_step_loop_reference_matches_dense_attention(reverse):
    with jax.enable_x64(True):
        data = _random(1)
        kwargs = {"reverse": reverse, "reset": data["reset"], "rope": ROPE, "scale": 0.7}
        want = _values_and_grads(dense_attention, data, **kwargs)
        got = _values_and_grads(softmax.reference, data, **kwargs)
        _assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", softmax.LOCAL_MODES)
def test_float32_modes_match_float64_within_1e_5(mode):
    data64 = _random(2)
    with jax.enable_x64(True):
        want = dense_attention(data64["q"], data64["k"], data64["v"], data64["state"], data64["reset"],
                               rope=ROPE)
    data = _random(2, np.float32)
    got = softmax.apply(data["q"], data["k"], data["v"], initial_state=data["state"], reset=data["reset"],
                        rope=ROPE, mode=mode)
    assert got[0].dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got[1]))
    _assert_tree_close(got, want, rtol=1e-5, atol=1e-5)


def test_window_longer_than_the_sequence_and_empty_start():
    with jax.enable_x64(True):
        data = _random(3, window=15)
        state = softmax.initial_state(B, 15, G, K, V, jnp.float64)
        for mode in softmax.LOCAL_MODES:
            got = softmax.apply(data["q"], data["k"], data["v"], window=15, reset=data["reset"], mode=mode)
            want = dense_attention(data["q"], data["k"], data["v"], state, data["reset"])
            _assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Recurrence properties.


@pytest.mark.parametrize("mode", softmax.LOCAL_MODES)
def test_two_pieces_carrying_the_state_equal_the_whole(mode):
    with jax.enable_x64(True):
        data = _random(4)
        args = (data["q"], data["k"], data["v"])
        whole = softmax.apply(*args, initial_state=data["state"], rope=ROPE, mode=mode)
        o1, mid = softmax.apply(*(x[:, :4] for x in args), initial_state=data["state"], rope=ROPE, mode=mode)
        o2, final = softmax.apply(*(x[:, 4:] for x in args), initial_state=mid, rope=ROPE, mode=mode)
        _assert_tree_close((jnp.concatenate([o1, o2], axis=1), final), whole, rtol=1e-10, atol=1e-12)


def test_step_equals_one_token_of_apply():
    data = _random(5, np.float32)
    state, o_t = softmax.step(data["state"], data["q"][:, 0], data["k"][:, 0], data["v"][:, 0], rope=ROPE)
    first = (data["q"][:, :1], data["k"][:, :1], data["v"][:, :1])
    o, final = softmax.apply(*first, initial_state=data["state"], rope=ROPE)
    _assert_tree_close((o_t, state), (o[:, 0], final), rtol=1e-6, atol=1e-6)


def test_empty_slots_are_invisible_whatever_they_hold():
    data = _random(6, np.float32)
    empty = softmax.initial_state(B, W, G, K, V)
    junk = {"keys": 1e4 * jnp.ones_like(empty["keys"]), "values": 1e4 * jnp.ones_like(empty["values"]),
            "valid": empty["valid"]}
    args = (data["q"], data["k"], data["v"])
    o_junk, _ = softmax.apply(*args, initial_state=junk, rope=ROPE)
    o_empty, _ = softmax.apply(*args, initial_state=empty, rope=ROPE)
    np.testing.assert_allclose(o_junk, o_empty, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", softmax.LOCAL_MODES)
def test_large_scores_stay_finite_in_values_and_gradients(mode):
    data = _random(7, np.float32)
    q = 300.0 * data["q"]
    o, _ = softmax.apply(q, data["k"], data["v"], initial_state=data["state"], reset=data["reset"], mode=mode)
    grads = jax.grad(lambda q: jnp.sum(softmax.apply(q, data["k"], data["v"], initial_state=data["state"],
                                                     mode=mode)[0] ** 2))(q)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(grads))
    # The largest visible score dominates: the output is close to one of the visible values.
    assert np.all(np.abs(o) <= np.max(np.abs(data["v"])) + np.max(np.abs(data["state"]["values"])))


@pytest.mark.parametrize("mode", softmax.LOCAL_MODES)
def test_bfloat16_inputs_are_within_a_percent_with_float32_state(mode):
    data = _random(8, np.float32)
    args = (data["q"], data["k"], data["v"])
    o, final = softmax.apply(*args, initial_state=data["state"], reset=data["reset"], rope=ROPE, mode=mode)
    o16, final16 = softmax.apply(*(x.astype(jnp.bfloat16) for x in args), initial_state=data["state"],
                                 reset=data["reset"], rope=ROPE, mode=mode)
    assert o16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final16))
    _assert_tree_close(o16, o, rtol=1e-2, atol=1e-2 * float(np.max(np.abs(o))))
    _assert_tree_close(final16, final, rtol=1e-2, atol=1e-2 * 4)


def test_jit_and_vmap_agree_with_eager():
    data = _random(9, np.float32)
    args = (data["q"], data["k"], data["v"])
    eager = softmax.apply(*args, initial_state=data["state"], reset=data["reset"], rope=ROPE)
    jitted = jax.jit(functools.partial(softmax.apply, rope=ROPE))(*args, initial_state=data["state"],
                                                                  reset=data["reset"])
    _assert_tree_close(jitted, eager, rtol=1e-6, atol=1e-6)
    rows = jax.vmap(lambda q, k, v, s, r: softmax.apply(q[None], k[None], v[None], initial_state=jax.tree.map(
        lambda x: x[None], s), reset=r[None], rope=ROPE))(*args, data["state"], data["reset"])
    _assert_tree_close(jax.tree.map(lambda x: x[:, 0], rows), eager, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors name the argument and the shapes.


def test_malformed_inputs_raise_errors_naming_the_argument():
    data = _random(10, np.float32)
    q, k, v, state = data["q"], data["k"], data["v"], data["state"]
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, K\].*\(2, 11, 4\)"):
        softmax.apply(q[..., 0], k, v, window=W)
    with pytest.raises(ValueError, match=r"k has shape \(2, 11, 2, 7\) but q has"):
        softmax.apply(q, k[..., :7], v, window=W)
    with pytest.raises(ValueError, match=r"3 key/value heads"):
        softmax.apply(q, jnp.concatenate([k, k[:, :, :1]], 2), jnp.concatenate([v, v[:, :, :1]], 2), window=W)
    with pytest.raises(ValueError, match="q has dtype int32"):
        softmax.apply(q.astype(jnp.int32), k, v, window=W)
    with pytest.raises(ValueError, match="window must be a positive int"):
        softmax.apply(q, k, v)
    with pytest.raises(ValueError, match=r"window=5 but initial_state holds W = 3"):
        softmax.apply(q, k, v, window=5, initial_state=state)
    with pytest.raises(ValueError, match=r"state\['values'\] must have shape \(2, 3, 2, 5\)"):
        softmax.apply(q, k, v, initial_state={**state, "values": state["values"][..., :4]})
    with pytest.raises(ValueError, match=r"reset must have shape \[B, T\] = \(2, 11\)"):
        softmax.apply(q, k, v, window=W, reset=data["reset"][:, :5])
    with pytest.raises(ValueError, match="mode"):
        softmax.apply(q, k, v, window=W, mode="associative")
    with pytest.raises(ValueError, match="chunk_size"):
        softmax.apply(q, k, v, window=W, chunk_size=0)
    with pytest.raises(ValueError, match="rope"):
        softmax.apply(q, k, v, window=W, rope=softmax.Rope(dims=10))
    with pytest.raises(ValueError, match="dims must be a positive even int"):
        softmax.Rope(dims=3)
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, K\]"):
        softmax.step(state, q, k[:, 0], v[:, 0])
