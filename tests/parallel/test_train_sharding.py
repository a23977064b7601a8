"""zoo.parallel.make_mesh, the partition rules and shard_train_step on 8 fake CPU devices.

A sharded train step (data parallel, FSDP, tensor parallel, and all three at once) must give the
losses and params of the unsharded step within 1e-5 for a model of each engine family, and the rules
must give every registered model's params specs that divide their shapes.

Needs 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zoo
from zoo.nn import SequenceModel
from zoo.parallel.mesh import AXES, make_mesh
from zoo.parallel.rules import Shard, default_rules, param_specs, path_name
from zoo.parallel.sequence import sharded_time
from zoo.parallel.train import shard_batch, shard_train_step
from zoo.train import classification_loss, make_train_step

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8"),
    pytest.mark.usefixtures("quick_compile"),     # tests/conftest.py
]

VOCAB, B, T, STEPS = 8, 8, 8, 3
D_MODEL, MLP_RATIO = 16, 3          # swiglu hidden width 2/3 * 3 * 16 = 32: divisible by every axis
# Sharding changes the order of float32 sums (gradients summed over devices, matmuls split over K):
# differences of a few ulps per step, far inside 1e-5 after 3 Adam steps.
TOL = 1e-5
# Adam's eps, well above optax's 1e-8. Adam's update lr * g / (|g| + eps) turns the ulp-level difference
# of a gradient that cancels to ~eps into a difference of order lr: griffin's w_up[15, 5] has a first
# gradient of -1.9e-8 (the matrix's median is 2.5e-3), and with eps 1e-8 the sharded step moved it by
# 3e-5 more than the unsharded one; on other runs a flipped sign moved the second loss by ~8e-3. With
# eps 1e-3 the update's sensitivity to g is at most lr / eps = 10, so ulps of g stay ulps.
ADAM_EPS = 1e-3
RULES = default_rules(min_size=0)   # tiny test models: shard every param that divides, however small

# One model of each engine family (every engine of zoo.list_models()), with tiny configs (d_model
# comes from SequenceModel). Those in SLOW_FAMILIES run only with -m slow (compile-bound cases).
FAMILIES = {
    "nonlinear": ("lstm", {}),
    "diagonal": ("lru", {"d_state": 8}),
    "matrix": ("retnet", {}),
    "delta": ("deltanet", {}),
    "selective": ("mamba", {"d_state": 4}),
    "ssd": ("mamba2", {}),
    "lti": ("s4d", {}),
    "fast_weights": ("ttt_linear", {}),
    "softmax_scan": ("aaren", {}),
    "diagonal+softmax": ("griffin", {}),
    "selective+softmax": ("samba", {}),
    "softmax+nonlinear": ("block_recurrent", {}),
}

MESHES = {
    "data": dict(data=8),
    "fsdp": dict(fsdp=8),
    "tensor": dict(data=2, tensor=4),
    "data_fsdp_tensor": dict(data=2, fsdp=2, tensor=2),
}


def tree_specs(specs):
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


def build(family):
    mixer, config = FAMILIES[family]
    model = SequenceModel(mixer, vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, d_output=VOCAB,
                          mixer_config=config, mlp_ratio=MLP_RATIO, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2, eps=ADAM_EPS), wrt=nnx.Param)


def batches():
    rng = np.random.default_rng(0)
    return [{"inputs": rng.integers(0, VOCAB, (B, T)).astype(np.int32),
             "targets": rng.integers(0, VOCAB, (B, T)).astype(np.int32),
             "mask": rng.random((B, T)) < 0.8,
             "reset": rng.random((B, T)) < 0.1} for _ in range(STEPS)]


def params_as_numpy(model):
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {path_name(path): np.asarray(x) for path, x in leaves}


@functools.cache
def unsharded_run(family):
    """Losses and final params of STEPS unsharded steps (one device, the loop's own jitted step)."""
    model, optimizer = build(family)
    step = make_train_step(classification_loss)
    losses = [float(step(model, optimizer, batch)["loss"]) for batch in batches()]
    return losses, params_as_numpy(model)


def plain_train_step(model, optimizer, batch):
    """The train step written without nnx.jit: shard_train_step jits it."""
    (_, metrics), grads = nnx.value_and_grad(classification_loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return metrics


SLOW_FAMILIES = ("ssd", "lti", "fast_weights", "softmax_scan", "diagonal+softmax", "selective+softmax",
                 "softmax+nonlinear")


# XLA's SPMD partitioner (jaxlib 0.10.2, Shardy, CPU) computes a wrong backward for block_recurrent's
# token path once w_qkvq is column-sharded and w_o row-sharded, as the FSDP rules do on this mesh: the
# forward and the first loss agree, the gradients differ by O(1). test_xla_partitioner_backward_bug
# below is the same pattern in ten lines of plain JAX.
XLA_PARTITIONER_BUG = ("softmax+nonlinear",)


def _marks(family):
    marks = [pytest.mark.slow] if family in SLOW_FAMILIES else []
    if family in XLA_PARTITIONER_BUG:
        marks.append(pytest.mark.xfail(reason="XLA SPMD partitioner bug: test_xla_partitioner_backward_bug",
                                       raises=AssertionError, strict=False))
    return marks


CASES = [pytest.param("data_fsdp_tensor", family, marks=_marks(family)) for family in FAMILIES]
CASES += [("data", "nonlinear"), ("fsdp", "diagonal"), ("tensor", "matrix")]


@pytest.mark.parametrize(("mesh_name", "family"), CASES)
def test_sharded_train_step_equals_unsharded_step(mesh_name, family):
    mixer, _ = FAMILIES[family]
    assert zoo.list_models()[mixer].engine == family
    mesh = make_mesh(**MESHES[mesh_name])
    model, optimizer = build(family)
    specs = param_specs(nnx.split((model, optimizer))[1], mesh, RULES)
    used = {axis for spec in tree_specs(specs) for entry in spec if entry
            for axis in ((entry,) if isinstance(entry, str) else entry)}
    # The parallelism under test really shards something (and params never split over data).
    assert used == {a for a in ("fsdp", "tensor") if mesh.shape[a] > 1}, used

    step_fn = plain_train_step if mesh_name == "data" else make_train_step(classification_loss)
    step = shard_train_step(step_fn, mesh, RULES)
    losses = []
    for batch in batches():
        losses.append(float(step(model, optimizer, batch)["loss"]))    # blocks every step (ENV-NOTES §4)

    want_losses, want_params = unsharded_run(family)
    np.testing.assert_allclose(losses, want_losses, rtol=0, atol=TOL)
    got_params = params_as_numpy(model)
    assert got_params.keys() == want_params.keys()
    for name, want in want_params.items():
        np.testing.assert_allclose(got_params[name], want, rtol=0, atol=TOL, err_msg=name)

    # The state stays laid out as the rules say: params and Adam's moments.
    state = nnx.split((model, optimizer))[1]
    for array, spec in zip(jax.tree.leaves(state), tree_specs(specs), strict=True):
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (spec, array.sharding)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="XLA SPMD partitioner bug in jaxlib 0.10.2 (CPU, Shardy): when it passes, drop "
                   "this mark and XLA_PARTITIONER_BUG above")
def test_xla_partitioner_backward_bug():
    """Upstream, not zoo: four column blocks of one column-sharded product, two multiplied, one through
    two einsums with fixed arrays, concatenated along a heads axis and fed to a row-sharded product.
    The sharded forward equals the unsharded one; the gradient wrt the second weight does not (off by
    ~60 here). This is the shape of block_recurrent's token path (w_qkvq, the attention, w_o)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("f",))
    batch, heads, width, slots = 8, 2, 8, 4
    keys = jax.random.split(jax.random.key(0), 6)
    x, w = jax.random.normal(keys[0], (batch, 16)), jax.random.normal(keys[1], (batch, 16))
    w_in, w_out = jax.random.normal(keys[2], (16, 64)) / 4, jax.random.normal(keys[3], (32, 16)) / 4
    mem_k, mem_v = (jax.random.normal(k, (batch, slots, heads, width)) for k in keys[4:])

    def loss(w_in, w_out):
        a, b, _, d = (part.reshape(batch, heads, width) for part in jnp.split(x @ w_in, 4, axis=-1))
        scores = jnp.einsum("bqhk,bshk->bhqs", d[:, None], mem_k)
        read = jnp.einsum("bhqs,bshv->bqhv", scores, mem_v)[:, 0]
        z = jnp.concatenate([a * b, read], axis=-2).reshape(batch, 2 * heads * width)
        return jnp.sum((z @ w_out) * w)

    shardings = (NamedSharding(mesh, P(None, "f")), NamedSharding(mesh, P("f", None)))
    placed = [jax.device_put(a, s) for a, s in zip((w_in, w_out), shardings, strict=True)]
    np.testing.assert_allclose(jax.jit(loss, in_shardings=shardings)(*placed), loss(w_in, w_out), rtol=1e-5)
    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(w_in, w_out)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=shardings)(*placed)
    for g, g_want in zip(got, want, strict=True):
        np.testing.assert_allclose(g, g_want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["diagonal", "matrix", "delta"])
def test_sequence_parallel_train_step_equals_unsharded_step(family):
    """The whole training step traced under sharded_time: the model's engine calls split time over
    the "sequence" axis (2 steps per shard), the batch over "data"; losses and params equal the
    unsharded run's."""
    mesh = make_mesh(data=2, sequence=4)
    model, optimizer = build(family)
    with sharded_time(mesh, "sequence", batch_axis="data"):
        jaxpr = str(jax.make_jaxpr(lambda batch: classification_loss(model, batch)[0])(batches()[0]))
        assert "shard_map" in jaxpr, "the engine calls are not sequence-parallel"
        step = shard_train_step(make_train_step(classification_loss), mesh, RULES)
        losses = [float(step(model, optimizer, batch)["loss"]) for batch in batches()]
    want_losses, want_params = unsharded_run(family)
    np.testing.assert_allclose(losses, want_losses, rtol=0, atol=TOL)
    got_params = params_as_numpy(model)
    for name, want in want_params.items():
        np.testing.assert_allclose(got_params[name], want, rtol=0, atol=TOL, err_msg=name)


def param_shapes(name):
    """``rec.init(key, 16)`` as shapes; s5 builds its init with numpy, so that one runs for real."""
    rec = zoo.get(name)
    try:
        return jax.eval_shape(lambda: rec.init(jax.random.key(0), 16))
    except jax.errors.TracerArrayConversionError:
        return rec.init(jax.random.key(0), 16)


def test_every_registered_model_gets_specs_that_divide_its_params():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sizes = dict(mesh.shape)
    for name in zoo.list_models():
        params = param_shapes(name)
        specs = param_specs(params, mesh, RULES)
        n_sharded = 0
        for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], tree_specs(specs),
                                      strict=True):
            where = f"{name} {jax.tree_util.keystr(path)} {leaf.shape} {spec}"
            assert len(spec) <= leaf.ndim, where
            axes_of_dims = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
            flat = [a for axes in axes_of_dims for a in axes]
            assert len(flat) == len(set(flat)) and set(flat) <= {"fsdp", "tensor"}, where
            shard_shape = list(leaf.shape)
            for dim, axes in enumerate(axes_of_dims):
                divisor = math.prod(sizes[a] for a in axes)
                assert leaf.shape[dim] % divisor == 0, where
                shard_shape[dim] //= divisor
            n_sharded += bool(flat)
            # JAX agrees on the shape of each shard.
            assert NamedSharding(mesh, spec).shard_shape(leaf.shape) == tuple(shard_shape), where
        assert n_sharded > 0, f"{name}: no param is sharded on {sizes}"


def test_small_params_are_replicated_and_fsdp_takes_the_largest_divisible_dimension():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shard = Shard(tensor_dim=-1, min_size=100)
    assert shard((96,), mesh) == P(None)                     # below min_size
    assert shard((4, 6, 10), mesh) == P(None, "fsdp", "tensor")
    assert shard((12, 9), mesh) == P("fsdp", None)            # 9 is not divisible: no tensor
    assert shard((3, 5, 7, 9), mesh) == P(None, None, None, None)   # nothing divides: replicated
    assert Shard(tensor_dim=0, min_size=0)((6, 8), mesh) == P("tensor", "fsdp")
    assert Shard(tensor_dim=-2, min_size=0)((8,), mesh) == P("fsdp")   # vectors: no tensor parallelism


def test_user_rules_first_match_wins_and_bad_specs_are_rejected():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = {"mixer": {"w_q": np.zeros((8, 6)), "w_o": np.zeros((6, 8))}, "head": {"bias": np.zeros(8)},
              "count": np.zeros(())}
    rules = [(r"w_q$", P(None, "tensor")), (r"mixer/", P("fsdp")), (r"w_o$", P(None, "tensor"))]
    specs = param_specs(params, mesh, rules)
    assert specs == {"mixer": {"w_q": P(None, "tensor"), "w_o": P("fsdp")}, "head": {"bias": P(None)},
                     "count": P()}
    with pytest.raises(ValueError, match=r"mixer/w_q with shape \(8, 6\).*not divisible"):
        param_specs(params, mesh, [(r"w_q$", P(None, ("fsdp", "tensor")))])
    with pytest.raises(ValueError, match="not in the mesh"):
        param_specs(params, mesh, [(r"w_q$", P("model"))])
    with pytest.raises(ValueError, match="2 entries for 1 dimensions"):
        param_specs(params, mesh, [(r"bias$", P("fsdp", None))])
    with pytest.raises(ValueError, match="more than one dimension"):
        param_specs(params, mesh, [(r"w_o$", P("fsdp", "fsdp"))])
    assert param_specs(params, mesh, dict(rules)) == specs
    with pytest.raises(TypeError, match=r"\(regex, PartitionSpec or callable\) pair"):
        param_specs(params, mesh, [r"w_o$", P("fsdp")])


def test_make_mesh_names_every_axis_and_rejects_sizes_that_do_not_match_the_devices():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert make_mesh(sequence=4, devices=jax.devices()[:4]).shape["sequence"] == 4
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 x tensor=2 x sequence=1 = 6 .* 8 devices"):
        make_mesh(data=3, tensor=2)
    with pytest.raises(ValueError, match="fsdp must be >= 1"):
        make_mesh(fsdp=0, data=8)
    with pytest.raises(TypeError, match="tensor must be an int"):
        make_mesh(tensor=2.0)


def test_batch_not_divisible_by_the_batch_axes_is_rejected():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match=r"batch leaf \['inputs'\] has shape \(6, 8\).*4 shards"):
        shard_batch({"inputs": np.zeros((6, 8), np.int32)}, mesh)
    placed = shard_batch({"inputs": np.arange(64).reshape(8, 8)}, mesh)["inputs"]
    assert placed.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 8)}
