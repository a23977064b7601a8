"""pallas_kernels.diagonal_scan: both kernel bodies (interpret mode on CPU) against zoo's diagonal engine
(``diagonal.reference``, a plain loop over time, forward) and against autodiff of a ``lax.scan``
(``diagonal_scan_reference``: plain reverse-mode through the loop, independent of the kernels' adjoint
recurrence), and their lowering for TPU and CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.diagonal_scan import diagonal_scan, diagonal_scan_reference, tpu
from zoo.ops import diagonal

TRITON = "__gpu$xla.gpu.triton"
# Interpret-mode kernels on small shapes, checked for values: compiled without XLA's optimisation
# passes (tests/conftest.py), which is most of what these tests spend.
pytestmark = pytest.mark.usefixtures("quick_compile")


def _inputs(seed, shape, dtype=jnp.float32, a_shape=None):
    r = np.random.default_rng(seed)
    a = jnp.asarray(r.uniform(0.5, 1.0, size=a_shape or shape), dtype)
    b = jnp.asarray(r.normal(size=shape), dtype)
    h0 = jnp.asarray(r.normal(size=(shape[0], *shape[2:])), jnp.float32)
    return a, b, h0


def _resets(seed, batch, time):
    """Random segment starts, one at t = 0 in row 1 (the initial state is dropped there) and none in
    row 0's first steps (so the initial state's gradient is not all zeros)."""
    flags = np.random.default_rng(seed + 50).uniform(size=(batch, time)) < 0.1
    flags[0, :5] = False
    if batch > 1:
        flags[1, 0] = True
    return jnp.asarray(flags)


def _loss(fn, seed, shape):
    """A scalar that weighs every output and final-state entry differently (random cotangents)."""
    r = np.random.default_rng(seed + 100)
    wh = jnp.asarray(r.normal(size=shape), jnp.float32)
    wf = jnp.asarray(r.normal(size=(shape[0], *shape[2:])), jnp.float32)

    def loss(a, b, h0):
        h, f = fn(a, b, h0)
        return jnp.sum(h.astype(jnp.float32) * wh) + jnp.sum(f * wf)
    return loss


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err < tol, f"relative max error {err:.2e} >= {tol:.0e}"


# [B, T, ...]: odd T and D (padded features), extra feature axes (flattened), one step, and D = 2100
# (TPU: 8 sublanes x 384 lanes, three lane tiles; GPU: 17 feature tiles). The TPU time tile is cut to
# 8 steps here, so T = 37 and 45 run 5 and 6 time tiles, the last one padded, with the carry and the
# backward pass's boundary rows crossing tiles.
SHAPES = [(2, 37, 20), (2, 16, 3, 5), (1, 1, 7), (1, 45, 2100)]
# Reverse runs the first shape in the default suite (odd T and D, the carry crossing time tiles
# backwards, both bodies): the other shapes' properties (extra feature axes, one step, several lane and
# feature tiles) are layouts, the same in either direction and checked forwards; reversed under -m slow.
CASES = [pytest.param(shape, platform, reverse, id=f"shape{i}-{platform}-{reverse}",
                      marks=[pytest.mark.slow] if reverse and i > 0 else [])
         for i, shape in enumerate(SHAPES) for platform in ("gpu", "tpu") for reverse in (False, True)]


@pytest.mark.parametrize("shape, platform, reverse", CASES)
def test_forward_and_gradients_match_references(shape, platform, reverse, monkeypatch):
    monkeypatch.setattr(tpu, "MAX_TIME_TILE", 8)
    a, b, h0 = _inputs(0, shape)
    reset = _resets(0, *shape[:2])
    kernel = lambda a, b, h0: diagonal_scan(a, b, h0, reset=reset, reverse=reverse, platform=platform,
                                            interpret=True)
    plain = lambda a, b, h0: diagonal_scan_reference(a, b, h0, reset=reset, reverse=reverse)
    h, f = jax.jit(kernel)(a, b, h0)
    h_zoo, f_zoo = diagonal.reference(a, b, initial_state=h0, reset=reset, reverse=reverse)
    _close(h, h_zoo, 1e-5)
    _close(f, f_zoo, 1e-5)
    grads = jax.jit(jax.grad(_loss(kernel, 0, shape), argnums=range(3)))(a, b, h0)
    grads_ref = jax.jit(jax.grad(_loss(plain, 0, shape), argnums=range(3)))(a, b, h0)
    for name, got, want in zip(("a", "b", "initial_state"), grads, grads_ref, strict=True):
        assert got.dtype == want.dtype, name
        _close(got, want, 1e-5)


def test_plain_reference_agrees_with_zoo_reference():
    a, b, h0 = _inputs(1, (2, 23, 6))
    reset = _resets(1, 2, 23)
    for reverse in (False, True):
        got = diagonal_scan_reference(a, b, h0, reset=reset, reverse=reverse)
        want = diagonal.reference(a, b, initial_state=h0, reset=reset, reverse=reverse)
        for x, y in zip(got, want, strict=True):
            _close(x, y, 1e-6)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_a_reset_at_the_first_step_cuts_off_the_initial_state(platform):
    """Exact zeros: the initial state of a row that resets at t = 0 reaches nothing, so its gradient
    is 0, while a row without resets gets a non-zero one."""
    a, b, h0 = _inputs(2, (2, 19, 9))
    reset = jnp.zeros((2, 19), bool).at[1, 0].set(True)
    fn = lambda h0: diagonal_scan(a, b, h0, reset=reset, platform=platform, interpret=True)
    h, _ = jax.jit(fn)(h0)
    h_without, _ = jax.jit(fn)(jnp.zeros_like(h0))
    np.testing.assert_array_equal(h[1], h_without[1])
    d_h0 = jax.jit(jax.grad(lambda h0: jnp.sum(fn(h0)[0])))(h0)
    np.testing.assert_array_equal(d_h0[1], 0.0)
    assert np.all(np.abs(d_h0[0]) > 0)


# The broadcast happens in XLA before the kernels, so each case runs on one of them.
@pytest.mark.parametrize("platform, a_shape", [("gpu", (1, 1, 12)), ("tpu", (2, 1, 12)), ("gpu", (2, 29, 1))])
def test_broadcast_decay_and_no_initial_state(platform, a_shape):
    shape = (2, 29, 12)
    a, b, _ = _inputs(3, shape, a_shape=a_shape)
    kernel = lambda a, b: diagonal_scan(a, b, platform=platform, interpret=True)
    h, f = jax.jit(kernel)(a, b)
    h_zoo, f_zoo = diagonal.reference(a, b)
    _close(h, h_zoo, 1e-5)
    _close(f, f_zoo, 1e-5)
    loss = lambda fn: (lambda a, b: _loss(lambda a, b, _: fn(a, b), 3, shape)(a, b, None))
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(a, b)
    grads_ref = jax.grad(loss(diagonal_scan_reference), argnums=(0, 1))(a, b)
    assert grads[0].shape == a_shape
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 1e-5)


@pytest.mark.parametrize("platform, reverse", [("gpu", False), ("tpu", False), ("tpu", True)])
def test_bfloat16_inputs_against_float32_reference_of_the_same_values(platform, reverse):
    shape = (2, 40, 24)
    a, b, h0 = _inputs(4, shape, jnp.bfloat16)
    reset = _resets(4, 2, 40)
    kernel = lambda a, b, h0: diagonal_scan(a, b, h0, reset=reset, reverse=reverse, platform=platform,
                                            interpret=True)
    h, f = jax.jit(kernel)(a, b, h0)
    assert h.dtype == jnp.bfloat16 and f.dtype == jnp.float32
    up_a, up_b = a.astype(jnp.float32), b.astype(jnp.float32)
    h_zoo, f_zoo = diagonal.reference(up_a, up_b, initial_state=h0, reset=reset, reverse=reverse)
    _close(h, h_zoo, 1e-2)               # h rounded once to bfloat16; the state stays float32
    _close(f, f_zoo, 1e-5)
    grads = jax.jit(jax.grad(_loss(kernel, 4, shape), argnums=range(3)))(a, b, h0)
    plain = lambda a, b, h0: diagonal_scan_reference(a, b, h0, reset=reset, reverse=reverse)
    grads_ref = jax.grad(_loss(plain, 4, shape), argnums=range(3))(up_a, up_b, h0)
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16 and grads[2].dtype == jnp.float32
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 3e-2)          # da uses the bfloat16-stored h


def test_the_dispatching_function_runs_the_triton_body_on_cpu():
    a, b, h0 = _inputs(5, (1, 21, 10))
    h, f = jax.jit(lambda a, b, h0: diagonal_scan(a, b, h0))(a, b, h0)
    h_zoo, f_zoo = diagonal.reference(a, b, initial_state=h0)
    _close(h, h_zoo, 1e-5)
    _close(f, f_zoo, 1e-5)


@pytest.mark.parametrize("bad, error, words", [
    (dict(a=jnp.zeros((2, 7, 4))), ValueError, "a must have"),
    (dict(b=jnp.zeros((2,))), ValueError, "b must be"),
    (dict(b=jnp.zeros((2, 0, 4)), a=jnp.zeros((2, 0, 4))), ValueError, "T >= 1"),
    (dict(initial_state=jnp.zeros((2, 5))), ValueError, "initial_state"),
    (dict(a=jnp.zeros((2, 8, 4), jnp.float16)), TypeError, "a must be a float32"),
    (dict(b=jnp.zeros((2, 8, 4), jnp.complex64)), TypeError, "b must be a float32"),
    (dict(reset=jnp.zeros((2, 8), jnp.int32)), ValueError, "reset must be"),
    (dict(reset=jnp.zeros((2, 7), bool)), ValueError, "reset must be"),
    (dict(platform="cuda"), ValueError, "platform"),
])
def test_bad_arguments_are_named(bad, error, words):
    args = dict(a=jnp.zeros((2, 8, 4)), b=jnp.zeros((2, 8, 4)))
    args.update(bad)
    with pytest.raises(error, match=words):
        diagonal_scan(**args)


B, T, D = 2, 100, 5000          # TPU: bfloat16 -> 16 sublanes x 384 lanes (3 lane tiles)


def _specs(dtype):
    sd = jax.ShapeDtypeStruct
    return [sd((B, T, D), dtype), sd((B, T, D), dtype), sd((B, D), jnp.float32)]


def _forward_backward(platform, reverse):
    """Forward and backward, with resets (broadcast over the batch)."""
    def fn(a, b, h0):
        reset = jnp.broadcast_to(jnp.arange(T) % 37 == 0, (B, T))
        run = lambda a, b, h0: diagonal_scan(a, b, h0, reset=reset, reverse=reverse, platform=platform)
        (h, f), vjp = jax.vjp(run, a, b, h0)
        return vjp((jnp.ones_like(h), jnp.ones_like(f)))
    return fn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("platform", [None, "explicit"])
@pytest.mark.parametrize("target, custom_call", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
def test_lowers_to_the_kernel(target, custom_call, platform, dtype):
    kernel_platform = None if platform is None else {"tpu": "tpu", "cuda": "gpu"}[target]
    export = lambda fn: jax.export.export(
        jax.jit(fn), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs(dtype))
    forward = export(lambda a, b, h0: diagonal_scan(a, b, h0, platform=kernel_platform))
    assert forward.mlir_module().count(custom_call) == 1
    for reverse in (False, True):
        both = export(_forward_backward(kernel_platform, reverse))
        assert both.mlir_module().count(custom_call) == 2
