"""zoo.ops.softmax_scan (attention as a many-to-many RNN): every mode against naive softmax attention.

The reference here is not the engine's algebra: it is masked softmax attention written out from the
definition, with the set of tokens each output sees (causality, segments, window) built in numpy,
and the entering state as one more attended entry (score m, weight u, weighted value w; for a window
state, the held slots with their weights). It takes the max over what is visible, exponentiates and
divides, in float64 (``jax.enable_x64``), where the modes agree with it to 1e-10 in values and
gradients. Float32 holds to 1e-5 relative. A long sequence with scores far beyond float32's exp
range is checked against a float64 numpy loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import softmax_scan

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, H, V, W = 2, 11, 3, 4, 3

# Jitted for the tests that call apply directly: one compile costs less than running the associative
# scan's many small ops eagerly, each compiled on its own.
jitted_apply = jax.jit(softmax_scan.apply, static_argnames=("reverse", "mode", "window"))


def _random(seed, dtype=np.float64, window=None):
    rng = np.random.default_rng(seed)
    if window is None:
        state = {"max": rng.normal(size=(B, H)), "denominator": rng.uniform(0.5, 2.0, (B, H)),
                 "numerator": rng.normal(size=(B, H, V))}
    else:
        state = {"scores": rng.normal(size=(B, window, H)), "values": rng.normal(size=(B, window, H, V)),
                 "valid": rng.uniform(0.2, 1.0, (B, window))}
        state["valid"][1, 0] = 0.0                                       # one empty slot
    data = {"s": 2 * rng.normal(size=(B, T, H)), "v": rng.normal(size=(B, T, H, V)), "state": state,
            "reset": rng.random((B, T)) < 0.2, "w_o": rng.normal(size=(B, T, H, V))}
    data["reset"][0, 6] = True
    data["reset"][1, [0, T - 1]] = True
    cast = lambda x: x if x.dtype == bool else x.astype(dtype)
    return jax.tree.map(cast, data)


# --------------------------------------------------------------------------------------------
# The naive reference.


def _segment_starts(reset, reverse, time):
    """bool [B, T] in processing order: True where a segment starts (the carry is dropped)."""
    reset = np.zeros((B, time), bool) if reset is None else np.asarray(reset)
    if not reverse:
        return reset
    # Backwards, step t (processed as p = T-1-t) starts a segment when t + 1 did.
    return np.stack([[p > 0 and reset[b, time - p] for p in range(time)] for b in range(B)])


def naive_attention(s, v, initial_state, reset=None, reverse=False, window=None):
    """o [B, T, H, V] and the final state by masked softmax attention over [state entries; tokens]."""
    time = s.shape[1]
    if reverse:
        s, v = jnp.flip(s, axis=1), jnp.flip(v, axis=1)
    segment = np.cumsum(_segment_starts(reset, reverse, time), axis=1)            # processing order
    held = 1 if window is None else window
    positions = np.arange(-held, time)                       # entry e sits at position e - held
    entry_segment = np.concatenate([np.zeros((B, held), int), segment], axis=1)
    visible = np.zeros((B, time, held + time), bool)
    for b in range(B):
        for p in range(time):
            for e, pos in enumerate(positions):
                in_window = window is None or pos >= p - window
                visible[b, p, e] = pos <= p and in_window and entry_segment[b, e] == segment[b, p]
    ones = jnp.ones(s.shape, s.dtype)
    if window is None:
        st = initial_state
        scores = jnp.concatenate([st["max"][:, None], s], axis=1)                    # [B, E, H]
        weights = jnp.concatenate([st["denominator"][:, None], ones], axis=1)
        weighted_values = jnp.concatenate([st["numerator"][:, None], v], axis=1)     # weight · value
    else:
        st = initial_state
        valid = jnp.broadcast_to(st["valid"][..., None], st["scores"].shape)
        scores = jnp.concatenate([st["scores"], s], axis=1)
        weights = jnp.concatenate([valid, ones], axis=1)
        weighted_values = jnp.concatenate([valid[..., None] * st["values"], v], axis=1)
        # A slot of weight 0 is empty: not attended, and out of the max (zoo.ops.softmax's rule).
        visible = jnp.asarray(visible) & (weights[..., 0] > 0)[:, None, :]
    seen = jnp.asarray(visible)[..., None]                                          # [B, T, E, 1]
    masked = jnp.where(seen, scores[:, None], -jnp.inf)                             # [B, T, E, H]
    top = jnp.max(masked, axis=2)                                                   # [B, T, H]
    e = jnp.where(seen, jnp.exp(masked - top[:, :, None]), 0.0)
    denominator = jnp.sum(e * weights[:, None], axis=2)
    numerator = jnp.einsum("bteh,behv->bthv", e, weighted_values)
    o = numerator / denominator[..., None]
    if window is None:
        final = {"max": top[:, -1], "denominator": denominator[:, -1], "numerator": numerator[:, -1]}
    else:
        keep = jnp.asarray(entry_segment[:, time:] == segment[:, -1:])             # [B, W]
        slots = lambda x: jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x[:, time:], 0.0)
        values = jnp.concatenate([st["values"], v], axis=1)
        final = {"scores": slots(scores), "values": slots(values), "valid": slots(weights[..., 0])}
    return (jnp.flip(o, axis=1) if reverse else o), final


# --------------------------------------------------------------------------------------------
# Helpers.


def _loss(fn, data, **kwargs):
    """A random linear read-out of o and a nonlinear one of the final state: every output counts."""
    def loss(s, v, state):
        o, final = fn(s, v, initial_state=state, **kwargs)
        return jnp.sum(o * data["w_o"]) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(final))

    return loss


def _values_and_grads(fn, data, **kwargs):
    """(o, final state, grads wrt s, v and the state), in one jitted program (compiling it once costs
    less than dispatching every small op eagerly)."""
    def run(s, v, state):
        o, final = fn(s, v, initial_state=state, **kwargs)
        return o, final, jax.grad(_loss(fn, data, **kwargs), argnums=(0, 1, 2))(s, v, state)

    return jax.jit(run)(data["s"], data["v"], data["state"])


def _assert_tree_close(got, want, rtol, atol=0.0):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Every mode equals naive attention, values and gradients, with state, resets, reverse.


FULL_CASES = [(m, r, d) for m in softmax_scan.MODES for r in (False, True) for d in (False, True)]


@pytest.mark.parametrize("mode,with_reset,reverse", FULL_CASES,
                         ids=[f"{m}-{'reset' if r else 'no_reset'}-{'reverse' if d else 'forward'}"
                              for m, r, d in FULL_CASES])
def test_full_attention_modes_match_naive_float64_in_values_and_gradients(mode, with_reset, reverse):
    with jax.enable_x64(True):
        data = _random(0)
        kwargs = {"reverse": reverse, "reset": data["reset"] if with_reset else None}
        want = _values_and_grads(naive_attention, data, **kwargs)
        got = _values_and_grads(functools.partial(softmax_scan.apply, mode=mode), data, **kwargs)
        _assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


WINDOW_CASES = [(m, d) for m in softmax_scan.WINDOW_MODES for d in (False, True)]


@pytest.mark.parametrize("mode,reverse", WINDOW_CASES,
                         ids=[f"{m}-{'reverse' if d else 'forward'}" for m, d in WINDOW_CASES])
def test_window_modes_match_naive_local_attention_in_values_and_gradients(mode, reverse):
    with jax.enable_x64(True):
        data = _random(1, window=W)
        kwargs = {"reverse": reverse, "reset": data["reset"], "window": W}
        want = _values_and_grads(naive_attention, data, **kwargs)
        got = _values_and_grads(functools.partial(softmax_scan.apply, mode=mode), data, **kwargs)
        _assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [None, W], ids=["full", "window"])
def test_step_loop_reference_matches_naive_attention(window):
    with jax.enable_x64(True):
        data = _random(2, window=window)
        kwargs = {"reverse": True, "reset": data["reset"], "window": window}
        want = _values_and_grads(naive_attention, data, **kwargs)
        got = _values_and_grads(softmax_scan.reference, data, **kwargs)
        _assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", softmax_scan.MODES)
def test_float32_modes_match_float64_within_1e_5(mode):
    data64 = _random(3)
    with jax.enable_x64(True):
        want = naive_attention(data64["s"], data64["v"], data64["state"], data64["reset"])
    data = _random(3, np.float32)
    got = jitted_apply(data["s"], data["v"], initial_state=data["state"], reset=data["reset"], mode=mode)
    assert got[0].dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got[1]))
    _assert_tree_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The state: empty, carried across pieces, -inf-safe.


@pytest.mark.parametrize("mode", softmax_scan.MODES)
def test_empty_state_is_plain_causal_attention_and_minus_inf_max_is_safe(mode):
    """No state equals the explicit empty state (m = FRESH_MAX) and a state with m = -inf; values and
    gradients are finite, match the naive form without any state entry, and the state's gradient is
    0 (nothing was attended in it)."""
    with jax.enable_x64(True):
        data = _random(4)
        s, v = data["s"], data["v"]
        nothing = {"max": jnp.full((B, H), -jnp.inf), "denominator": jnp.zeros((B, H)),
                   "numerator": jnp.zeros((B, H, V))}
        want_o = naive_attention(s, v, nothing)[0]           # the state entry is never the max: weight 0
        for state in (None, softmax_scan.initial_state(B, H, V, dtype=jnp.float64), nothing):
            o, final = jitted_apply(s, v, initial_state=state, mode=mode)
            _assert_tree_close(o, want_o, rtol=1e-12, atol=1e-12)
            if state is None:
                continue
            loss = _loss(functools.partial(softmax_scan.apply, mode=mode), data)
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(s, v, state)
            assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
            assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[2]))
    fresh = softmax_scan.initial_state(B, H, V)
    assert fresh["max"].dtype == jnp.float32 and np.all(np.isfinite(np.asarray(fresh["max"])))


@pytest.mark.parametrize("window", [None, W], ids=["full", "window"])
def test_apply_in_two_pieces_carrying_the_state_equals_apply_whole(window):
    data = _random(5, np.float32, window=window)
    mode = "auto"
    whole = jitted_apply(data["s"], data["v"], initial_state=data["state"], window=window, mode=mode)
    o_a, mid = jitted_apply(data["s"][:, :4], data["v"][:, :4], initial_state=data["state"], mode=mode)
    o_b, final = jitted_apply(data["s"][:, 4:], data["v"][:, 4:], initial_state=mid, mode=mode)
    _assert_tree_close((jnp.concatenate([o_a, o_b], axis=1), final), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", softmax_scan.MODES)
def test_minus_inf_scores_mask_tokens_out(mode):
    """A score of -inf drops its token; a prefix of only masked tokens gives 0 (not NaN)."""
    with jax.enable_x64(True):
        data = _random(6)
        mask = np.random.default_rng(6).random((B, T, H)) < 0.3
        mask[0, :3, 0] = True                                                 # nothing visible yet
        s = jnp.where(mask, -jnp.inf, data["s"])
        o = jitted_apply(s, data["v"], mode=mode)[0]
        loss = lambda s_: jnp.sum(softmax_scan.apply(s_, data["v"], mode=mode)[0] * data["w_o"])
        grads = jax.jit(jax.grad(loss))(s)
    o = np.asarray(o)
    np.testing.assert_array_equal(o[0, :3, 0], 0.0)
    assert np.all(np.isfinite(np.asarray(grads)))
    # Each output is attention over its own unmasked prefix (float64 numpy, from the definition).
    sn, vn = np.asarray(data["s"]), np.asarray(data["v"])
    for b in range(B):
        for t in range(T):
            for h in range(H):
                keep = ~mask[b, :t + 1, h]
                if keep.any():
                    e = np.exp(sn[b, :t + 1, h][keep] - sn[b, :t + 1, h][keep].max())
                    np.testing.assert_allclose(o[b, t, h], e @ vn[b, :t + 1, h][keep] / e.sum(), rtol=1e-12)


def test_long_sequence_with_scores_beyond_float32_exp_range():
    """T = 4096 with scores ~ 300 N(0, 1): e^s overflows float32 (e^89 > 3.4e38), the scan does not.
    Checked against a float64 running softmax in numpy, both modes, within 1e-5."""
    rng = np.random.default_rng(7)
    time = 4096
    s = (300 * rng.normal(size=(1, time, 2))).astype(np.float32)
    s[0, 2000:2100] += 1e4                                        # a far larger burst, later
    v = rng.normal(size=(1, time, 2, 3)).astype(np.float32)
    assert s.max() > np.log(np.finfo(np.float32).max)             # e^s would overflow float32
    m = np.maximum.accumulate(s.astype(np.float64), axis=1)
    want = np.empty(v.shape)
    u, w, m_prev = np.zeros((1, 2)), np.zeros((1, 2, 3)), np.full((1, 2), -np.inf)
    for t in range(time):
        decay = np.exp(m_prev - m[:, t])
        e = np.exp(s[:, t] - m[:, t])
        u, w, m_prev = u * decay + e, w * decay[..., None] + e[..., None] * v[:, t], m[:, t]
        want[:, t] = w / u[..., None]
    for mode in softmax_scan.MODES:
        o, final = jitted_apply(s, v, mode=mode)
        assert np.all(np.isfinite(np.asarray(o)))
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(np.asarray(final["max"]), m[:, -1], rtol=1e-7)
        np.testing.assert_allclose(np.asarray(final["denominator"]), u, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# step, dtypes.


@pytest.mark.parametrize("window", [None, W], ids=["full", "window"])
def test_step_is_apply_on_one_token_and_keeps_float32_state_in_bfloat16(window):
    data = _random(8, np.float32, window=window)
    state, o_t = jax.jit(softmax_scan.step)(data["state"], data["s"][:, 0], data["v"][:, 0])
    o, final = jitted_apply(data["s"][:, :1], data["v"][:, :1], initial_state=data["state"])
    _assert_tree_close((o_t, state), (o[:, 0], final), rtol=1e-6, atol=1e-6)
    s16, v16 = data["s"].astype(jnp.bfloat16), data["v"].astype(jnp.bfloat16)
    state16, o16 = jax.jit(softmax_scan.step)(data["state"], s16[:, 0], v16[:, 0])
    assert o16.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16))
    o16, final16 = jitted_apply(s16, v16, initial_state=data["state"], window=window)
    assert o16.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(final16))


def test_initial_state_shapes():
    full = softmax_scan.initial_state(2, 3, 5)
    assert {k: x.shape for k, x in full.items()} == {"max": (2, 3), "denominator": (2, 3),
                                                     "numerator": (2, 3, 5)}
    local = softmax_scan.initial_state(2, 3, 5, window=4)
    assert {k: x.shape for k, x in local.items()} == {"scores": (2, 4, 3), "values": (2, 4, 3, 5),
                                                      "valid": (2, 4)}
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in local.values())


# --------------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise_errors_naming_the_argument_and_shapes():
    data = _random(9, np.float32)
    s, v, st = data["s"], data["v"], data["state"]
    apply = softmax_scan.apply
    with pytest.raises(ValueError, match=r"s must have shape \[B, T, H\], got shape \(2, 11\)"):
        apply(s[..., 0], v)
    with pytest.raises(ValueError, match=r"v has shape \(2, 11, 2, 4\) but s has \(2, 11, 3\)"):
        apply(s, v[:, :, :2])
    with pytest.raises(ValueError, match="s has dtype int32"):
        apply(s.astype(jnp.int32), v)
    with pytest.raises(TypeError, match="v must be an array"):
        apply(s, v.tolist())
    with pytest.raises(ValueError, match="T = 0"):
        apply(s[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"reset must have shape \[B, T\] = \(2, 11\), got \(2, 10\)"):
        apply(s, v, reset=data["reset"][:, 1:])
    with pytest.raises(ValueError, match="mode='chunked' is not supported"):
        apply(s, v, mode="chunked")
    with pytest.raises(ValueError, match="mode='associative' is full attention; with window=3"):
        apply(s, v, window=3, mode="associative")
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        apply(s, v, window=0)
    with pytest.raises(ValueError, match="window=3 but initial_state is a full-attention state"):
        apply(s, v, initial_state=st, window=3)
    with pytest.raises(ValueError, match="window=2 but initial_state is a window of W = 3"):
        apply(s, v, initial_state=softmax_scan.initial_state(B, H, V, window=3), window=2)
    with pytest.raises(ValueError, match=r"state\['numerator'\] must have shape \(2, 3, 4\).*\(2, 3, 5\)"):
        apply(s, v, initial_state={**st, "numerator": jnp.zeros((B, H, V + 1))})
    with pytest.raises(ValueError, match="the state must be a dict with keys"):
        apply(s, v, initial_state=(st["max"], st["denominator"], st["numerator"]))
    with pytest.raises(ValueError, match=r"s_t must have shape \[B, H\], got shape \(2, 11, 3\)"):
        softmax_scan.step(st, s, v)
    with pytest.raises(ValueError, match=r"state\['max'\] must have shape \(1, 3\)"):
        softmax_scan.step(st, s[:1, 0], v[:1, 0])
