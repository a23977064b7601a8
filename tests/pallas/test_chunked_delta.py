"""pallas_kernels.chunked_delta: the Pallas kernels (interpret mode on CPU) against zoo's delta-rule
engine (``delta.reference``, a plain loop over time with the transition matrix built explicitly,
forward; autodiff of ``mode="sequential"``, backward), and their lowering for TPU and CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunked_delta import chunked_delta, chunked_delta_reference
from zoo.ops import delta

TRITON = "__gpu$xla.gpu.triton"
# Interpret-mode kernels on small shapes, checked for values: compiled without XLA's optimisation
# passes (tests/conftest.py), which is most of what these tests spend.
pytestmark = pytest.mark.usefixtures("quick_compile")
NAMES = "q k v beta log_decay initial_state".split()


def _inputs(seed, batch, time, heads, dk, dv, dtype=jnp.float32):
    """Keys L2-normalised as DeltaNet's (so I - β k kᵀ is a contraction); β in (0, 1); decays in
    (0.3, 1)."""
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(batch, time, heads, dk)), dtype)
    k = r.normal(size=(batch, time, heads, dk))
    k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), dtype)
    v = jnp.asarray(r.normal(size=(batch, time, heads, dv)), dtype)
    beta = jnp.asarray(r.uniform(0.05, 0.95, size=(batch, time, heads)), jnp.float32)
    g = jnp.asarray(np.log(r.uniform(0.3, 0.999, size=(batch, time, heads))), jnp.float32)
    s0 = jnp.asarray(r.normal(size=(batch, heads, dk, dv)), jnp.float32)
    return q, k, v, beta, g, s0


def _loss(fn, seed, shape_o, shape_s):
    """A scalar that weighs every output and final-state entry differently (random cotangents)."""
    r = np.random.default_rng(seed + 100)
    wo = jnp.asarray(r.normal(size=shape_o), jnp.float32)
    ws = jnp.asarray(r.normal(size=shape_s), jnp.float32)

    def loss(*args):
        o, s = fn(*args)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s.astype(jnp.float32) * ws)
    return loss


def _zoo_sequential(reset=None):
    """zoo's jitted scan over time (gradient checks: autodiff of a scan, fast to compile)."""
    def run(q, k, v, beta, g, s0):
        return delta.apply(q, k, v, beta, g, initial_state=s0, reset=reset, mode="sequential")
    return run


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err < tol, f"relative max error {err:.2e} >= {tol:.0e}"


def _check_gradients(kernel, reference, args, seed, shapes, tol):
    grads = jax.jit(jax.grad(_loss(kernel, seed, *shapes), argnums=range(6)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(reference, seed, *shapes), argnums=range(6)))(*args)
    for name, got, want in zip(NAMES, grads, grads_ref, strict=True):
        assert got.shape == want.shape, name
        assert np.max(np.abs(np.asarray(want, np.float64))) > 0, name     # a gradient that can fail
        try:
            _close(got, want, tol)
        except AssertionError as error:
            raise AssertionError(f"d{name}: {error}") from None


# ((batch, time, heads, K, V, chunk), platform): odd T (padded with β = 0, g = 0), odd widths, one
# chunk, several chunks, V wider than the GPU's V tile of 64 (two tiles there). platform None is the
# Triton kernel body on CPU (the Mosaic body also runs B = H = 2, odd T, K = 8, V = 12 in the reset test).
# V = 72 matters to the Triton body (two V tiles); the Mosaic body at that shape (full-width blocks, as
# at every other shape) is a -m slow case.
CASES = [((2, 37, 2, 8, 12, 16), None), ((1, 16, 1, 16, 16, 16), "tpu"),
         ((1, 50, 1, 5, 3, 32), None), ((1, 20, 1, 4, 72, 16), None),
         pytest.param((1, 20, 1, 4, 72, 16), "tpu", marks=pytest.mark.slow)]


@pytest.mark.parametrize("shape, platform", CASES)
def test_gated_forward_and_gradients_match_zoo_reference(shape, platform):
    *dims, chunk = shape
    args = _inputs(0, *dims)
    kernel = jax.jit(lambda *a: chunked_delta(*a, chunk_size=chunk, platform=platform, interpret=True))
    o, s = kernel(*args)
    o_ref, s_ref = delta.reference(*args[:5], initial_state=args[5])
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and s.dtype == jnp.float32
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    _check_gradients(kernel, _zoo_sequential(), args, 0, (o_ref.shape, s_ref.shape), 1e-4)


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_plain_delta_rule_without_decay(platform):
    """log_decay=None is DeltaNet (α = 1); gradients of q, k, v, β and the initial state."""
    q, k, v, beta, _, s0 = _inputs(5, 2, 29, 2, 8, 8)
    kernel = jax.jit(lambda q, k, v, beta, s0: chunked_delta(q, k, v, beta, None, s0, chunk_size=16,
                                                            platform=platform, interpret=True))
    o, s = kernel(q, k, v, beta, s0)
    o_ref, s_ref = delta.reference(q, k, v, beta, initial_state=s0)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    sequential = lambda q, k, v, beta, s0: delta.apply(q, k, v, beta, initial_state=s0, mode="sequential")
    loss_k, loss_r = (_loss(f, 5, o_ref.shape, s_ref.shape) for f in (kernel, sequential))
    grads = jax.jit(jax.grad(loss_k, argnums=range(5)))(q, k, v, beta, s0)
    grads_ref = jax.jit(jax.grad(loss_r, argnums=range(5)))(q, k, v, beta, s0)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 1e-4)


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_resets_match_zoo_reference_forward_and_backward(platform):
    """Resets at the first step of a chunk, inside chunks, at a chunk's last step, and none in row 0's
    first chunk (so the initial state's gradient is not all zeros)."""
    batch, time = 2, 45
    args = _inputs(4, batch, time, 2, 8, 12)
    r = np.random.default_rng(4)
    flags = r.uniform(size=(batch, time)) < 0.12
    flags[0, :16] = False
    flags[1, 0] = flags[1, 16] = flags[0, 31] = True
    reset = jnp.asarray(flags)
    kernel = jax.jit(lambda *a: chunked_delta(*a, reset=reset, chunk_size=16, platform=platform,
                                              interpret=True))
    o, s = kernel(*args)
    o_ref, s_ref = delta.reference(*args[:5], initial_state=args[5], reset=reset)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    _check_gradients(kernel, _zoo_sequential(reset), args, 4, (o_ref.shape, s_ref.shape), 1e-4)


def test_without_initial_state_matches_plain_reference():
    q, k, v, beta, g, _ = _inputs(1, 2, 23, 2, 8, 8)
    o, s = chunked_delta(q, k, v, beta, g, chunk_size=16, interpret=True)
    o_ref, s_ref = chunked_delta_reference(q, k, v, beta, g)
    o_zoo, s_zoo = delta.reference(q, k, v, beta, g)
    _close(o_ref, o_zoo, 1e-5)           # the folder's own reference agrees with zoo's
    _close(s_ref, s_zoo, 1e-5)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)


def test_custom_scale_and_strong_decay():
    """scale multiplies q; decays near 0 (g = -30) must not overflow the chunk's exps."""
    q, k, v, beta, g, s0 = _inputs(6, 1, 24, 2, 8, 8)
    g = g.at[:, 5].set(-30.0)
    o, s = chunked_delta(q, k, v, beta, g, s0, scale=0.7, chunk_size=16, interpret=True)
    o_ref, s_ref = delta.reference(q, k, v, beta, g, scale=0.7, initial_state=s0)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)


def test_bfloat16_inputs_against_float32_reference_of_the_same_values():
    args = _inputs(2, 1, 40, 2, 16, 16, dtype=jnp.bfloat16)
    q, k, v, beta, g, s0 = args
    kernel = jax.jit(lambda *a: chunked_delta(*a, chunk_size=16, interpret=True))
    o, s = kernel(*args)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, s_ref = delta.reference(*up, beta, g, initial_state=s0)
    _close(o, o_ref, 3e-2)
    _close(s, s_ref, 3e-2)
    grads = jax.jit(jax.grad(_loss(kernel, 2, o_ref.shape, s_ref.shape), argnums=range(6)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(_zoo_sequential(), 2, o_ref.shape, s_ref.shape), argnums=range(6)))(
        *up, beta, g, s0)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 5e-2)


def test_identity_padding_leaves_state_unchanged():
    """A sequence followed by steps with β = 0, g = 0, k = v = 0 ends in the same state (what padding
    relies on)."""
    q, k, v, beta, g, s0 = _inputs(3, 1, 21, 1, 8, 8)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 11)] + [(0, 0)] * (x.ndim - 2))
    _, s = chunked_delta(q, k, v, beta, g, s0, chunk_size=16, interpret=True)
    _, s_padded = chunked_delta(pad(q), pad(k), pad(v), pad(beta), pad(g), s0, chunk_size=16, interpret=True)
    np.testing.assert_allclose(s_padded, s, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, error, words", [
    (dict(beta=jnp.zeros((1, 8, 3))), ValueError, "beta must be"),
    (dict(log_decay=jnp.zeros((1, 8, 2, 4))), ValueError, "log_decay must be"),
    (dict(v=jnp.zeros((1, 7, 2, 4))), ValueError, "v must be"),
    (dict(k=jnp.zeros((1, 8, 2, 5))), ValueError, "q and k"),
    (dict(initial_state=jnp.zeros((1, 2, 4, 5))), ValueError, "initial_state"),
    (dict(q=jnp.zeros((1, 8, 2, 4), jnp.float16), k=jnp.zeros((1, 8, 2, 4), jnp.float16)), TypeError,
     "float32"),
    (dict(beta=jnp.zeros((1, 8, 2), jnp.int32)), TypeError, "beta must be a real float"),
    (dict(chunk_size=24), ValueError, "chunk_size"),
    (dict(reset=jnp.zeros((1, 8), jnp.int32)), ValueError, "reset must be"),
    (dict(platform="cuda"), ValueError, "platform"),
])
def test_bad_arguments_are_named(bad, error, words):
    args = dict(q=jnp.zeros((1, 8, 2, 4)), k=jnp.zeros((1, 8, 2, 4)), v=jnp.zeros((1, 8, 2, 4)),
                beta=jnp.zeros((1, 8, 2)), log_decay=jnp.zeros((1, 8, 2)))
    args.update(bad)
    with pytest.raises(error, match=words):
        chunked_delta(**args)


def _specs(dtype):
    b, t, h, dk, dv = 2, 100, 2, 64, 128
    sd = jax.ShapeDtypeStruct
    return [sd((b, t, h, dk), dtype), sd((b, t, h, dk), dtype), sd((b, t, h, dv), dtype),
            sd((b, t, h), jnp.float32), sd((b, t, h), jnp.float32), sd((b, h, dk, dv), jnp.float32)]


def _forward(*args):
    return chunked_delta(*args)


def _forward_with_reset(*args):
    return chunked_delta(*args, reset=jnp.broadcast_to(jnp.arange(100) % 37 == 0, (2, 100)))


def _forward_backward(*args):
    """Forward and backward, with resets (broadcast over the batch)."""
    (o, s), vjp = jax.vjp(_forward_with_reset, *args)
    return vjp((jnp.ones_like(o), jnp.ones_like(s)))


@pytest.mark.parametrize("fn, calls", [(_forward, 1), (_forward_backward, 2)])
@pytest.mark.parametrize("target, custom_call", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
def test_the_dispatching_function_lowers_to_the_kernel(fn, calls, target, custom_call):
    exported = jax.export.export(
        jax.jit(fn), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs(jnp.bfloat16))
    assert exported.mlir_module().count(custom_call) == calls


@pytest.mark.parametrize("platform, target, custom_call", [("tpu", "tpu", "tpu_custom_call"),
                                                           ("gpu", "cuda", TRITON)])
def test_each_kernel_lowers_in_float32_with_odd_shapes(platform, target, custom_call):
    """float32 inputs, K = 48 and V = 200 (padded to 64 and 256: two V tiles on both platforms), no
    decay, forward and backward."""
    sd = jax.ShapeDtypeStruct
    f32 = jnp.float32
    specs = [sd((1, 70, 3, 48), f32), sd((1, 70, 3, 48), f32), sd((1, 70, 3, 200), f32), sd((1, 70, 3), f32)]

    def fn(q, k, v, beta):
        (o, s), vjp = jax.vjp(lambda *a: chunked_delta(*a, platform=platform), q, k, v, beta)
        return vjp((jnp.ones_like(o), jnp.ones_like(s)))

    exported = jax.export.export(
        jax.jit(fn), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*specs)
    assert exported.mlir_module().count(custom_call) == 2
