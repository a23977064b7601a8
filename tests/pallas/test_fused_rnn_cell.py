"""pallas_kernels.fused_rnn_cell: the Pallas kernels (interpret mode on CPU) against zoo's models run by
the nonlinear engine with the model's own step / cell (``nonlinear.reference``, the plain loop, and
JAX autodiff of ``nonlinear.apply(mode="sequential")`` for gradients), and their lowering for TPU and
CUDA.

LSTM and GRU are checked end to end as the engine would dispatch: x_pre = x @ w_in + bias in XLA, the
kernel for the recurrence, gradients w.r.t. the raw input, every parameter and the initial state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_rnn_cell import fits_on_chip, fused_rnn_cell, fused_rnn_cell_reference, gpu
from zoo.models import gru, lstm, slstm
from zoo.ops import nonlinear

TRITON = "__gpu$xla.gpu.triton"
# Interpret-mode kernels on small shapes, checked for values: compiled without XLA's optimisation
# passes (tests/conftest.py), which is most of what these tests spend.
pytestmark = pytest.mark.usefixtures("quick_compile")
F32 = jnp.float32


def _close(got, want, tol, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err < tol, f"{name}: relative max error {err:.2e} >= {tol:.0e}"


def _resets(seed, batch, time):
    """Resets at random steps, at t = 0 of row 1, none in row 0 (so the initial state matters)."""
    flags = np.random.default_rng(seed).uniform(size=(batch, time)) < 0.15
    flags[0] = False
    flags[1 % batch, 0] = True
    return jnp.asarray(flags)


# --------------------------------------------------------------------------------------------
# The models' cells as the engine runs them, and the same computation through the kernel.


def _randomise(params, seed):
    """Non-zero biases and peepholes (init leaves them zero), so that their paths are exercised."""
    r = np.random.default_rng(seed)
    return {k: (jnp.asarray(r.normal(size=v.shape) * 0.5, F32) if k.startswith(("peep", "bias")) else v)
            for k, v in params.items()}


def _model_case(cell, seed, batch, time, d, variant="vanilla"):
    """(kernel_fn, reference_fn, args): both map (xs, params, state) -> (hs, final state)."""
    r = np.random.default_rng(seed)
    if cell == "slstm":
        heads = 2
        dh = d // heads
        params = {"r": jnp.asarray(r.uniform(-1, 1, size=(heads, dh, 4, dh)) / np.sqrt(d), F32)}
        xs = jnp.asarray(r.normal(size=(batch, time, 4, d)), F32)
        state = (jnp.asarray(r.normal(size=(batch, d)), F32), jnp.asarray(r.normal(size=(batch, d)), F32),
                 jnp.asarray(r.uniform(0.5, 2.0, size=(batch, d)), F32),
                 jnp.asarray(r.normal(size=(batch, d)), F32))
        model_cell = slstm.make_cell("sigmoid")

        def to_kernel(xs, params):
            return xs, params["r"], {}
    else:
        if cell == "lstm":
            rec = lstm.build(lstm.LSTMConfig(d_model=d, variant=variant))
        else:
            rec = gru.build(gru.GRUConfig(d_model=d, reset_after=cell == "gru_reset_after"))
        d_in = d + 3
        params = _randomise(rec.init(jax.random.PRNGKey(seed), d_in), seed)
        xs = jnp.asarray(r.normal(size=(batch, time, d_in)), F32)
        state = jax.tree.map(lambda s: jnp.asarray(r.normal(size=s.shape), F32),
                             rec.initial_state(params, batch))
        model_cell = lambda p, h, x_t: rec.step(p, h, x_t)

        def to_kernel(xs, params):
            p = {k: v.astype(xs.dtype) for k, v in params.items()}
            if cell == "gru_reset_after":                      # the hoisted input projection
                return xs @ p["w_in"] + p["bias_in"], p["w_rec"], {"b_rec": p["bias_rec"]}
            x_pre = xs @ p["w_in"] + p["bias"]
            kw = {}
            if cell == "lstm" and variant == "vanilla":
                kw["peepholes"] = jnp.stack([params["peep_i"], params["peep_f"], params["peep_o"]])
            return x_pre, p["w_rec"], kw
    return model_cell, to_kernel, (xs, params, state)


def _loss(fn, seed, reset):
    """A scalar weighing every output and final-state entry differently."""
    def loss(xs, params, state):
        hs, final = fn(xs, params, state, reset)
        r = np.random.default_rng(seed + 1)
        leaves = [hs, *jax.tree.leaves(final)]
        total = sum(jnp.sum(a.astype(F32) * jnp.asarray(r.normal(size=a.shape), F32)) for a in leaves)
        return total, (hs, final)
    return loss


def _kernel_fn(cell, to_kernel, **options):
    def fn(xs, params, state, reset):
        x_pre, w_rec, kw = to_kernel(xs, params)
        return fused_rnn_cell(cell, x_pre, w_rec, state, reset=reset, interpret=True, **options, **kw)
    return fn


def _sequential_fn(model_cell):
    """The engine's lax.scan over the model's cell (fast to compile; JAX's scan transpose)."""
    cell = lambda p, h, x_t: model_cell(p, h, x_t)       # a plain callable: the generic scan
    def fn(xs, params, state, reset):
        return nonlinear.apply(cell, params, xs, initial_state=state, reset=reset, mode="sequential")
    return fn


def _compare(cell, seed, batch, time, d, tol, dtype=F32, variant="vanilla", runs=({},), loop=False):
    """Each of ``runs`` (kernel options) against the model: forward and gradients vs autodiff of the
    engine's sequential scan of the model's cell; with ``loop``, that scan's forward is first checked
    against ``nonlinear.reference`` (the plain loop over time)."""
    model_cell, to_kernel, args = _model_case(cell, seed, batch, time, d, variant)
    reset = _resets(seed, batch, time)
    if dtype != F32:       # the kernel gets bf16 inputs; the reference the same values in float32
        xs, params, state = args
        rounded = jax.tree.map(lambda a: a.astype(dtype).astype(F32), (xs, params))
        args = (xs.astype(dtype), jax.tree.map(lambda a: a.astype(dtype), params), state)
        ref_args = (*rounded, state)
    else:
        ref_args = args
    grad = lambda fn: jax.jit(jax.value_and_grad(_loss(fn, seed, reset), argnums=(0, 1, 2), has_aux=True))
    (_, (hs_ref, final_ref)), grads_ref = grad(_sequential_fn(model_cell))(*ref_args)
    if loop:
        plain = lambda xs, params, state: nonlinear.reference(model_cell, params, xs, initial_state=state,
                                                              reset=reset)
        hs_loop, final_loop = jax.jit(plain)(*ref_args)
        for got, want in zip(jax.tree.leaves((hs_ref, final_ref)), jax.tree.leaves((hs_loop, final_loop)),
                             strict=True):
            _close(got, want, 1e-6, "engine scan vs loop")
    for options in runs:
        (_, (hs, final)), grads = grad(_kernel_fn(cell, to_kernel, **options))(*args)
        assert hs.dtype == args[0].dtype and all(s.dtype == F32 for s in jax.tree.leaves(final))
        _close(hs, hs_ref, tol, f"hs {options}")
        assert jax.tree.structure(final) == jax.tree.structure(final_ref)
        for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(final_ref), strict=True):
            _close(got, want, tol, f"final state {options}")
        names = ["xs", "params", "initial_state"]
        for name, got, want in zip(names, grads, grads_ref, strict=True):
            flat, _ = jax.tree.flatten_with_path(want)
            for (path, w), g in zip(flat, jax.tree.leaves(got), strict=True):
                _close(g, w, 10 * tol, f"d {name}{jax.tree_util.keystr(path)} {options}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_reset_after", "slstm"])
def test_kernels_match_zoo_models_forward_and_gradients(cell):
    """Both kernel bodies; odd length (padded time blocks), odd width (padded channels), resets, random
    initial states, non-zero biases and peepholes; gradients of every input and parameter."""
    _compare(cell, 0, 3, 13, 6, 2e-5, runs=(dict(platform="gpu"), dict(platform="tpu", time_block=8)),
             loop=True)


def test_several_batch_tiles_through_platform_dependent_dispatch():
    """platform=None (cpu: the Triton body in interpret mode) with two batch tiles of 16; the TPU body
    with two batch tiles and time blocks of 2."""
    _compare("gru", 1, 17, 5, 12, 2e-5, runs=(dict(batch_block=16), dict(platform="tpu", batch_block=16,
                                                                         time_block=2)))


def test_lstm_without_peepholes_is_the_np_variant():
    _compare("lstm", 2, 2, 9, 8, 2e-5, variant="np", runs=(dict(platform="tpu", time_block=4),))


def test_gpu_kernel_with_the_weight_read_each_step(monkeypatch):
    """Above the resident budget the Triton kernel reads W_g and accumulates dW through its refs."""
    monkeypatch.setattr(gpu, "RESIDENT_BYTES", 0)
    assert not gpu.resident("lstm", 16, 4)
    _compare("lstm", 3, 2, 7, 5, 2e-5, runs=(dict(platform="gpu"),))


@pytest.mark.parametrize("cell, platform", [("lstm", "tpu"), ("gru", "gpu"), ("gru_reset_after", "tpu"),
                                            ("slstm", "gpu")])
def test_bfloat16_inputs_against_float32_reference_of_the_same_values(cell, platform):
    _compare(cell, 4, 3, 11, 8, 3e-2, dtype=jnp.bfloat16, runs=(dict(platform=platform, time_block=4),))


def test_slstm_exponential_forget_gate():
    r = np.random.default_rng(5)
    batch, time, d = 2, 10, 8
    x = jnp.asarray(r.normal(size=(batch, time, 4, d)), F32).at[:, :, 1].add(-1.0)
    w = jnp.asarray(r.uniform(-0.3, 0.3, size=(4, 2, 4, 2)), F32)
    state = tuple(jnp.zeros((batch, d), F32) for _ in range(4))
    cell = slstm.make_cell("exp")

    def loss(fn):
        return lambda x, w: sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(fn(x, w)))

    kernel = lambda x, w: fused_rnn_cell("slstm", x, w, state, forget_gate="exp", platform="tpu",
                                         interpret=True, time_block=4)
    loop = lambda x, w: nonlinear.reference(cell, {"r": w}, x, initial_state=state)
    scan = lambda x, w: nonlinear.apply(cell, {"r": w}, x, initial_state=state, mode="sequential")
    got_all, want_all = jax.tree.leaves(jax.jit(kernel)(x, w)), jax.tree.leaves(jax.jit(loop)(x, w))
    for got, want in zip(got_all, want_all, strict=True):
        _close(got, want, 2e-5)
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(x, w)
    grads_ref = jax.jit(jax.grad(loss(scan), argnums=(0, 1)))(x, w)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 2e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_reset_after", "slstm"])
def test_folder_reference_agrees_with_zoo_models(cell):
    """reference.py (no zoo import) computes the models' recurrences."""
    model_cell, to_kernel, (xs, params, state) = _model_case(cell, 6, 2, 6, 4)
    reset = _resets(6, 2, 6)
    x_pre, w_rec, kw = to_kernel(xs, params)
    got = fused_rnn_cell_reference(cell, x_pre, w_rec, state, reset=reset, **kw)
    want = nonlinear.reference(model_cell, params, xs, initial_state=state, reset=reset)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close(g, w, 1e-5)


def test_fits_on_chip_limits():
    bf16 = jnp.bfloat16
    assert fits_on_chip("lstm", 64, bf16, "gpu") and not fits_on_chip("lstm", 128, bf16, "gpu")
    assert fits_on_chip("lstm", 512, bf16, "tpu") and not fits_on_chip("lstm", 1024, bf16, "tpu")


def _lstm_args(**bad):
    args = dict(cell="lstm", x_pre=jnp.zeros((2, 5, 16)), w_rec=jnp.zeros((4, 16)),
                initial_state={"h": jnp.zeros((2, 4)), "c": jnp.zeros((2, 4))})
    args.update(bad)
    return args


@pytest.mark.parametrize("bad, error, words", [
    (dict(cell="rnn"), ValueError, "cell="),
    (dict(x_pre=jnp.zeros((2, 5, 15))), ValueError, "x_pre must be"),
    (dict(w_rec=jnp.zeros((4, 12))), ValueError, "w_rec must be"),
    (dict(initial_state={"h": jnp.zeros((2, 4))}), ValueError, "initial_state"),
    (dict(initial_state={"h": jnp.zeros((2, 5)), "c": jnp.zeros((2, 5))}), ValueError, "initial_state"),
    (dict(x_pre=jnp.zeros((2, 5, 16), jnp.float16)), TypeError, "x_pre must be float32"),
    (dict(reset=jnp.zeros((2, 5), jnp.int32)), ValueError, "reset must be"),
    (dict(peepholes=jnp.zeros((3, 5))), ValueError, "peepholes"),
    (dict(platform="cuda"), ValueError, "platform"),
    (dict(batch_block=24), ValueError, "batch_block"),
    (dict(b_rec=jnp.zeros((12,))), ValueError, "b_rec"),
    (dict(cell="slstm", x_pre=jnp.zeros((2, 5, 4, 4)), w_rec=jnp.zeros((4, 16))), ValueError,
     "w_rec must be"),
    (dict(cell="gru", x_pre=jnp.zeros((2, 5, 12)), w_rec=jnp.zeros((4, 12)), initial_state=jnp.zeros((3, 4))),
     ValueError, "initial_state"),
])
def test_bad_arguments_are_named(bad, error, words):
    with pytest.raises(error, match=words):
        fused_rnn_cell(**_lstm_args(**bad))


# --------------------------------------------------------------------------------------------
# Lowering for TPU (Mosaic) and CUDA (Triton), forward and forward + backward.


def _specs(cell, d, dtype):
    b, t = 16, 100
    sd = jax.ShapeDtypeStruct
    if cell == "slstm":
        state = tuple(sd((b, d), F32) for _ in range(4))
        return [sd((b, t, 4, d), dtype), sd((4, d // 4, 4, d // 4), F32), state]
    gates = 4 if cell == "lstm" else 3      # gru_reset_after lowers with b_rec = None (zeros)
    state = {"h": sd((b, d), F32), "c": sd((b, d), F32)} if cell == "lstm" else sd((b, d), F32)
    return [sd((b, t, gates * d), dtype), sd((d, gates * d), dtype), state]


def _forward_backward(cell, platform):
    def fn(x, w, s):
        reset = jnp.broadcast_to(jnp.arange(100) % 37 == 0, (16, 100))
        out, vjp = jax.vjp(lambda *a: fused_rnn_cell(cell, *a, reset=reset, platform=platform), x, w, s)
        return vjp(jax.tree.map(jnp.ones_like, out))
    return fn


# D = 128 bf16 LSTM: the GPU kernel reads W each step (above RESIDENT_BYTES); GRU D = 32: W resident.
@pytest.mark.parametrize("cell, d", [("lstm", 128), ("gru", 32), ("gru_reset_after", 16), ("slstm", 64)])
@pytest.mark.parametrize("platform, target, custom_call", [("tpu", "tpu", "tpu_custom_call"),
                                                           ("gpu", "cuda", TRITON)])
def test_forward_and_backward_lower_to_the_kernels(cell, d, platform, target, custom_call):
    exported = jax.export.export(
        jax.jit(_forward_backward(cell, platform)), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs(cell, d, jnp.bfloat16))
    assert exported.mlir_module().count(custom_call) == 2


@pytest.mark.parametrize("target, custom_call", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
def test_the_dispatching_function_lowers_forward_only_to_one_kernel(target, custom_call):
    exported = jax.export.export(
        jax.jit(lambda x, w, s: fused_rnn_cell("lstm", x, w, s)), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs("lstm", 32, F32))
    assert exported.mlir_module().count(custom_call) == 1
