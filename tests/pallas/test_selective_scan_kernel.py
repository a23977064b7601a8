"""pallas_kernels.selective_scan: the Pallas kernels (interpret mode on CPU) against zoo's selective
engine (``selective.reference``, a plain loop over time, forward; autodiff of the engine's
``selective_scan``, backward), and their lowering for TPU and CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import selective_scan, selective_scan_reference
from zoo.ops import selective

TRITON = "__gpu$xla.gpu.triton"
# Interpret-mode kernels on small shapes, checked for values: compiled without XLA's optimisation
# passes (tests/conftest.py), which is most of what these tests spend.
pytestmark = pytest.mark.usefixtures("quick_compile")
NAMES = "u delta A B C D z delta_bias initial_state".split()


def _inputs(seed, batch, d, time, n, groups=None, dtype=jnp.float32):
    """u, delta, A, B, C, D, z, delta_bias, initial_state (random; A < 0 as in Mamba)."""
    r = np.random.default_rng(seed)
    seq = lambda scale=1.0: jnp.asarray(r.normal(size=(batch, d, time)) * scale, dtype)
    bc_shape = (batch, n, time) if groups is None else (batch, groups, n, time)
    return dict(u=seq(), delta=seq(0.7), A=-jnp.asarray(r.uniform(0.3, 2.0, size=(d, n)), jnp.float32),
                B=jnp.asarray(r.normal(size=bc_shape), dtype), C=jnp.asarray(r.normal(size=bc_shape), dtype),
                D=jnp.asarray(r.normal(size=(d,)), jnp.float32), z=seq(),
                delta_bias=jnp.asarray(r.normal(size=(d,)) * 0.5, jnp.float32),
                initial_state=jnp.asarray(r.normal(size=(batch, d, n)), jnp.float32))


def _resets(seed, batch, time):
    r = np.random.default_rng(seed + 50)
    flags = r.uniform(size=(batch, time)) < 0.1
    flags[0, :] = False                    # row 0 keeps its initial state (its gradient is not zero)
    flags[0, min(16, time - 1)] = True     # a reset at a time-tile boundary (tile 16)
    if batch > 1:
        flags[1, 0] = True                 # the initial state is dropped at once
    return jnp.asarray(flags)


def _close(got, want, tol, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err < tol, f"{name}: relative max error {err:.2e} >= {tol:.0e}"


def _loss(fn, seed, shape_out, shape_state):
    """A scalar weighing every output and final-state entry differently (random cotangents)."""
    r = np.random.default_rng(seed + 100)
    w_out = jnp.asarray(r.normal(size=shape_out), jnp.float32)
    w_state = jnp.asarray(r.normal(size=shape_state), jnp.float32)

    def loss(*args):
        out, state = fn(*args)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state)
    return loss


@functools.cache
def _case(name):
    """(arrays, options, float32 copies of the arrays) of a named case (bfloat16 cases are checked
    against float32 references on the same rounded values)."""
    batch, d, time, n, groups, dtype, with_options = CASES[name]
    args = _inputs(len(name), batch, d, time, n, groups, dtype)
    if with_options:
        options = dict(delta_softplus=True, reset=_resets(len(name), batch, time))
    else:
        args = {k: args[k] for k in ("u", "delta", "A", "B", "C")}
        args["delta"] = jnp.abs(args["delta"]) * 0.3     # Δ > 0 without softplus
        options = {}
    return args, options, {k: v.astype(jnp.float32) for k, v in args.items()}


@functools.cache
def _zoo_results(name):
    """zoo's answers for a case, computed once for both kernel bodies: the forward of
    ``selective.reference`` (a loop over time) and the gradients of the engine (autodiff of
    ``mode="sequential"``)."""
    args, options, reference_args = _case(name)
    names = [k for k in NAMES if k in args]
    want = selective.reference(**reference_args, **options, return_final_state=True)

    def zoo(*xs):
        return selective.selective_scan(**dict(zip(names, xs, strict=True)), **options, mode="sequential",
                                        return_final_state=True)

    loss = _loss(zoo, len(name), want[0].shape, want[1].shape)
    grads = jax.jit(jax.grad(loss, argnums=range(len(names))))(*(reference_args[k] for k in names))
    return want, grads


def _check_against_zoo(name, tol_out, tol_grad, **kernel_options):
    """The kernel's forward and its gradients w.r.t. every array argument against zoo's."""
    args, options, _ = _case(name)
    (want_out, want_state), grads_ref = _zoo_results(name)
    names = [k for k in NAMES if k in args]

    def kernel(*xs):
        return selective_scan(**dict(zip(names, xs, strict=True)), **options, **kernel_options,
                              interpret=True)

    out, state = jax.jit(kernel)(*(args[k] for k in names))
    assert out.dtype == args["u"].dtype and state.dtype == jnp.float32
    _close(out, want_out, tol_out, "out")
    _close(state, want_state, tol_out, "final_state")
    loss = _loss(kernel, len(name), want_out.shape, want_state.shape)
    grads = jax.jit(jax.grad(loss, argnums=range(len(names))))(*(args[k] for k in names))
    for arg, got, want in zip(names, grads, grads_ref, strict=True):
        assert got.dtype == args[arg].dtype, arg
        _close(got, want, tol_grad, arg)


# name: (batch, D, L, N, groups, dtype, every option). Odd L (padded steps), odd D and N (padded
# channels and state), several time tiles, grouped B/C, resets (at a tile boundary and at step 0).
CASES = {
    "options": (2, 12, 37, 5, None, jnp.float32, True),
    "plain": (1, 8, 29, 16, None, jnp.float32, False),
    "groups": (1, 20, 45, 3, 2, jnp.float32, True),
    "groups of 128": (1, 256, 12, 4, 2, jnp.float32, True),
    "bfloat16": (2, 12, 40, 6, None, jnp.bfloat16, True),
}


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_every_option_matches_zoo_forward_and_gradients(platform):
    _check_against_zoo("options", 2e-5, 1e-4, chunk_size=16, platform=platform)


def test_plain_call_without_options():
    """No D, z, bias, softplus, initial state or reset (mamba_ssm's defaults), tiles of 8 steps."""
    _check_against_zoo("plain", 2e-5, 1e-4, chunk_size=8, platform="gpu")


def test_grouped_b_and_c():
    _check_against_zoo("groups", 2e-5, 1e-4, chunk_size=8, platform="gpu")


def test_grouped_b_and_c_tpu_with_128_channels_per_group():
    _check_against_zoo("groups of 128", 2e-5, 1e-4, chunk_size=8, platform="tpu")


@pytest.mark.parametrize("platform", [None, "tpu"])
def test_bfloat16_inputs_against_float32_reference_of_the_same_values(platform):
    _check_against_zoo("bfloat16", 2e-2, 3e-2, chunk_size=16, platform=platform)


def test_folder_reference_agrees_with_zoo():
    args = _inputs(4, 2, 6, 21, 3, groups=3)
    reset = _resets(4, 2, 21)
    got = selective_scan_reference(**args, delta_softplus=True, reset=reset)
    want = selective.reference(**args, delta_softplus=True, reset=reset, return_final_state=True)
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)


def test_padded_steps_leave_the_state_unchanged():
    """L = 17 in one tile of 32 steps (15 padded steps, softplus on: the padding must force Δ = 0,
    not rely on delta = 0): the final state is zoo's."""
    args = _inputs(5, 1, 8, 17, 4)
    _, h = selective_scan(**args, delta_softplus=True, chunk_size=32, interpret=True)
    _, h_ref = selective.reference(**args, delta_softplus=True, return_final_state=True)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, error, words", [
    (dict(delta=jnp.zeros((1, 4, 7))), ValueError, "delta has shape"),
    (dict(A=jnp.zeros((5, 3))), ValueError, "A must have shape"),
    (dict(A=jnp.zeros((4, 3), jnp.complex64)), TypeError, "A is complex"),
    (dict(B=jnp.zeros((1, 3, 7))), ValueError, "B has shape"),
    (dict(C=jnp.zeros((1, 3, 3, 8))), ValueError, "C has shape"),
    (dict(u=jnp.zeros((1, 4, 8), jnp.float16)), TypeError, "u must be float32 or bfloat16"),
    (dict(D=jnp.zeros((5,))), ValueError, "D must have shape"),
    (dict(initial_state=jnp.zeros((1, 4, 2))), ValueError, "initial_state"),
    (dict(reset=jnp.zeros((1, 8), jnp.int32)), ValueError, "reset must be"),
    (dict(chunk_size=12), ValueError, "chunk_size"),
    (dict(platform="cuda"), ValueError, "platform"),
    (dict(B=jnp.zeros((1, 2, 3, 8)), C=jnp.zeros((1, 2, 3, 8))), ValueError, "channels per group"),
])
def test_bad_arguments_are_named(bad, error, words):
    args = dict(u=jnp.zeros((1, 4, 8)), delta=jnp.zeros((1, 4, 8)), A=jnp.zeros((4, 3)),
                B=jnp.zeros((1, 3, 8)), C=jnp.zeros((1, 3, 8)))
    args.update(bad)
    with pytest.raises(error, match=words):
        selective_scan(**args)


def _specs(dtype):
    b, d, t, n = 2, 600, 300, 16          # D tiles: 10 of 64 (Triton), 5 of 128 (Mosaic)
    sd = jax.ShapeDtypeStruct
    f32 = jnp.float32
    seq = sd((b, d, t), dtype)
    return [seq, seq, sd((d, n), f32), sd((b, n, t), dtype), sd((b, n, t), dtype), sd((d,), f32), seq,
            sd((d,), f32), sd((b, d, n), f32)]


def _forward(platform):
    def run(u, delta, A, B, C, D, z, bias, h0):
        reset = jnp.broadcast_to(jnp.arange(300) % 97 == 0, (2, 300))
        return selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0, reset=reset,
                              platform=platform)
    return run


def _forward_backward(platform):
    def run(*args):
        (out, state), vjp = jax.vjp(_forward(platform), *args)
        return vjp((jnp.ones_like(out), jnp.ones_like(state)))
    return run


@pytest.mark.parametrize("platform", [None, "explicit"])
@pytest.mark.parametrize("fn, calls", [(_forward, 1), (_forward_backward, 2)])
@pytest.mark.parametrize("target, custom_call", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
def test_lowers_to_the_kernel(fn, calls, target, custom_call, platform):
    """Both kernels (forward; forward and backward) lower for TPU (Mosaic) and CUDA (Triton), from
    ``platform=None`` (platform_dependent) and from the explicit platform."""
    chosen = None if platform is None else {"tpu": "tpu", "cuda": "gpu"}[target]
    exported = jax.export.export(
        jax.jit(fn(chosen)), platforms=[target],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*_specs(jnp.bfloat16))
    assert exported.mlir_module().count(custom_call) == calls
