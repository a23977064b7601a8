"""zoo.ops.delta's ``implementation=``: the Pallas kernel (pallas_kernels.chunked_delta, interpret mode
on CPU) where it applies, XLA with one warning where it does not, and a clear error for a bad name."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import _dispatch, delta, delta_ops

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, H, K, V = 2, 37, 2, 8, 12


def _inputs():
    keys = jax.random.split(jax.random.key(0), 7)
    q = jax.random.normal(keys[0], (B, T, H, K))
    k = jax.random.normal(keys[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)                 # DeltaNet's unit keys
    v = jax.random.normal(keys[2], (B, T, H, V))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (B, T, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (B, T, H)) + 2.0)
    s0 = jax.random.normal(keys[5], (B, H, K, V))
    reset = jax.random.bernoulli(keys[6], 0.1, (B, T))
    return q, k, v, beta, g, s0, reset


@pytest.mark.parametrize("gated, reverse", [(True, False), (False, False), (True, True)])
def test_pallas_equals_xla_in_values_and_gradients(gated, reverse):
    """Gated and plain; reverse=True runs the kernel over the flipped sequence (resets moved)."""
    q, k, v, beta, g, s0, reset = _inputs()

    def loss(impl, q, k, v, beta, g, s0):
        o, s = delta.apply(q, k, v, beta, g if gated else None, initial_state=s0, reset=reset, chunk_size=16,
                           reverse=reverse, mode="chunked", implementation=impl)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2), (o, s)

    # The kernel really runs (a pallas_call in the program), so the comparison below is not XLA vs XLA.
    args = (q, k, v, beta, g, s0)
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: loss("pallas", *a))(*args))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: loss("xla", *a))(*args))
    argnums = range(6) if gated else (0, 1, 2, 3, 5)
    (_, (o_x, s_x)), g_x = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=argnums,
                                                      has_aux=True))(*args)
    (_, (o_p, s_p)), g_p = jax.jit(jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=argnums,
                                                      has_aux=True))(*args)
    np.testing.assert_allclose(o_p, o_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_p, s_x, rtol=1e-4, atol=1e-4)
    for got, want in zip(g_p, g_x, strict=True):
        assert float(jnp.max(jnp.abs(want))) > 0
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))))


def test_unsupported_input_falls_back_to_xla_with_one_warning():
    q, k, v, beta, g, *_ = _inputs()
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    _dispatch._warned.clear()
    want, _ = delta.apply(q, k, v, beta, g, implementation="xla")
    with pytest.warns(UserWarning, match="float32 or all bfloat16"):
        got, _ = delta.apply(q, k, v, beta, g, implementation="pallas")
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the second call does not warn again
        delta.apply(q, k, v, beta, g, implementation=["pallas", "xla"])
    with pytest.warns(UserWarning, match="powers of two"):
        delta.apply(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), beta, g,
                    chunk_size=12, mode="chunked", implementation="pallas")


def test_auto_on_cpu_is_xla_and_bad_names_raise():
    q, k, v, beta, g, *_ = _inputs()
    assert jax.default_backend() == "cpu"
    # The default on this machine has no pallas_call: CPU behaviour is the XLA engine's.
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: delta.apply(*a))(q, k, v, beta, g))
    with pytest.raises(ValueError, match="implementation="):
        delta.apply(q, k, v, beta, g, implementation="triton")



@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_front_ends_pass_implementation_to_the_engine(impl):
    keys = jax.random.split(jax.random.key(3), 5)
    b, t, h, dk, dv = 1, 20, 2, 8, 8
    q, k = (jax.random.normal(kk, (b, t, h, dk)) for kk in keys[:2])
    v = jax.random.normal(keys[2], (b, t, h, dv))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, h)))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, t, h)) + 3.0)
    front_ends = {
        "delta_rule": lambda: delta_ops.delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True,
                                                   implementation=impl),
        "gated_delta_rule": lambda: delta_ops.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                                                               implementation=impl)}
    for name, call in front_ends.items():
        assert ("pallas_call" in str(jax.make_jaxpr(call)())) == (impl == "pallas"), name
    got, _ = front_ends["gated_delta_rule"]()
    qn, kn = delta_ops.l2_normalize(q), delta_ops.l2_normalize(k)
    want, _ = delta.reference(qn, kn, v, beta, g)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
