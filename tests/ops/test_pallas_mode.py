"""``mode="pallas"`` on the engines is shorthand for ``implementation="pallas"``: the kernel runs (a
pallas_call in the program, interpret mode on CPU) and gives the XLA result; contradicting it with
``implementation="xla"`` is a ValueError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import delta, diagonal, matrix, selective, ssd_scan

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

KEYS = jax.random.split(jax.random.key(0), 6)
B, T = 2, 19


def _diagonal(**kw):
    a = jax.nn.sigmoid(jax.random.normal(KEYS[0], (B, T, 8)))
    return diagonal.apply(a, jax.random.normal(KEYS[1], (B, T, 8)), **kw)[0]


def _selective(**kw):
    d, n = 4, 3
    u = jax.random.normal(KEYS[0], (B, d, T))
    dt = jax.nn.softplus(jax.random.normal(KEYS[1], (B, d, T)))
    A = -jnp.exp(jax.random.normal(KEYS[2], (d, n)))
    Bm, Cm = (jax.random.normal(k, (B, n, T)) for k in KEYS[3:5])
    return selective.selective_scan(u, dt, A, Bm, Cm, **kw)


def _delta(**kw):
    q, k, v = (jax.random.normal(key, (B, T, 2, 8)) for key in KEYS[:3])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(KEYS[3], (B, T, 2)))
    return delta.apply(q, k, v, beta, **kw)[0]


def _matrix(**kw):
    q, k, v = (jax.random.normal(key, (B, T, 2, 8)) for key in KEYS[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(KEYS[3], (B, T, 2)) + 2.0)
    return matrix.apply(q, k, v, g, **kw)[0]


def _ssd(**kw):
    x = jax.random.normal(KEYS[0], (B, T, 2, 4))
    dt = jax.nn.softplus(jax.random.normal(KEYS[1], (B, T, 2)))
    Bm, Cm = (jax.random.normal(k, (B, T, 1, 3)) for k in KEYS[2:4])
    return ssd_scan.ssd(x, dt, -jnp.ones((2,)), Bm, Cm, **kw)


ENGINES = {"diagonal": _diagonal, "selective": _selective, "delta": _delta, "ssd": _ssd, "matrix": _matrix}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_mode_pallas_runs_the_kernel_and_equals_xla(engine):
    run = ENGINES[engine]
    assert "pallas_call" in str(jax.make_jaxpr(lambda: run(mode="pallas"))())
    np.testing.assert_allclose(run(mode="pallas"), run(implementation="xla"), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mode='pallas'"):
        run(mode="pallas", implementation="xla")
