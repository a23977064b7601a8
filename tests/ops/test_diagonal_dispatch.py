"""zoo.ops.diagonal's ``implementation=``: the Pallas kernel (pallas_kernels.diagonal_scan, interpret mode
on CPU) where it applies, XLA with one warning where it does not, and a clear error for a bad name."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import _dispatch, diagonal

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, H, N = 2, 29, 3, 4


def _inputs(dtype=jnp.float32, time_invariant=False):
    keys = jax.random.split(jax.random.key(0), 4)
    a_shape = (H, N) if time_invariant else (B, T, H, N)
    a = jax.nn.sigmoid(jax.random.normal(keys[0], a_shape) + 2.0).astype(dtype)
    b = jax.random.normal(keys[1], (B, T, H, N)).astype(dtype)
    h0 = jax.random.normal(keys[2], (B, H, N))
    reset = jax.random.bernoulli(keys[3], 0.1, (B, T))
    return a, b, h0, reset


def _loss(impl, reverse, reset, a, b, h0):
    h, s = diagonal.apply(a, b, initial_state=h0, reset=reset, reverse=reverse, implementation=impl)
    h = h.astype(jnp.float32)
    return jnp.sum(h * jnp.cos(h)) + jnp.sum(s ** 2), (h, s)


@pytest.mark.parametrize("time_invariant", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_pallas_equals_xla_in_values_and_gradients(reverse, time_invariant):
    a, b, h0, reset = _inputs(time_invariant=time_invariant)
    loss = lambda impl: (lambda *args: _loss(impl, reverse, reset, *args))
    # The kernel really runs (a pallas_call in the program), so the comparison below is not XLA vs XLA.
    assert "pallas_call" in str(jax.make_jaxpr(loss("pallas"))(a, b, h0))
    assert "pallas_call" not in str(jax.make_jaxpr(loss("xla"))(a, b, h0))
    (_, (h_x, s_x)), g_x = jax.value_and_grad(loss("xla"), argnums=range(3), has_aux=True)(a, b, h0)
    (_, (h_p, s_p)), g_p = jax.value_and_grad(loss("pallas"), argnums=range(3), has_aux=True)(a, b, h0)
    np.testing.assert_allclose(h_p, h_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_p, s_x, rtol=1e-5, atol=1e-5)
    for got, want in zip(g_p, g_x, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_bfloat16_keeps_the_engine_dtypes():
    a, b, h0, reset = _inputs(jnp.bfloat16)
    h_x, s_x = diagonal.apply(a, b, initial_state=h0, reset=reset, implementation="xla")
    h_p, s_p = diagonal.apply(a, b, initial_state=h0, reset=reset, implementation="pallas")
    assert (h_p.dtype, s_p.dtype) == (h_x.dtype, s_x.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(np.asarray(h_p, np.float32), np.asarray(h_x, np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(s_p, s_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, reason", [
    (lambda a, b: (a, (b, 0.5 * b)), "complex or"),
    (lambda a, b: (a.astype(jnp.complex64), b), "complex or"),
    (lambda a, b: (a.astype(jnp.float16), b.astype(jnp.float16)), "dtypes other than"),
])
def test_unsupported_input_falls_back_to_xla_with_one_warning(make, reason):
    a, b, h0, _ = _inputs()
    a, b = make(a, b)
    _dispatch._warned.clear()
    want, _ = diagonal.apply(a, b, implementation="xla")
    with pytest.warns(UserWarning, match=reason):
        got, _ = diagonal.apply(a, b, implementation="pallas")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the second call does not warn again
        diagonal.apply(a, b, implementation=["pallas", "xla"])


def test_auto_on_cpu_is_xla_and_bad_names_raise():
    a, b, *_ = _inputs()
    # This machine has no GPU/TPU: the default keeps the XLA modes.
    assert "pallas_call" not in str(jax.make_jaxpr(lambda a, b: diagonal.apply(a, b))(a, b))
    with pytest.raises(ValueError, match="implementation="):
        diagonal.apply(a, b, implementation="triton")
