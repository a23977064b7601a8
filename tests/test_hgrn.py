"""HGRN: the op ``zoo.ops.hgrn`` and the registered layer ``hgrn``.

References: a float64 numpy loop of ``h_t = exp(g_t) h_{t-1} + x_t`` written here; FLA's pure-torch
``naive_recurrent_hgrn`` (``refs`` marker, loaded by tests/refs/fla_reference.py); and, for the model,
a float64 numpy loop of the layer's equations (zoo/models/hgrn.py's docstring, FLA's HGRNAttention).

Tolerances: float32 against float64 at rtol 1e-5 of each array's scale (O(1) values over <= 13
steps); float64 modes (``jax.enable_x64``) against the float64 loop at 1e-12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.hgrn import forget_gate
from zoo.ops import hgrn as hgrn_ops

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")

MODES = hgrn_ops.MODES
B, T, D = 2, 13, 5
RESET = np.zeros((B, T), bool)
RESET[0, 5] = True
RESET[1, [0, 9, 10]] = True


def assert_close(got, want, rtol=1e-5, what=""):
    """Elementwise within rtol, and within rtol of the largest magnitude of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)), err_msg=what)


def data(seed, batch=B, time=T, width=D):
    """x, log forget gates g = log σ(N(2, 1)) (decays 0.5 .. 0.98) and an initial state, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, time, width)).astype(np.float32)
    g = (-np.logaddexp(0.0, -(rng.standard_normal((batch, time, width)) + 2.0))).astype(np.float32)
    h0 = rng.standard_normal((batch, width)).astype(np.float32)
    return x, g, h0


def loop(x, g, h0, reset=None, reverse=False):
    """h_t = exp(g_t) h_{t-1} + x_t in float64; a reset drops the state carried into a segment start
    (backwards: the carry from t + 1 is dropped when t + 1 starts a segment)."""
    x, g, h = np.asarray(x, np.float64), np.asarray(g, np.float64), np.array(h0, np.float64)
    time = x.shape[1]
    out = np.zeros_like(x)
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        if reset is not None:
            flag = (reset[:, t + 1] if t + 1 < time else np.zeros(len(h), bool)) if reverse else reset[:, t]
            h[flag] = 0.0
        h = np.exp(g[:, t]) * h + x[:, t]
        out[:, t] = h
    return out, h


# Jitted: eager dispatch compiles every small op on its own, which costs more than one compilation.
_hgrn = jax.jit(hgrn_ops.hgrn, static_argnames=("output_final_state", "reverse", "mode", "chunk_size"))


def run(mode, x, g, h0, **kwargs):
    """hgrn in ``mode`` from h0, with the final state; chunks of 4 steps in the chunked mode."""
    chunk = {"chunk_size": 4} if mode == "chunked" else {}
    return _hgrn(jnp.asarray(x), jnp.asarray(g), initial_state=jnp.asarray(h0), output_final_state=True,
                 mode=mode, **chunk, **kwargs)


# --------------------------------------------------------------------------------------------
# The op.


@pytest.mark.refs
@pytest.mark.parametrize("mode", MODES)
def test_op_matches_fla_naive_recurrent_hgrn(mode):
    from tests.refs.fla_reference import load_fla_reference

    ref = load_fla_reference()
    import torch

    x, g, h0 = data(0)
    o_ref, final_ref = ref.naive_recurrent_hgrn(torch.from_numpy(x), torch.from_numpy(g),
                                                torch.from_numpy(h0), output_final_state=True)
    o, final = run(mode, x, g, h0)
    assert o.dtype == jnp.float32 and final.dtype == jnp.float32
    assert_close(o, o_ref.numpy(), what="o")
    assert_close(final, final_ref.numpy(), what="final state")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES)
def test_op_equals_a_float64_loop_with_resets_in_both_directions(mode, reverse):
    x, g, h0 = data(1)
    want, want_final = loop(x, g, h0, RESET, reverse)
    o, final = run(mode, x, g, h0, reset=jnp.asarray(RESET), reverse=reverse)
    assert_close(o, want, what="o")
    assert_close(final, want_final, what="final state")


def test_every_mode_and_the_reference_equal_the_loop_to_float64_precision():
    x, g, h0 = data(2)
    want, want_final = loop(x, g, h0, RESET)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, g, h0)]
        results = {m: run(m, *args, reset=RESET) for m in MODES}
        results["reference"] = hgrn_ops.reference(*args[:2], initial_state=args[2], output_final_state=True,
                                                  reset=RESET)
        for name, (o, final) in results.items():
            assert o.dtype == jnp.float64, name
            assert_close(o, want, rtol=1e-12, what=f"{name} o")
            assert_close(final, want_final, rtol=1e-12, what=f"{name} final state")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradients_of_every_mode_equal_the_reference(reverse):
    x, g, h0 = data(3)
    rng = np.random.default_rng(4)
    w_o, w_final = rng.standard_normal(x.shape), rng.standard_normal(h0.shape)

    def loss(fn):
        def value(x, g, h0):
            o, final = fn(x, g, h0)
            return jnp.sum(o * w_o) + jnp.sum(final * w_final)

        return jax.jit(jax.grad(value, argnums=(0, 1, 2)))

    def reference(x, g, h0):
        return hgrn_ops.reference(x, g, initial_state=h0, output_final_state=True, reset=RESET,
                                  reverse=reverse)

    want = loss(reference)(x, g, h0)
    for mode in MODES:
        got = loss(lambda x, g, h0, mode=mode: run(mode, x, g, h0, reset=RESET, reverse=reverse))(x, g, h0)
        for name, a, b in zip(("x", "g", "initial_state"), got, want, strict=True):
            assert_close(a, b, rtol=2e-5, what=f"{mode}: gradient wrt {name}")


def test_gradient_wrt_g_equals_a_finite_difference_of_the_float64_loop():
    x, g, h0 = data(5, time=6)
    rng = np.random.default_rng(6)
    w = rng.standard_normal(x.shape)
    grad = jax.grad(lambda g: jnp.sum(run("sequential", x, g, h0)[0] * w))(jnp.asarray(g))
    step, (b, t, d) = 1e-6, (1, 2, 3)
    plus, minus = g.astype(np.float64), g.astype(np.float64)
    plus[b, t, d] += step
    minus[b, t, d] -= step
    numeric = (np.sum(loop(x, plus, h0)[0] * w) - np.sum(loop(x, minus, h0)[0] * w)) / (2 * step)
    np.testing.assert_allclose(float(grad[b, t, d]), numeric, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_forget_gate_exactly_zero_forgets_and_keeps_gradients_finite(mode):
    # g = -inf is f = 0: the state is dropped (o = x) with no 0·inf anywhere, forwards or backwards.
    x, g, h0 = data(7)
    g = g.copy()
    g[:, 4] = -np.inf
    o, _ = run(mode, x, g, h0)
    np.testing.assert_array_equal(np.asarray(o[:, 4]), x[:, 4])
    assert_close(o, loop(x, g, h0)[0], what="o")
    grads = jax.jit(jax.grad(lambda x, h0: jnp.sum(run(mode, x, g, h0)[0] ** 2), argnums=(0, 1)))(x, h0)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in grads)


def test_step_fold_equals_the_op_and_final_state_is_none_unless_asked():
    x, g, h0 = data(8)
    h, outputs = jnp.asarray(h0), []
    for t in range(T):
        h = hgrn_ops.step(jnp.asarray(x[:, t]), jnp.asarray(g[:, t]), h)
        outputs.append(h)
    o, final = run("sequential", x, g, h0)
    assert_close(jnp.stack(outputs, axis=1), o, what="stepped outputs")
    assert_close(h, final, what="stepped state")
    assert hgrn_ops.hgrn(jnp.asarray(x), jnp.asarray(g))[1] is None
    o16, _ = hgrn_ops.hgrn(jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16))
    assert o16.dtype == jnp.bfloat16


def test_op_rejects_malformed_input_naming_the_argument():
    x, g, h0 = (jnp.asarray(a) for a in data(9))
    hgrn = hgrn_ops.hgrn
    with pytest.raises(ValueError, match=r"x.*\[B, T, D\].*\(2, 13\)"):
        hgrn(x[..., 0], g[..., 0])
    with pytest.raises(ValueError, match=r"g has shape \(2, 13, 4\) but x has \(2, 13, 5\)"):
        hgrn(x, g[..., :4])
    with pytest.raises(ValueError, match=r"initial_state.*\(2, 5\).*\(2, 4\)"):
        hgrn(x, g, initial_state=h0[:, :4])
    with pytest.raises(ValueError, match="x has dtype int32"):
        hgrn(x.astype(jnp.int32), g)
    with pytest.raises(ValueError, match="g has dtype int32"):
        hgrn(x, g.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"reset.*\(2, 13\).*\(2, 12\)"):
        hgrn(x, g, reset=RESET[:, :-1])
    with pytest.raises(ValueError, match="mode='scan'"):
        hgrn(x, g, mode="scan")
    with pytest.raises(ValueError, match="chunk_size"):
        hgrn(x, g, mode="sequential", chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        hgrn(x, g, mode="chunked", chunk_size=0)
    with pytest.raises(ValueError, match="T = 0"):
        hgrn(x[:, :0], g[:, :0])
    with pytest.raises(ValueError, match=r"x_t \(2, 5\), g_t \(2, 4\)"):
        hgrn_ops.step(x[:, 0], g[:, 0, :4], h0)


# --------------------------------------------------------------------------------------------
# The model.


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def silu(v):
    return v * sigmoid(v)


def layer_loop(params, xs, h0, lower_bound, eps, reset=None, reverse=False):
    """The HGRN layer's equations, one step at a time in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs, h = np.asarray(xs, np.float64), np.array(h0, np.float64)
    time = xs.shape[1]
    ys = np.zeros(xs.shape[:2] + (p["w_o"].shape[1],))
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        if reset is not None:
            flag = (reset[:, t + 1] if t + 1 < time else np.zeros(len(h), bool)) if reverse else reset[:, t]
            h[flag] = 0.0
        x = xs[:, t]
        f = lower_bound + (1.0 - lower_bound) * sigmoid(x @ p["w_f"])
        h = f * h + (1.0 - f) * silu(x @ p["w_i"])
        normed = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)
        ys[:, t] = (normed * p["norm_scale"] * silu(x @ p["w_g"])) @ p["w_o"]
    return ys, h


CONFIG = {"d_model": 6, "expand_ratio": 2, "lower_bound": 0.3, "norm_eps": 1e-5, "chunk_size": 4}


def model_setup(seed=10, d_in=5):
    rec = zoo.get("hgrn", **CONFIG)
    key = jax.random.key(seed)
    params = rec.init(key, d_in)
    # A norm scale other than ones, so that the test sees whether it is applied.
    scale_shape = params["norm_scale"].shape
    params["norm_scale"] = 1.0 + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), scale_shape)
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((B, T, d_in)).astype(np.float32)
    h0 = rng.standard_normal((B, CONFIG["expand_ratio"] * CONFIG["d_model"])).astype(np.float32)
    return rec, params, xs, h0


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES)
def test_model_apply_equals_a_float64_loop_of_the_layer_equations(mode, reverse):
    rec, params, xs, h0 = model_setup()
    want, want_final = layer_loop(params, xs, h0, CONFIG["lower_bound"], CONFIG["norm_eps"], RESET, reverse)
    apply = jax.jit(rec.apply, static_argnames=("mode", "reverse"))
    ys, final = apply(params, jnp.asarray(xs), state=jnp.asarray(h0), reset=jnp.asarray(RESET), mode=mode,
                      reverse=reverse)
    assert ys.shape == (B, T, CONFIG["d_model"]) and final.shape == h0.shape
    assert_close(ys, want, what="outputs")
    assert_close(final, want_final, what="final state")


def test_model_step_equals_a_float64_loop_of_the_layer_equations():
    rec, params, xs, h0 = model_setup(11)
    want, want_final = layer_loop(params, xs, h0, CONFIG["lower_bound"], CONFIG["norm_eps"])
    state, ys = jnp.asarray(h0), []
    for t in range(T):
        state, y = rec.step(params, state, jnp.asarray(xs[:, t]))
        ys.append(y)
    assert_close(jnp.stack(ys, axis=1), want, what="outputs")
    assert_close(state, want_final, what="final state")


@pytest.mark.parametrize("lower_bound", [0.0, 0.3, 0.9])
def test_forget_gate_and_its_complement_are_exact_even_when_saturated(lower_bound):
    f_pre = np.array([-80.0, -30.0, -3.0, -1e-3, 0.0, 0.7, 5.0, 20.0, 40.0], np.float32)
    # log(γ + (1-γ)σ(v)) = log σ(v) + log1p(γ e^{-v}), exact in float64 over this range.
    v = f_pre.astype(np.float64)
    want_log_f = -np.logaddexp(0.0, -v) + np.log1p(lower_bound * np.exp(-v))
    log_f, one_minus_f = forget_gate(jnp.asarray(f_pre), lower_bound)
    assert log_f.dtype == jnp.float32 and one_minus_f.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(log_f, np.float64), want_log_f, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(one_minus_f, np.float64), -np.expm1(want_log_f), rtol=1e-6, atol=0)
    assert np.all(np.asarray(log_f) < 0), "a forget gate of 1 or more would not forget"
    grad = jax.grad(lambda v: jnp.sum(forget_gate(v, lower_bound)[0]))(jnp.asarray(f_pre))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_model_lower_bound_keeps_the_forget_gate_at_least_gamma():
    # With f̃ → -inf every forget gate is γ: h_t = γ h_{t-1} + (1 - γ) SiLU(i_t).
    rec = zoo.get("hgrn", d_model=4, lower_bound=0.6)
    params = rec.init(jax.random.key(0), 4)
    params["w_f"] = jnp.zeros_like(params["w_f"]).at[0].set(-1e4)   # f̃ = -1e4 x_0, x_0 = 1 below
    xs = jnp.asarray(np.random.default_rng(12).standard_normal((1, 5, 4)), jnp.float32).at[..., 0].set(1.0)
    _, final = rec.apply(params, xs, mode="sequential")
    h = np.zeros(4)
    for t in range(5):
        h = 0.6 * h + 0.4 * silu(np.asarray(xs[0, t], np.float64) @ np.asarray(params["w_i"], np.float64))
    assert_close(final[0], h, what="final state")


@pytest.mark.parametrize("bad", [{"lower_bound": 1.0}, {"lower_bound": -0.1}, {"lower_bound": "0.5"},
                                 {"expand_ratio": 0}, {"d_model": 2.5}, {"norm_eps": 0.0}])
def test_model_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        zoo.get("hgrn", **bad)


def test_model_is_registered_on_the_diagonal_engine():
    info = zoo.list_models()["hgrn"]
    assert info.engine == "diagonal" and info.modes == MODES
    assert info.state_size(d_model=8, expand_ratio=3) == 24
