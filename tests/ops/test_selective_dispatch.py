"""zoo.ops.selective's ``implementation=``: the Pallas kernel (pallas_kernels.selective_scan, interpret
mode on CPU) where it applies, XLA with one warning where it does not, and a clear error for a bad
name."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import _dispatch, selective

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, D, L, N = 2, 6, 21, 4


def _inputs():
    keys = jax.random.split(jax.random.key(1), 9)
    u = jax.random.normal(keys[0], (B, D, L))
    delta = 0.5 * jax.random.normal(keys[1], (B, D, L))
    A = -jnp.exp(jax.random.normal(keys[2], (D, N)))
    Bm = jax.random.normal(keys[3], (B, N, L))
    Cm = jax.random.normal(keys[4], (B, N, L))
    skip = jax.random.normal(keys[5], (D,))
    z = jax.random.normal(keys[6], (B, D, L))
    bias = 0.3 * jax.random.normal(keys[7], (D,))
    h0 = jax.random.normal(keys[8], (B, D, N))
    reset = jax.random.bernoulli(jax.random.key(2), 0.1, (B, L))
    return (u, delta, A, Bm, Cm, skip, z, bias, h0), reset


@pytest.mark.parametrize("reverse", [False, True])
def test_pallas_equals_xla_in_values_and_gradients(reverse):
    args, reset = _inputs()

    def loss(impl, u, delta, A, Bm, Cm, skip, z, bias, h0):
        out, state = selective.selective_scan(u, delta, A, Bm, Cm, skip, z, bias, True, initial_state=h0,
                                              reset=reset, reverse=reverse, return_final_state=True,
                                              chunk_size=8, implementation=impl)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(state ** 2), (out, state)

    # The kernel really runs (a pallas_call in the program), so the comparison below is not XLA vs XLA.
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: loss("pallas", *a))(*args))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: loss("xla", *a))(*args))
    grad = lambda impl: jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=range(9), has_aux=True))
    (_, (out_x, state_x)), grads_x = grad("xla")(*args)
    (_, (out_p, state_p)), grads_p = grad("pallas")(*args)
    np.testing.assert_allclose(out_p, out_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state_p, state_x, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_p, grads_x, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))))


def test_unsupported_input_falls_back_to_xla_with_one_warning():
    (u, delta, A, Bm, Cm, *_), _ = _inputs()
    complex_a = A + 1j * jnp.ones_like(A)
    Bm, Cm = Bm.astype(jnp.complex64), Cm.astype(jnp.complex64)     # complex A takes complex B, C
    _dispatch._warned.clear()
    want = selective.selective_scan(u, delta, complex_a, Bm, Cm, implementation="xla")
    with pytest.warns(UserWarning, match="complex A"):
        got = selective.selective_scan(u, delta, complex_a, Bm, Cm, implementation="pallas")
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the second call does not warn again
        selective.selective_scan(u, delta, complex_a, Bm, Cm, implementation=["pallas", "xla"])
    # Time-invariant B and C ([D, N]) are another reason, warned once on its own.
    b_fixed, c_fixed = jnp.real(Bm[0, :, :D]).T, jnp.real(Cm[0, :, :D]).T
    with pytest.warns(UserWarning, match="time-invariant"):
        got = selective.selective_scan(u, delta, A, b_fixed, c_fixed, implementation="pallas")
    np.testing.assert_array_equal(got, selective.selective_scan(u, delta, A, b_fixed, c_fixed))


def test_auto_on_cpu_is_xla_and_bad_names_raise():
    (u, delta, A, Bm, Cm, *_), _ = _inputs()
    assert "pallas_call" not in str(jax.make_jaxpr(
        lambda u: selective.selective_scan(u, delta, A, Bm, Cm))(u))      # this machine has no GPU/TPU
    with pytest.raises(ValueError, match="implementation="):
        selective.selective_scan(u, delta, A, Bm, Cm, implementation="triton")
