"""pallas_kernels.chunked_gla: the Pallas kernels (interpret mode on CPU) against zoo's matrix engine
(``matrix.reference``, a plain loop over time, forward; autodiff of ``mode="sequential"``,
backward), and their lowering for TPU and CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunked_gla import chunked_gla, chunked_gla_reference
from zoo.ops import matrix

TRITON = "__gpu$xla.gpu.triton"


def _inputs(seed, batch, time, heads, dk, dv, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.normal(size=(batch, time, heads, dk)), dtype) for _ in range(2))
    v = jnp.asarray(r.normal(size=(batch, time, heads, dv)), dtype)
    g = jnp.asarray(np.log(r.uniform(0.3, 0.999, size=(batch, time, heads))), jnp.float32)
    s0 = jnp.asarray(r.normal(size=(batch, heads, dk, dv)), jnp.float32)
    return q, k, v, g, s0


def _loss(fn, seed, shape_o, shape_s):
    """A scalar that weighs every output and final-state entry differently (random cotangents)."""
    r = np.random.default_rng(seed + 100)
    wo = jnp.asarray(r.normal(size=shape_o), jnp.float32)
    ws = jnp.asarray(r.normal(size=shape_s), jnp.float32)

    def loss(q, k, v, g, s0):
        o, s = fn(q, k, v, g, s0)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s.astype(jnp.float32) * ws)
    return loss


def _zoo_reference(q, k, v, g, s0):
    """zoo's loop over time (forward checks)."""
    return matrix.reference(q, k, v, g, initial_state=s0)


def _zoo_sequential(q, k, v, g, s0):
    """zoo's jitted scan over time (gradient checks: autodiff of a scan, fast to compile)."""
    return matrix.apply(q, k, v, g, initial_state=s0, mode="sequential")


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err < tol, f"relative max error {err:.2e} >= {tol:.0e}"


# (batch, time, heads, K, V, chunk): odd T (padded with g = 0, k = v = 0), odd widths, one chunk,
# several chunks.
SHAPES = [(2, 37, 2, 8, 12, 16), (1, 16, 1, 16, 16, 16), (1, 50, 3, 5, 3, 32)]


@pytest.mark.parametrize("platform", [None, "tpu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_zoo_reference(shape, platform):
    *dims, chunk = shape
    args = _inputs(0, *dims)
    kernel = jax.jit(lambda *a: chunked_gla(*a, chunk_size=chunk, platform=platform, interpret=True))
    o, s = kernel(*args)
    o_ref, s_ref = _zoo_reference(*args)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    loss_k = _loss(kernel, 0, o_ref.shape, s_ref.shape)
    loss_r = _loss(_zoo_sequential, 0, o_ref.shape, s_ref.shape)
    grads = jax.jit(jax.grad(loss_k, argnums=range(5)))(*args)
    grads_ref = jax.jit(jax.grad(loss_r, argnums=range(5)))(*args)
    for name, got, want in zip("q k v g initial_state".split(), grads, grads_ref, strict=True):
        assert got.shape == want.shape, name
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
    kernel = jax.jit(lambda *a: chunked_gla(*a, reset=reset, chunk_size=16, platform=platform,
                                            interpret=True))
    o, s = kernel(*args)
    o_ref, s_ref = matrix.reference(*args[:4], initial_state=args[4], reset=reset)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    sequential = lambda q, k, v, g, s0: matrix.apply(q, k, v, g, initial_state=s0, reset=reset,
                                                     mode="sequential")
    grads = jax.jit(jax.grad(_loss(kernel, 4, o_ref.shape, s_ref.shape), argnums=range(5)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(sequential, 4, o_ref.shape, s_ref.shape), argnums=range(5)))(*args)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 1e-4)


def test_without_initial_state_matches_plain_reference():
    q, k, v, g, _ = _inputs(1, 2, 23, 2, 8, 8)
    o, s = chunked_gla(q, k, v, g, chunk_size=16, interpret=True)
    o_ref, s_ref = chunked_gla_reference(q, k, v, g)
    o_zoo, s_zoo = matrix.reference(q, k, v, g)
    _close(o_ref, o_zoo, 1e-5)           # the folder's own reference agrees with zoo's
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)


def test_bfloat16_inputs_against_float32_reference_of_the_same_values():
    args = _inputs(2, 1, 40, 2, 16, 16, dtype=jnp.bfloat16)
    q, k, v, g, s0 = args
    o, s = chunked_gla(*args, chunk_size=16, interpret=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, s_ref = _zoo_reference(*up, g, s0)
    _close(o, o_ref, 3e-2)
    _close(s, s_ref, 3e-2)
    loss_k = _loss(lambda *a: chunked_gla(*a, chunk_size=16, interpret=True), 2, o_ref.shape, s_ref.shape)
    loss_r = _loss(_zoo_sequential, 2, o_ref.shape, s_ref.shape)
    grads = jax.grad(loss_k, argnums=range(5))(*args)
    grads_ref = jax.grad(loss_r, argnums=range(5))(*up, g, s0)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 5e-2)


def test_zero_decay_padding_leaves_state_unchanged():
    """A sequence followed by steps with g = 0, k = v = 0 ends in the same state (what padding relies on)."""
    q, k, v, g, s0 = _inputs(3, 1, 21, 1, 8, 8)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 11)] + [(0, 0)] * (x.ndim - 2))
    _, s = chunked_gla(q, k, v, g, s0, chunk_size=16, interpret=True)
    _, s_padded = chunked_gla(pad(q), pad(k), pad(v), pad(g), s0, chunk_size=16, interpret=True)
    np.testing.assert_allclose(s_padded, s, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, error, words", [
    (dict(g=jnp.zeros((1, 8, 2, 4))), ValueError, "g must be"),
    (dict(v=jnp.zeros((1, 7, 2, 4))), ValueError, "v must be"),
    (dict(initial_state=jnp.zeros((1, 2, 4, 5))), ValueError, "initial_state"),
    (dict(q=jnp.zeros((1, 8, 2, 4), jnp.float16), k=jnp.zeros((1, 8, 2, 4), jnp.float16)), TypeError,
     "float32"),
    (dict(chunk_size=24), ValueError, "chunk_size"),
    (dict(reset=jnp.zeros((1, 8), jnp.int32)), ValueError, "reset must be"),
    (dict(platform="cuda"), ValueError, "platform"),
])
def test_bad_arguments_are_named(bad, error, words):
    args = dict(q=jnp.zeros((1, 8, 2, 4)), k=jnp.zeros((1, 8, 2, 4)), v=jnp.zeros((1, 8, 2, 4)),
                g=jnp.zeros((1, 8, 2)))
    args.update(bad)
    with pytest.raises(error, match=words):
        chunked_gla(**args)


def _specs(dtype):
    b, t, h, dk, dv = 2, 100, 2, 64, 128
    sd = jax.ShapeDtypeStruct
    return [sd((b, t, h, dk), dtype), sd((b, t, h, dk), dtype), sd((b, t, h, dv), dtype),
            sd((b, t, h), jnp.float32), sd((b, h, dk, dv), jnp.float32)]


def _forward(*args):
    return chunked_gla(*args)


def _forward_with_reset(*args):
    return chunked_gla(*args, reset=jnp.broadcast_to(jnp.arange(100) % 37 == 0, (2, 100)))


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
