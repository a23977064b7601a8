"""pallas_kernels.chunked_gla: the Pallas kernels (interpret mode on CPU) against zoo's matrix engine
(``matrix.reference``, a plain loop over time, forward; autodiff of ``mode="sequential"``,
backward), and their lowering for TPU and CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunked_gla import chunked_gla, chunked_gla_reference, chunked_mlstm
from zoo.ops import matrix

TRITON = "__gpu$xla.gpu.triton"
# Interpret-mode kernels on small shapes, checked for values: compiled without XLA's optimisation
# passes (tests/conftest.py), which is most of what these tests spend.
pytestmark = pytest.mark.usefixtures("quick_compile")


def _inputs(seed, batch, time, heads, dk, dv, dtype=jnp.float32, per_key=False):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.normal(size=(batch, time, heads, dk)), dtype) for _ in range(2))
    v = jnp.asarray(r.normal(size=(batch, time, heads, dv)), dtype)
    g_shape = (batch, time, heads, dk) if per_key else (batch, time, heads)
    g = jnp.asarray(np.log(r.uniform(0.3, 0.999, size=g_shape)), jnp.float32)
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
# The odd widths run in the default suite on the Triton body only: the Mosaic body runs odd T, several
# chunks and a padded V = 12 in the first shape (and odd K = 5 in the per-key test); both bodies at the
# third shape under -m slow.
SHAPES = [(2, 37, 2, 8, 12, 16), (1, 16, 1, 16, 16, 16), (1, 50, 3, 5, 3, 32)]
CASES = [pytest.param(shape, platform, id=f"shape{i}-{platform}",
                      marks=[pytest.mark.slow] if (i, platform) == (2, "tpu") else [])
         for i, shape in enumerate(SHAPES) for platform in (None, "tpu")]


@pytest.mark.parametrize("shape, platform", CASES)
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


# ------------------------------------------------------------------------------------------------
# Log decays per key dimension (GLA): sub-chunks of 16 inside each chunk.


def _check_against_sequential(kernel, args, reset, seed, tol_o, tol_g):
    """Forward against zoo's loop over time, gradients (q, k, v, g, initial state) against autodiff of
    zoo's scan (mode="sequential"), both on the same inputs."""
    o, s = kernel(*args)
    o_ref, s_ref = matrix.reference(*args[:4], initial_state=args[4], reset=reset)
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(s)).all()
    _close(o, o_ref, tol_o)
    _close(s, s_ref, tol_o)
    sequential = lambda q, k, v, g, s0: matrix.apply(q, k, v, g, initial_state=s0, reset=reset,
                                                     mode="sequential")
    up = [x.astype(jnp.float32) for x in args]
    grads = jax.jit(jax.grad(_loss(kernel, seed, o_ref.shape, s_ref.shape), argnums=range(5)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(sequential, seed, o_ref.shape, s_ref.shape), argnums=range(5)))(*up)
    for name, got, want in zip("q k v g initial_state".split(), grads, grads_ref, strict=True):
        assert got.shape == want.shape, name
        assert np.isfinite(np.asarray(got, np.float32)).all(), name
        _close(got, want, tol_g)


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_per_key_decays_match_zoo_forward_and_backward(platform):
    """Odd T (padded), odd K and V, two sub-chunks per chunk, two chunks, resets (one at a chunk start,
    one inside a sub-chunk, one on a sub-chunk boundary; none in row 0's first chunk)."""
    batch, time = 2, 45
    args = _inputs(5, batch, time, 2, 5, 12, per_key=True)
    flags = np.zeros((batch, time), bool)
    flags[0, 40] = flags[1, 0] = flags[1, 16] = flags[1, 32] = flags[1, 37] = True
    reset = jnp.asarray(flags)
    kernel = jax.jit(lambda *a: chunked_gla(*a, reset=reset, chunk_size=32, platform=platform,
                                            interpret=True))
    _check_against_sequential(kernel, args, reset, 5, 1e-5, 1e-4)


def test_per_key_decays_down_to_minus_30_stay_finite_and_exact():
    """Log decays of -30 per step (exp(-30) ~ 1e-13) on half the entries and near 0 on the rest, over a
    64-step chunk of four sub-chunks: a factorisation exp(b_t) exp(-b_s) would overflow (b reaches
    -1900), the sub-chunk form must not. Tolerance: exp(b_t - b_s) is taken from differences of float32
    cumulative sums near -1000 (ulp ~6e-5), so ~2e-5 relative error vs float64 here (zoo's XLA form
    sums each segment directly and stays at ~5e-7)."""
    q, k, v, _, s0 = _inputs(6, 1, 64, 1, 8, 8)
    r = np.random.default_rng(6)
    g = np.where(r.uniform(size=q.shape) < 0.5, -30.0, np.log(r.uniform(0.5, 1.0, size=q.shape)))
    g[..., 0], g[..., 1] = -30.0, -1e-3
    kernel = jax.jit(lambda *a: chunked_gla(*a, chunk_size=64, platform="gpu", interpret=True))
    _check_against_sequential(kernel, (q, k, v, jnp.asarray(g, jnp.float32), s0), None, 6, 1e-4, 1e-4)


def test_per_key_bfloat16_inputs_against_float32_reference_of_the_same_values():
    args = _inputs(7, 1, 40, 1, 16, 16, dtype=jnp.bfloat16, per_key=True)
    kernel = jax.jit(lambda *a: chunked_gla(*a, chunk_size=32, platform="gpu", interpret=True))
    o, s = kernel(*args)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    _check_against_sequential(kernel, args, None, 7, 3e-2, 5e-2)


# ------------------------------------------------------------------------------------------------
# mLSTM: input gate, max-stabiliser, max_abs normaliser (zoo.ops.matrix with log_input_gate and
# normalizer="max_abs").


def _mlstm_inputs(seed, batch, time, heads, dk, dv, gate_size=3.0):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.normal(size=(batch, time, heads, dk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(r.normal(size=(batch, time, heads, dv)), jnp.float32)
    pre_f = gate_size * r.normal(size=(batch, time, heads)) + 1.0
    log_f = jax.nn.log_sigmoid(jnp.asarray(pre_f, jnp.float32))
    log_i = jnp.asarray(gate_size * r.normal(size=(batch, time, heads)), jnp.float32)
    s0 = jnp.asarray(r.normal(size=(batch, heads, dk, dv)), jnp.float32)
    n0 = jnp.asarray(r.normal(size=(batch, heads, dk)), jnp.float32)
    m0 = jnp.asarray(r.normal(size=(batch, heads)), jnp.float32)
    return q, k, v, log_f, log_i, s0, n0, m0


def _check_mlstm(platform, args, reset, chunk, seed, tol_o, tol_g):
    """h and the final (S, n, m) against zoo's loop; gradients w.r.t. q, k, v, both gates and all three
    initial-state parts against autodiff of zoo's scan (mode="sequential")."""
    def kernel(q, k, v, f, i, s0, n0, m0):
        h, state = chunked_mlstm(q, k, v, f, i, (s0, n0, m0), reset=reset, chunk_size=chunk,
                                 platform=platform, interpret=True)
        return (h, *state)

    def zoo(q, k, v, f, i, s0, n0, m0, loop=False):
        fn = matrix.reference if loop else functools.partial(matrix.apply, mode="sequential")
        h, state = fn(q, k, v, f, log_input_gate=i, normalizer="max_abs",
                      initial_state=matrix.MatrixState(s0, n0, m0), reset=reset)
        return (h, *state)

    got = jax.jit(kernel)(*args)
    want = zoo(*args, loop=True)
    for name, a, b in zip("h S n m".split(), got, want, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        _close(a, b, tol_o)
    r = np.random.default_rng(seed + 100)
    weights = [jnp.asarray(r.normal(size=x.shape), jnp.float32) for x in want]
    loss = lambda fn: (lambda *a: sum(jnp.sum(x * w) for x, w in zip(fn(*a), weights, strict=True)))
    grads = jax.jit(jax.grad(loss(kernel), argnums=range(8)))(*args)
    grads_ref = jax.jit(jax.grad(loss(zoo), argnums=range(8)))(*args)
    for name, a, b in zip("q k v log_f log_i S0 n0 m0".split(), grads, grads_ref, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        _close(a, b, tol_g)


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_mlstm_matches_zoo_forward_and_backward(platform):
    """Odd T and widths (V + 1 columns with the key sum), three chunks, resets (none in row 0's first
    chunk, one at a chunk start), an initial (S, n, m)."""
    batch, time = 2, 45
    args = _mlstm_inputs(8, batch, time, 2, 8, 12)
    flags = np.random.default_rng(8).uniform(size=(batch, time)) < 0.1
    flags[0, :16] = False
    flags[1, 16] = True
    _check_mlstm(platform, args, jnp.asarray(flags), 16, 8, 1e-5, 1e-4)


def test_mlstm_large_gates_stay_finite_and_exact():
    """Input gates ~ ±30 and forget gates down to log σ(-30): the stabiliser keeps every exponent <= 0."""
    args = _mlstm_inputs(9, 1, 40, 2, 8, 8, gate_size=12.0)
    _check_mlstm("gpu", args, None, 32, 9, 1e-5, 1e-4)


def test_mlstm_bfloat16_inputs_forward_against_float32_reference_of_the_same_values():
    q, k, v, log_f, log_i, *state = _mlstm_inputs(10, 1, 40, 2, 16, 16)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    h, got = chunked_mlstm(q, k, v, log_f, log_i, tuple(state), chunk_size=16, platform="gpu", interpret=True)
    assert h.dtype == jnp.bfloat16
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    h_ref, want = matrix.reference(*up, log_f, log_input_gate=log_i, normalizer="max_abs",
                                   initial_state=matrix.MatrixState(*state))
    for a, b in zip((h, *got), (h_ref, *want), strict=True):
        _close(a, b, 3e-2)


@pytest.mark.parametrize("bad, error, words", [
    (dict(g=jnp.zeros((1, 8, 2, 5))), ValueError, "g must be"),
    (dict(g=jnp.zeros((1, 8, 2, 4, 1))), ValueError, "g must be"),
    (dict(log_i=jnp.zeros((1, 8, 2, 1))), ValueError, "log_i must be"),
    (dict(log_i=jnp.zeros((1, 8, 2)), g=jnp.zeros((1, 8, 2, 4))), ValueError, "log_f must be"),
    (dict(log_i=jnp.zeros((1, 8, 2)), initial_state=(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 2, 5)), None)),
     ValueError, "initial_state"),
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
        if "log_i" in args:                                       # chunked_mlstm(q, k, v, log_f, log_i, ...)
            chunked_mlstm(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("log_i"),
                          **args)
        else:
            chunked_gla(**args)


def _specs(dtype, per_key=False):
    b, t, h, dk, dv = 2, 100, 2, 64, 128
    sd = jax.ShapeDtypeStruct
    return [sd((b, t, h, dk), dtype), sd((b, t, h, dk), dtype), sd((b, t, h, dv), dtype),
            sd((b, t, h, dk) if per_key else (b, t, h), jnp.float32), sd((b, h, dk, dv), jnp.float32)]


def _forward(*args):
    return chunked_gla(*args)


def _forward_with_reset(*args):
    return chunked_gla(*args, reset=jnp.broadcast_to(jnp.arange(100) % 37 == 0, (2, 100)))


def _forward_backward(*args):
    """Forward and backward, with resets (broadcast over the batch)."""
    (o, s), vjp = jax.vjp(_forward_with_reset, *args)
    return vjp((jnp.ones_like(o), jnp.ones_like(s)))


def _mlstm_forward(q, k, v, log_f, s0):
    return chunked_mlstm(q, k, v, log_f, 2.0 * log_f + 1.0, (s0, None, None),
                         reset=jnp.broadcast_to(jnp.arange(100) % 37 == 0, (2, 100)))


def _mlstm_forward_backward(*args):
    out, vjp = jax.vjp(_mlstm_forward, *args)
    return vjp(jax.tree.map(jnp.ones_like, out))


@pytest.mark.parametrize("fn, calls", [(_mlstm_forward, 1), (_mlstm_forward_backward, 2)])
@pytest.mark.parametrize("target, custom_call", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
def test_mlstm_lowers_to_the_stabilised_kernel(fn, calls, target, custom_call):
    exported = jax.export.export(
        jax.jit(lambda *a: fn(*a)), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs(jnp.bfloat16))
    module = exported.mlir_module()
    assert module.count(custom_call) == calls
    assert "chunked_gla_stabilised" in module


@pytest.mark.parametrize("per_key", [False, True])
@pytest.mark.parametrize("fn, calls", [(_forward, 1), (_forward_backward, 2)])
@pytest.mark.parametrize("target, custom_call", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
def test_the_dispatching_function_lowers_to_the_kernel(fn, calls, target, custom_call, per_key):
    exported = jax.export.export(
        jax.jit(lambda *a: fn(*a)), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs(jnp.bfloat16, per_key))
    module = exported.mlir_module()
    assert module.count(custom_call) == calls
    # The per-key kernels, not the scalar ones, run for a [B, T, H, K] decay.
    assert ("chunked_gla_per_key" in module) == per_key
