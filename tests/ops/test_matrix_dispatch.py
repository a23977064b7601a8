"""zoo.ops.matrix's ``implementation=``: the Pallas kernel (pallas_kernels.chunked_gla, interpret mode
on CPU) where it applies, XLA with one warning where it does not, and a clear error for a bad name."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import _dispatch, matrix, matrix_ops

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, H, K, V = 2, 37, 2, 8, 12


def _inputs(vector_decay=False):
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (B, T, H, K))
    k = jax.random.normal(keys[1], (B, T, H, K))
    v = jax.random.normal(keys[2], (B, T, H, V))
    shape = (B, T, H, K) if vector_decay else (B, T, H)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 2.0)
    s0 = jax.random.normal(keys[4], (B, H, K, V))
    reset = jax.random.bernoulli(keys[5], 0.1, (B, T))
    return q, k, v, g, s0, reset


@pytest.mark.parametrize("vector_decay, reverse", [(False, False), (False, True), (True, True)])
def test_pallas_equals_xla_in_values_and_gradients(vector_decay, reverse):
    """Scalar and per-key decays (GLA), forwards and reversed (the kernel runs over the flipped
    sequence with the reset flags moved), with resets and an initial state."""
    q, k, v, g, s0, reset = _inputs(vector_decay)

    def loss(impl, q, k, v, g, s0):
        o, s = matrix.apply(q, k, v, g, initial_state=s0, reset=reset, chunk_size=32 if vector_decay else 16,
                            mode="chunked", reverse=reverse, implementation=impl)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2), (o, s)

    # The kernel really runs (a pallas_call in the program), so the comparison below is not XLA vs XLA.
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: loss("pallas", *a))(q, k, v, g, s0))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: loss("xla", *a))(q, k, v, g, s0))
    (_, (o_x, s_x)), g_x = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=range(5), has_aux=True)(
        q, k, v, g, s0)
    (_, (o_p, s_p)), g_p = jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=range(5), has_aux=True)(
        q, k, v, g, s0)
    np.testing.assert_allclose(o_p, o_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_p, s_x, rtol=1e-4, atol=1e-4)
    for got, want in zip(g_p, g_x, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("reverse", [False, True])
def test_mlstm_pallas_equals_xla_in_values_and_gradients(reverse):
    """mLSTM through its front end (input gate, stabiliser, max_abs normaliser, initial (C, n, m),
    resets), forwards and reversed: the kernel runs, and values and gradients equal XLA's."""
    q, k, v, _, s0, reset = _inputs()
    keys = jax.random.split(jax.random.key(1), 4)
    i_pre = 3.0 * jax.random.normal(keys[0], (B, T, H))
    f_pre = 2.0 * jax.random.normal(keys[1], (B, T, H)) + 1.0
    n0, m0 = jax.random.normal(keys[2], (B, H, K)), jax.random.normal(keys[3], (B, H))

    def loss(impl, q, k, v, i_pre, f_pre, s0, n0, m0):
        h, (c, n, m) = matrix_ops.mlstm(q, k, v, i_pre, f_pre, initial_state=(s0, n0, m0), reset=reset,
                                        reverse=reverse, output_final_state=True, chunk_size=16,
                                        mode="chunked", implementation=impl)
        return jnp.sum(h * jnp.cos(h)) + jnp.sum(c ** 2) + jnp.sum(n * m[..., None]), (h, c, n, m)

    args = (q, k, v, i_pre, f_pre, s0, n0, m0)
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: loss("pallas", *a))(*args))
    (_, out_x), g_x = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=range(8), has_aux=True)(*args)
    (_, out_p), g_p = jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=range(8), has_aux=True)(*args)
    for got, want in zip(out_p, out_x, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(g_p, g_x, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("option, words", [(dict(exclusive=True), "exclusive"),
                                           (dict(normalizer="sum"), "normalisers")])
def test_unsupported_input_falls_back_to_xla_with_one_warning(option, words):
    q, k, v, g, s0, _ = _inputs(vector_decay=True)
    _dispatch._warned.clear()
    want, _ = matrix.apply(q, k, v, g, implementation="xla", **option)
    with pytest.warns(UserWarning, match=words):
        got, _ = matrix.apply(q, k, v, g, implementation="pallas", **option)
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the second call does not warn again
        matrix.apply(q, k, v, g, implementation=["pallas", "xla"], **option)


def test_complex_decays_stay_on_xla():
    """GateLoop's complex decays are not taken by the kernel (one warning, XLA's result)."""
    q, k, v, g, *_ = _inputs(vector_decay=True)
    g = g.astype(jnp.complex64) + 0.3j
    _dispatch._warned.clear()
    want, _ = matrix.apply(q, k, v, g, implementation="xla")
    with pytest.warns(UserWarning, match="complex"):
        got, _ = matrix.apply(q, k, v, g, implementation="pallas")
    np.testing.assert_array_equal(got, want)


def test_auto_on_cpu_is_xla_and_bad_names_raise():
    q, k, v, g, *_ = _inputs()
    assert not _dispatch.use_pallas("t", None, "auto", None)           # this machine has no GPU/TPU
    assert _dispatch.use_pallas("t", "pallas", "chunked", None)
    with pytest.raises(ValueError, match="implementation="):
        matrix.apply(q, k, v, g, implementation="triton")



@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_front_ends_pass_implementation_to_the_engine(impl):
    q, k, v, g, s0, reset = _inputs()
    front_ends = {"simple_gla": lambda: matrix_ops.simple_gla(q, k, v, g, reset=reset, implementation=impl),
                  "retention": lambda: matrix_ops.retention(q, k, v, implementation=impl),
                  "linear_attention": lambda: matrix_ops.linear_attention(q, k, v, implementation=impl)}
    for name, call in front_ends.items():
        assert ("pallas_call" in str(jax.make_jaxpr(call)())) == (impl == "pallas"), name
    got, _ = matrix_ops.simple_gla(q, k, v, g, initial_state=s0, reset=reset, implementation=impl)
    want, _ = matrix.reference(q, k, v, g, initial_state=s0, reset=reset)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
