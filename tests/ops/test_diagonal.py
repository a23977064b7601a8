"""zoo.ops.diagonal: every mode against the plain loop, in values and gradients.

Float64 comparisons (under ``jax.enable_x64``) hold to 1e-10: the modes differ from the loop only in
the order of float operations. Float32 comparisons hold to 1e-5 relative; bfloat16 inputs to 1e-2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import diagonal

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, F = 2, 11, 3
CHUNK = 4  # T = 11 is not a multiple: the chunked mode pads with identity steps


def _mode_kwargs(mode):
    return {"chunk_size": CHUNK} if mode == "chunked" else {}


def _apply(mode):
    return functools.partial(diagonal.apply, mode=mode, **_mode_kwargs(mode))


def _random(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    data = {
        "a": 1 / (1 + np.exp(-rng.normal(1.0, 1.0, (B, T, F)))),
        "b": rng.normal(size=(B, T, F)),
        "h0": rng.normal(size=(B, F)),
        "w": rng.normal(size=(B, T, F)),
        "w_final": rng.normal(size=(B, F)),
        "reset": rng.random((B, T)) < 0.25,
    }
    data["reset"][0, 5] = True
    return {k: (v if v.dtype == bool else v.astype(dtype)) for k, v in data.items()}


def _loss(fn, w, w_final, **kwargs):
    """A random linear read-out of h and the final state, so that every output gets a cotangent."""
    def loss(a, b, h0):
        h, final = fn(a, b, initial_state=h0, **kwargs)
        return jnp.sum(h * w) + jnp.sum(final * w_final)

    return loss


def _values_and_grads(fn, data, a, **kwargs):
    loss = _loss(fn, data["w"], data["w_final"], **kwargs)
    h, final = fn(a, data["b"], initial_state=data["h0"], **kwargs)
    grads = jax.grad(loss, argnums=(0, 1, 2))(a, data["b"], data["h0"])
    return (h, final, *grads)


def _assert_close(got, want, rtol, atol=0.0):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Every mode equals the loop.


@pytest.mark.parametrize("mode", diagonal.MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_every_mode_matches_float64_reference_in_values_and_gradients(mode, reverse, with_reset):
    with jax.enable_x64(True):
        data = _random(0)
        kwargs = {"reverse": reverse, "reset": data["reset"] if with_reset else None}
        want = _values_and_grads(diagonal.reference, data, data["a"], **kwargs)
        got = _values_and_grads(_apply(mode), data, data["a"], **kwargs)
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", diagonal.MODES)
@pytest.mark.parametrize("a_shape", [(F,), (1, T, F), (B, 1, F), (B, T, 1)])
def test_broadcast_decay_matches_reference_and_its_gradient_keeps_its_shape(mode, a_shape):
    with jax.enable_x64(True):
        data = _random(1)
        a = 1 / (1 + np.exp(-np.random.default_rng(2).normal(size=a_shape)))
        kwargs = {"reset": data["reset"]}
        want = _values_and_grads(diagonal.reference, data, a, **kwargs)
        got = _values_and_grads(_apply(mode), data, a, **kwargs)
        assert got[2].shape == a_shape
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", diagonal.MODES)
def test_float32_modes_match_reference_under_jit(mode):
    data = _random(3, np.float32)
    fn = jax.jit(_apply(mode), static_argnames=("reverse",))
    want = _values_and_grads(diagonal.reference, data, data["a"], reset=data["reset"])
    got = _values_and_grads(fn, data, data["a"], reset=data["reset"])
    for g in got:
        assert g.dtype == jnp.float32
    _assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_mode_is_sequential_on_cpu_and_matches_reference():
    assert jax.default_backend() != "cpu" or diagonal._auto_mode() == "sequential"
    data = _random(4, np.float32)
    got = diagonal.apply(data["a"], data["b"], initial_state=data["h0"])
    want = diagonal.reference(data["a"], data["b"], initial_state=data["h0"])
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Resets, steps, complex recurrences.


def _segments(flags, reverse):
    """[(start, stop)] of the segments that the reset flags of one sequence delimit."""
    starts = [0] + [t for t in range(1, len(flags)) if flags[t]]
    bounds = [*starts, len(flags)]
    segs = list(zip(bounds[:-1], bounds[1:], strict=True))
    return segs[::-1] if reverse else segs


@pytest.mark.parametrize("mode", diagonal.MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_reset_equals_running_segments_separately(mode, reverse):
    data = _random(5, np.float32)
    a, b, h0, reset = data["a"], data["b"], data["h0"], data["reset"]
    reset[1, 0] = True  # a reset at t = 0 discards the initial state going forwards
    h, final = _apply(mode)(a, b, initial_state=h0, reset=reset, reverse=reverse)
    for i in range(B):
        carry_in = h0[i:i + 1]
        if reset[i, 0] and not reverse:
            carry_in = np.zeros_like(carry_in)
        for n, (start, stop) in enumerate(_segments(reset[i], reverse)):
            state = carry_in if n == 0 else np.zeros_like(carry_in)
            h_seg, last = diagonal.reference(a[i:i + 1, start:stop], b[i:i + 1, start:stop],
                                             initial_state=state, reverse=reverse)
            np.testing.assert_allclose(h[i:i + 1, start:stop], h_seg, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final[i:i + 1], last, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("complex_form", [False, True])
def test_folding_step_over_time_equals_apply(complex_form):
    data = _random(6, np.float32)
    a, b, h = data["a"], data["b"], data["h0"]
    if complex_form:
        a, b, h = (a, 0.3 * a), (b, data["w"]), (h, data["w_final"])
    h_seq, final = diagonal.apply(a, b, initial_state=h)
    for t in range(T):
        step_in = jax.tree.map(lambda v, t=t: v[:, t], (a, b))
        h = diagonal.step(*step_in, h)
        _assert_close(jax.tree.leaves(h), jax.tree.leaves(jax.tree.map(lambda v, t=t: v[:, t], h_seq)),
                      rtol=1e-5, atol=1e-6)
    _assert_close(jax.tree.leaves(h), jax.tree.leaves(final), rtol=1e-5, atol=1e-6)


def _complex128_loop(a, b, h0, reverse):
    h, out = h0.astype(np.complex128), np.zeros(b.shape, np.complex128)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = a * h + b[:, t]
        out[:, t] = h
    return out, h


@pytest.mark.parametrize("mode", diagonal.MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_complex_inputs_match_complex128_loop_in_both_forms(mode, reverse):
    rng = np.random.default_rng(7)
    lam = np.exp(-rng.uniform(0.01, 0.5, F) + 1j * rng.uniform(-np.pi, np.pi, F))  # LRU-like, |λ| < 1
    b = rng.normal(size=(B, T, F)) + 1j * rng.normal(size=(B, T, F))
    h0 = rng.normal(size=(B, F)) + 1j * rng.normal(size=(B, F))
    want_h, want_final = _complex128_loop(lam, b, h0, reverse)
    fn = _apply(mode)

    h, final = fn(lam.astype(np.complex64), b.astype(np.complex64), initial_state=h0.astype(np.complex64),
                  reverse=reverse)
    assert h.dtype == jnp.complex64
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5)

    pair = lambda z: (z.real.astype(np.float32), z.imag.astype(np.float32))
    (h_re, h_im), (f_re, f_im) = fn(pair(lam), pair(b), initial_state=pair(h0), reverse=reverse)
    np.testing.assert_allclose(h_re + 1j * np.asarray(h_im), want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f_re + 1j * np.asarray(f_im), want_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", diagonal.MODES)
def test_complex_pair_gradients_match_reference(mode):
    with jax.enable_x64(True):
        d = _random(8)
        a, b, h0 = (d["a"], d["a"] - 0.5), (d["b"], d["w"]), (d["h0"], d["w_final"])

        def loss(fn):
            def value(a, b, h0):
                (h_re, h_im), (f_re, f_im) = fn(a, b, initial_state=h0, reset=d["reset"], reverse=True)
                return jnp.sum(h_re * d["w"] - h_im * d["b"]) + jnp.sum(f_re * f_im)
            return jax.grad(value, argnums=(0, 1, 2))

        want = jax.tree.leaves(loss(diagonal.reference)(a, b, h0))
        got = jax.tree.leaves(loss(_apply(mode))(a, b, h0))
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Extreme decays, log space, bfloat16.


@pytest.mark.parametrize("mode", diagonal.MODES)
@pytest.mark.parametrize("tiny", [1e-30, 0.0])
def test_decays_near_or_at_zero_stay_finite_and_match_reference(mode, tiny):
    data = _random(9, np.float32)
    a = data["a"].copy()
    a[:, 1::2] = tiny                                # chunk-internal products underflow to 0
    want = _values_and_grads(diagonal.reference, data, a)
    got = _values_and_grads(_apply(mode), data, a)
    for g in got:
        assert np.all(np.isfinite(g))
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


def _log_case(seed, dtype):
    """log a in two regimes: within 1e-7 of a = 1 and a ≈ 1e-22, plus signed b and state."""
    data = _random(seed, dtype)
    rng = np.random.default_rng(seed + 100)
    near_one, near_zero = -1e-7 * rng.random((B, T, F)), -50.0 + rng.random((B, T, F))
    log_a = np.where(rng.random((B, T, F)) < 0.5, near_one, near_zero)
    return data, log_a.astype(dtype)


@pytest.mark.parametrize("mode", diagonal.LOG_MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_log_space_matches_reference_for_decays_near_0_and_1_and_signed_b(mode, reverse):
    with jax.enable_x64(True):
        data, log_a = _log_case(10, np.float64)
        kwargs = {"reverse": reverse, "reset": data["reset"]}
        fn = functools.partial(diagonal.apply_log, mode=mode)
        ref = lambda la, b, **kw: diagonal.reference(jnp.exp(la), b, **kw)
        want = _values_and_grads(ref, data, log_a, **kwargs)
        got = _values_and_grads(fn, data, log_a, **kwargs)
        _assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", diagonal.LOG_MODES)
def test_log_space_float32_log_b_form_matches_reference(mode):
    data, log_a = _log_case(11, np.float32)
    log_b = data["b"]                                # b = exp(log_b) > 0, the paper's form
    h0 = np.abs(data["h0"])
    h, final = diagonal.apply_log(log_a, log_b=log_b, initial_state=h0, mode=mode)
    want_h, want_final = diagonal.reference(np.exp(log_a), np.exp(log_b), initial_state=h0)
    np.testing.assert_allclose(h, want_h, rtol=1e-5)
    np.testing.assert_allclose(final, want_final, rtol=1e-5)

    grad = lambda fn: jax.grad(lambda lb: jnp.sum(fn(lb) * data["w"]))(log_b)
    got = grad(lambda lb: diagonal.apply_log(log_a, log_b=lb, initial_state=h0, mode=mode)[0])
    want = grad(lambda lb: diagonal.reference(np.exp(log_a), jnp.exp(lb), initial_state=h0)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", diagonal.LOG_MODES)
def test_log_space_with_exact_zeros_has_finite_correct_gradients(mode):
    data, log_a = _log_case(12, np.float32)
    log_a[:, 3] = -np.inf                            # a decay of exactly 0
    b = data["b"].copy()
    b[:, 2:6] = 0.0                                  # b⁺ and b⁻ both zero for a stretch
    data = {**data, "b": b}
    fn = functools.partial(diagonal.apply_log, mode=mode, reset=data["reset"])
    got = _values_and_grads(fn, data, log_a)
    for g in got:
        assert np.all(np.isfinite(g))
    ref = lambda la, b, **kw: diagonal.reference(jnp.exp(la), b, reset=data["reset"], **kw)
    want = _values_and_grads(ref, data, log_a)
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", diagonal.MODES)
def test_bfloat16_inputs_give_bfloat16_h_and_float32_state_within_1e2(mode):
    data = _random(13, np.float32)
    a, b, h0 = (jnp.asarray(data[k], jnp.bfloat16) for k in ("a", "b", "h0"))
    h, final = _apply(mode)(a, b, initial_state=h0, reset=data["reset"])
    assert h.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    up = lambda x: jnp.asarray(x, jnp.float32)
    want_h, want_final = diagonal.reference(up(a), up(b), initial_state=up(h0), reset=data["reset"])
    scale = float(jnp.max(jnp.abs(want_h)))
    np.testing.assert_allclose(up(h), want_h, atol=1e-2 * scale)
    np.testing.assert_allclose(final, want_final, atol=1e-2 * scale)
    grads = jax.grad(lambda a, b: jnp.sum(up(_apply(mode)(a, b)[0]) * data["w"]), argnums=(0, 1))(a, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


# --------------------------------------------------------------------------------------------
# Errors at the boundary.

_OK = {"a": np.full((B, T, F), 0.5, np.float32), "b": np.ones((B, T, F), np.float32)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a": np.ones((B, T + 1, F), np.float32)}, r"a has shape \(2, 12, 3\) but b has \(2, 11, 3\)"),
        ({"a": np.ones((F + 1,), np.float32)}, r"a has shape \(4,\)"),
        ({"b": np.ones((B,), np.float32), "a": np.ones((B,), np.float32)}, r"b must have shape \[B, T"),
        ({"b": np.ones((B, 0, F), np.float32), "a": np.ones((F,), np.float32)}, r"T = 0 steps"),
        ({"b": np.ones((B, T, F), np.int32)}, r"b has dtype int32"),
        ({"a": np.ones((B, T, F), np.int32)}, r"a has dtype int32"),
        ({"initial_state": np.ones((B, F + 1), np.float32)}, r"initial_state must have shape .* = \(2, 3\)"),
        ({"reset": np.ones((B, T + 1), bool)}, r"reset must have shape \[B, T\] = \(2, 11\)"),
        ({"reset": np.ones((B, T), np.float32)}, r"reset must be bool"),
        ({"mode": "fft"}, r"mode='fft' is not supported"),
        ({"mode": "chunked", "chunk_size": 0}, r"chunk_size must be a positive int, got 0"),
        ({"mode": "chunked", "chunk_size": 2.5}, r"chunk_size must be a positive int"),
        ({"mode": "chunked", "chunk_size": True}, r"chunk_size must be a positive int"),
        ({"mode": "sequential", "chunk_size": 8}, r"chunk_size=8 only applies to mode='chunked'"),
        ({"b": (np.ones((B, T, F), np.float32), np.ones((B, T, F + 1), np.float32))}, r"imaginary part"),
    ],
)
def test_malformed_input_raises_value_error_naming_the_argument(kwargs, match):
    args = {**_OK, **kwargs}
    with pytest.raises(ValueError, match=match):
        diagonal.apply(args.pop("a"), args.pop("b"), **args)


def test_log_space_errors_name_the_problem():
    log_a = np.full((B, T, F), -0.5, np.float32)
    with pytest.raises(ValueError, match="exactly one of b"):
        diagonal.apply_log(log_a, _OK["b"], log_b=_OK["b"])
    with pytest.raises(ValueError, match="exactly one of b"):
        diagonal.apply_log(log_a)
    with pytest.raises(ValueError, match="real recurrences"):
        diagonal.apply_log(log_a, _OK["b"].astype(np.complex64))
    with pytest.raises(ValueError, match="mode='chunked' is not supported"):
        diagonal.apply_log(log_a, _OK["b"], mode="chunked")


def test_step_errors_name_the_argument():
    x = np.ones((B, F), np.float32)
    with pytest.raises(ValueError, match=r"h has shape \(2, 4\) but b_t has \(2, 3\)"):
        diagonal.step(x, x, np.ones((B, F + 1), np.float32))
    with pytest.raises(ValueError, match=r"a_t has shape \(5,\)"):
        diagonal.step(np.ones((5,), np.float32), x, x)


@pytest.mark.parametrize("time", [12, 14])   # 4 and 2 steps per loop iteration (T = 11 takes 1)
@pytest.mark.parametrize("reverse", [False, True])
def test_sequential_multi_step_iterations_match_reference(time, reverse):
    with jax.enable_x64(True):
        rng = np.random.default_rng(14)
        a = 1 / (1 + np.exp(-rng.normal(size=(F,))))              # time-invariant decay
        data = {"b": rng.normal(size=(B, time, F)), "h0": rng.normal(size=(B, F)),
                "w": rng.normal(size=(B, time, F)), "w_final": rng.normal(size=(B, F))}
        kwargs = {"reverse": reverse, "reset": rng.random((B, time)) < 0.3}
        want = _values_and_grads(diagonal.reference, data, a, **kwargs)
        got = _values_and_grads(_apply("sequential"), data, a, **kwargs)
        _assert_close(got, want, rtol=1e-10, atol=1e-12)
