"""zoo.parallel.sequence: the diagonal, matrix and delta engines with time split over 4 fake CPU devices
must equal the unsharded engines in outputs, final states and gradients (w.r.t. every input, the
initial state included), with resets inside shards and exactly at shard boundaries.

Needs 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zoo.ops import delta, diagonal, matrix
from zoo.parallel import sequence

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8"),
    pytest.mark.usefixtures("quick_compile"),     # tests/conftest.py
]

B, T, SHARDS = 2, 32, 4          # 8 steps per shard: boundaries at t = 8, 16, 24
H, K, V, D = 2, 4, 3, 3
TOL = 1e-5


def _mesh():
    return jax.make_mesh((SHARDS,), ("sequence",), devices=jax.devices()[:SHARDS])


def _resets():
    """Row 0: a reset inside shard 0 (t=5) and one at the boundary t=16. Row 1: at the boundary t=8
    and inside shard 3 (t=27). Shards without a reset carry their entering state through."""
    reset = np.zeros((B, T), bool)
    reset[0, [5, 16]] = True
    reset[1, [8, 27]] = True
    return jnp.asarray(reset)


def _keys(n):
    return jax.random.split(jax.random.key(7), n)


def _check_equal(sharded, unsharded, inputs, names):
    """Outputs, final state and the gradient of a random readout of both, w.r.t. every input."""
    def loss(fn, *args):
        out, final = fn(*args)
        leaves = jax.tree.leaves((out, final))
        weights = [jax.random.normal(jax.random.key(i + 1), x.shape) for i, x in enumerate(leaves)]
        return sum(jnp.sum(w * x) for w, x in zip(weights, leaves, strict=True)), (out, final)

    argnums = tuple(range(len(inputs)))
    grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=argnums, has_aux=True)
    run = lambda fn: jax.jit(grad(fn))(*inputs)
    (value_s, (out_s, final_s)), grads_s = run(sharded)
    (value_u, (out_u, final_u)), grads_u = run(unsharded)
    np.testing.assert_allclose(out_s, out_u, atol=TOL, rtol=TOL, err_msg="outputs")
    for got, want in zip(jax.tree.leaves(final_s), jax.tree.leaves(final_u), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL, err_msg="final state")
    for name, got, want in zip(names, grads_s, grads_u, strict=True):
        for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert float(jnp.max(jnp.abs(want_part))) > 0, f"the gradient w.r.t. {name} is zero"
            np.testing.assert_allclose(got_part, want_part, atol=TOL, rtol=TOL,
                                       err_msg=f"gradient w.r.t. {name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_equals_unsharded_with_initial_state_and_resets(reverse):
    """Backwards the boundary flags at t = 8 and 16 drop the state carried from the next shard."""
    ka, kb, kh = _keys(3)
    a = jax.nn.sigmoid(jax.random.normal(ka, (B, T, D)) + 1.0)
    b = jax.random.normal(kb, (B, T, D))
    h0 = jax.random.normal(kh, (B, D))
    reset, mesh = _resets(), _mesh()
    sharded = lambda a, b, h0: sequence.diagonal_apply(a, b, mesh=mesh, initial_state=h0, reset=reset,
                                                       reverse=reverse)
    unsharded = lambda a, b, h0: diagonal.apply(a, b, initial_state=h0, reset=reset, reverse=reverse)
    _check_equal(sharded, unsharded, (a, b, h0), ("a", "b", "initial_state"))


def test_diagonal_time_invariant_decay_no_initial_state():
    ka, kb = _keys(2)
    a = jax.nn.sigmoid(jax.random.normal(ka, (D,)) + 2.0)          # [D]: one decay for all steps
    b = jax.random.normal(kb, (B, T, D))
    mesh = _mesh()
    _check_equal(lambda a, b: sequence.diagonal_apply(a, b, mesh=mesh),
                 lambda a, b: diagonal.apply(a, b), (a, b), ("a", "b"))


def test_diagonal_batch_also_sharded_on_an_auto_mesh():
    """A 2 x 4 mesh of Auto axes: batch over "data", time over "seq"; against the plain-loop reference."""
    ka, kb, kh = _keys(3)
    a = jax.nn.sigmoid(jax.random.normal(ka, (B, T, D)) + 1.0)
    b = jax.random.normal(kb, (B, T, D))
    h0 = jax.random.normal(kh, (B, D))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    h, final = jax.jit(lambda a, b, h0: sequence.diagonal_apply(
        a, b, mesh=mesh, axis="seq", batch_axis="data", initial_state=h0, reset=_resets()))(a, b, h0)
    h_ref, final_ref = diagonal.reference(a, b, initial_state=h0, reset=_resets())
    np.testing.assert_allclose(h, h_ref, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(final, final_ref, atol=TOL, rtol=TOL)


def test_inputs_already_split_over_time_on_an_explicit_mesh():
    """Activations that already live split over time (jax.make_mesh's Explicit axes), as in training."""
    ka, kb = _keys(2)
    mesh = _mesh()
    split = NamedSharding(mesh, P(None, "sequence"))
    a = jax.device_put(jax.nn.sigmoid(jax.random.normal(ka, (B, T, D)) + 1.0), split)
    b = jax.device_put(jax.random.normal(kb, (B, T, D)), split)
    h, final = jax.jit(lambda a, b: sequence.diagonal_apply(a, b, mesh=mesh, reset=_resets()))(a, b)
    h_ref, final_ref = diagonal.reference(np.asarray(a), np.asarray(b), reset=_resets())
    np.testing.assert_allclose(h, h_ref, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(final, final_ref, atol=TOL, rtol=TOL)


def _qkv():
    kq, kk, kv, kg, ks = _keys(5)
    q = jax.random.normal(kq, (B, T, H, K))
    k = jax.random.normal(kk, (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(kv, (B, T, H, V))
    return q, k, v, kg, ks


def test_matrix_equals_unsharded_per_key_decay():
    q, k, v, kg, ks = _qkv()
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, H, K)))        # GLA: one decay per key dimension
    s0 = jax.random.normal(ks, (B, H, K, V))
    reset, mesh = _resets(), _mesh()
    sharded = lambda q, k, v, g, s0: sequence.matrix_apply(q, k, v, g, mesh=mesh, initial_state=s0,
                                                           reset=reset)
    unsharded = lambda q, k, v, g, s0: matrix.apply(q, k, v, g, initial_state=s0, reset=reset)
    _check_equal(sharded, unsharded, (q, k, v, g, s0), ("q", "k", "v", "log_decay", "initial_state"))


def test_matrix_sum_normalizer_scalar_decay():
    """The normalised readout is not linear in the state: the pieces are rerun from their entering state."""
    q, k, v, kg, ks = _qkv()
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1                     # positive features: key sums > 0
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, H)))
    s0 = matrix.MatrixState(jnp.abs(jax.random.normal(ks, (B, H, K, V))), jnp.ones((B, H, K)), None)
    reset, mesh = _resets(), _mesh()
    sharded = lambda q, k, v, g, s0: sequence.matrix_apply(q, k, v, g, mesh=mesh, initial_state=s0,
                                                           reset=reset, normalizer="sum")
    unsharded = lambda q, k, v, g, s0: matrix.apply(q, k, v, g, initial_state=s0, reset=reset,
                                                    normalizer="sum")
    _check_equal(sharded, unsharded, (q, k, v, g, s0), ("q", "k", "v", "log_decay", "initial_state"))


def test_matrix_mlstm_input_gate_with_stabilised_state():
    """mLSTM: the exponential input gate with the max-stabiliser m (a max-plus recurrence beside the
    affine one) and the max_abs normaliser, from a MatrixState(S, n, m) with resets. Positive features
    keep the normaliser's denominator away from 0, where the engine's own modes disagree by 1e-4."""
    q, k, v, kg, ks = _qkv()
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    kf, ki, kn, km = jax.random.split(kg, 4)
    g = jax.nn.log_sigmoid(jax.random.normal(kf, (B, T, H)) + 2.0)
    i = 2.0 * jax.random.normal(ki, (B, T, H))
    s0 = matrix.MatrixState(jnp.abs(jax.random.normal(ks, (B, H, K, V))),
                            jnp.abs(jax.random.normal(kn, (B, H, K))), jax.random.normal(km, (B, H)))
    reset, mesh = _resets(), _mesh()
    sharded = lambda q, k, v, g, i, s0: sequence.matrix_apply(q, k, v, g, mesh=mesh, log_input_gate=i,
                                                              normalizer="max_abs", initial_state=s0,
                                                              reset=reset)
    unsharded = lambda q, k, v, g, i, s0: matrix.apply(q, k, v, g, log_input_gate=i, normalizer="max_abs",
                                                       initial_state=s0, reset=reset)
    _check_equal(sharded, unsharded, (q, k, v, g, i, s0), ("q", "k", "v", "log_decay", "log_input_gate",
                                                            "initial_state"))


@pytest.mark.parametrize("case", ["complex_decay", "exclusive_reverse", "max_abs_array_state"])
def test_matrix_options_forward(case):
    """Options the closed-form correction must respect: a complex (GateLoop) decay, the exclusive
    readout (RWKV-6) running backwards, and the max_abs normaliser from a plain array initial state."""
    q, k, v, kg, ks = _qkv()
    g = -jax.nn.softplus(jax.random.normal(kg, (B, T, H)))
    kwargs = {}
    if case == "complex_decay":
        g = g + 1j * jax.random.normal(ks, (B, T, H))
    elif case == "exclusive_reverse":
        kwargs = {"exclusive": True, "reverse": True, "initial_state": jax.random.normal(ks, (B, H, K, V))}
    else:
        kwargs = {"normalizer": "max_abs", "initial_state": jax.random.normal(ks, (B, H, K, V))}
    o, final = sequence.matrix_apply(q, k, v, g, mesh=_mesh(), reset=_resets(), **kwargs)
    o_ref, final_ref = matrix.apply(q, k, v, g, reset=_resets(), **kwargs)
    assert o.dtype == o_ref.dtype
    for got, want in zip(jax.tree.leaves((o, final)), jax.tree.leaves((o_ref, final_ref)), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_delta_equals_unsharded_with_decay():
    q, k, v, kg, ks = _qkv()
    kb, kd = jax.random.split(kg)
    beta = jax.nn.sigmoid(jax.random.normal(kb, (B, T, H)))
    g = -jax.nn.softplus(jax.random.normal(kd, (B, T, H))) / 4
    s0 = jax.random.normal(ks, (B, H, K, V))
    reset, mesh = _resets(), _mesh()
    sharded = lambda q, k, v, beta, g, s0: sequence.delta_apply(q, k, v, beta, g, mesh=mesh, initial_state=s0,
                                                                reset=reset)
    unsharded = lambda q, k, v, beta, g, s0: delta.apply(q, k, v, beta, g, initial_state=s0, reset=reset)
    _check_equal(sharded, unsharded, (q, k, v, beta, g, s0),
                 ("q", "k", "v", "beta", "log_decay", "initial_state"))


def test_delta_reverse_forward_against_reference_without_decay():
    q, k, v, kg, ks = _qkv()
    beta = jax.nn.sigmoid(jax.random.normal(kg, (B, T, H)))
    s0 = jax.random.normal(ks, (B, H, K, V))
    o, final = sequence.apply("delta", q, k, v, beta, mesh=_mesh(), initial_state=s0, reset=_resets(),
                              reverse=True)
    o_ref, final_ref = delta.reference(q, k, v, beta, initial_state=s0, reset=_resets(), reverse=True)
    np.testing.assert_allclose(o, o_ref, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(final, final_ref, atol=TOL, rtol=TOL)


def test_sequence_parallel_wraps_an_engine_apply_with_its_signature():
    """DESIGN.md's form, sequence_parallel(engine_apply, mesh, axis): same call as the engine's apply."""
    a = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (B, T, D)))
    b = jax.random.normal(jax.random.key(4), (B, T, D))
    h, final = sequence.sequence_parallel(diagonal.apply, _mesh())(a, b, reset=_resets())
    h_ref, final_ref = diagonal.reference(a, b, reset=_resets())
    np.testing.assert_allclose(h, h_ref, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(final, final_ref, atol=TOL, rtol=TOL)
    # (real, imag) pairs, as LRU passes them, come back as pairs.
    keys = jax.random.split(jax.random.key(5), 4)
    pair = lambda k, shape: tuple(jax.random.normal(kk, shape) * 0.6 for kk in jax.random.split(k))
    a_pair, b_pair, s0_pair = pair(keys[0], (B, T, D)), pair(keys[1], (B, T, D)), pair(keys[2], (B, D))
    got = sequence.sequence_parallel(diagonal.apply, _mesh())(a_pair, b_pair, initial_state=s0_pair,
                                                              reset=_resets())
    want = diagonal.reference(a_pair, b_pair, initial_state=s0_pair, reset=_resets())
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL)
    from zoo.ops import nonlinear
    with pytest.raises(ValueError, match="cannot be split along time"):
        sequence.sequence_parallel(nonlinear.apply, _mesh())
    with pytest.raises(ValueError, match="engine_apply"):
        sequence.sequence_parallel(jnp.cumsum, _mesh())


# --------------------------------------------------------------------------------------------
# Errors.


def test_nonlinear_engine_cannot_be_split_along_time():
    with pytest.raises(ValueError, match="nonlinear.*cannot be split along time"):
        sequence.apply("nonlinear", None, mesh=_mesh())
    with pytest.raises(ValueError, match="unknown engine 'softmax_typo'"):
        sequence.check_engine("softmax_typo")


def test_bad_inputs_name_the_argument_and_shapes():
    mesh = _mesh()
    b = jnp.ones((B, 30, D))
    with pytest.raises(ValueError, match=r"b has shape \(2, 30, 3\): T = 30 .* 4 devices of mesh axis 'seq"):
        sequence.diagonal_apply(b, b, mesh=mesh)
    q = jnp.ones((B, 30, H, K))
    with pytest.raises(ValueError, match=r"q has shape \(2, 30, 2, 4\): T = 30"):
        sequence.delta_apply(q, q, q[..., :V], q[..., 0], mesh=mesh)
    b = jnp.ones((B, T, D))
    with pytest.raises(ValueError, match="axis='time' is not an axis of the mesh"):
        sequence.diagonal_apply(b, b, mesh=mesh, axis="time")
    with pytest.raises(ValueError, match="batch_axis='data'"):
        sequence.diagonal_apply(b, b, mesh=mesh, batch_axis="data")
    with pytest.raises(ValueError, match="initial_state must have shape"):      # the engine's own check
        sequence.diagonal_apply(b, b, mesh=mesh, initial_state=jnp.ones((B, D + 1)))
    q = jnp.ones((B, T, H, K))
    with pytest.raises(ValueError, match="log_input_gate with reverse=True"):
        sequence.matrix_apply(q, q, q, q[..., 0], mesh=mesh, log_input_gate=q[..., 0], reverse=True)
