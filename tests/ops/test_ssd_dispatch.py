"""zoo.ops.ssd_scan.ssd's ``implementation=``: "pallas" runs pallas_kernels.chunked_gla (interpret mode
on CPU) and equals the engine's sequential scan in values and gradients, with groups, the D skip, the z
gate, Δ bias and softplus, initial states, reset and seq_idx flags, both directions; what the kernel
does not take runs XLA with one warning."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import _dispatch, ssd_scan

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

BATCH, T, H, P, G, N = 2, 37, 4, 6, 2, 5


def _inputs():
    keys = jax.random.split(jax.random.key(0), 9)
    x = jax.random.normal(keys[0], (BATCH, T, H, P))
    dt = jax.random.normal(keys[1], (BATCH, T, H))
    A = -jnp.exp(jax.random.normal(keys[2], (H,)))
    B = jax.random.normal(keys[3], (BATCH, T, G, N))
    C = jax.random.normal(keys[4], (BATCH, T, G, N))
    D = jax.random.normal(keys[5], (H,))
    z = jax.random.normal(keys[6], (BATCH, T, H, P))
    dt_bias = jax.random.normal(keys[7], (H,))
    h0 = jax.random.normal(keys[8], (BATCH, H, P, N))
    return x, dt, A, B, C, D, z, dt_bias, h0


RESET = np.zeros((BATCH, T), bool)
RESET[0, [5, 16]] = True
SEQ_IDX = np.zeros((BATCH, T), np.int32)
SEQ_IDX[1, 20:] = 1


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_pallas_equals_the_reference_in_values_and_gradients(reverse):
    args = _inputs()
    weights = jax.random.normal(jax.random.key(9), (BATCH, T, H, P))

    def loss(fn, *a):
        y, final = fn(*a)
        return jnp.sum(y * weights) + jnp.sum(final * jnp.cos(final)), (y, final)

    def pallas(x, dt, A, B, C, D, z, dt_bias, h0):
        return ssd_scan.ssd(x, dt, A, B, C, 16, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                            initial_states=h0, seq_idx=SEQ_IDX, return_final_states=True, reset=RESET,
                            reverse=reverse, implementation="pallas")

    def reference(x, dt, A, B, C, D, z, dt_bias, h0):
        # The engine's sequential scan (itself checked against the float64 loop in test_ssd.py): its
        # gradients under jit take seconds where the eager loop's take half a minute.
        return ssd_scan.ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=h0,
                            seq_idx=SEQ_IDX, return_final_states=True, reset=RESET, reverse=reverse,
                            mode="sequential", implementation="xla")

    assert "pallas_call" in str(jax.make_jaxpr(pallas)(*args))
    argnums = tuple(range(len(args)))
    grad_pallas = jax.jit(jax.value_and_grad(lambda *a: loss(pallas, *a), argnums, has_aux=True))
    (_, (y_p, s_p)), g_p = grad_pallas(*args)
    (_, (y_r, s_r)), g_r = jax.jit(jax.value_and_grad(lambda *a: loss(reference, *a), argnums, has_aux=True))(
        *args)
    np.testing.assert_allclose(y_p, y_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_p, s_r, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0"), g_p, g_r, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))),
                                   err_msg=f"gradient wrt {name}")


def test_unsupported_chunk_runs_xla_with_one_warning_and_auto_on_cpu_is_xla():
    x, dt, A, B, C, *_ = _inputs()
    _dispatch._warned.clear()
    want = ssd_scan.ssd(x, dt, A, B, C, 24, implementation="xla")
    with pytest.warns(UserWarning, match="powers of two"):
        got = ssd_scan.ssd(x, dt, A, B, C, 24, implementation="pallas")
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssd_scan.ssd(x, dt, A, B, C, 24, implementation=["pallas", "xla"])
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: ssd_scan.ssd(x, dt, A, B, C))(x))
