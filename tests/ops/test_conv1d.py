"""zoo.ops.conv1d: the causal depthwise convolution against a float64 numpy formula, torch's Conv1d
(refs), a step loop, and the state/reset/reverse contracts its users (Mamba, Hawk, ...) rely on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import conv1d

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, C = 3, 11, 5


def _data(taps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, C)).astype(np.float32)
    weight = rng.normal(size=(taps, C)).astype(np.float32)
    bias = rng.normal(size=(C,)).astype(np.float32)
    state = rng.normal(size=(B, taps - 1, C)).astype(np.float32)
    return x, weight, bias, state


def _numpy_conv(x, weight, bias, state):
    """float64 definition: y_t = bias + Σ_k w[k] x_{t-(K-1)+k}, inputs before 0 read from the state."""
    taps = weight.shape[0]
    padded = np.concatenate([state, x], axis=1).astype(np.float64)
    y = np.zeros(x.shape, np.float64) + bias
    for t in range(x.shape[1]):
        y[:, t] += np.einsum("bkc,kc->bc", padded[:, t:t + taps], weight.astype(np.float64))
    return y, padded[:, x.shape[1]:]


@pytest.mark.parametrize("taps", [1, 2, 4])
def test_apply_equals_float64_formula_with_initial_state(taps):
    x, weight, bias, state = _data(taps)
    y, final = conv1d.apply(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), initial_state=state)
    want_y, want_final = _numpy_conv(x, weight, bias, state)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, want_final, rtol=0, atol=0)
    assert final.dtype == jnp.float32 and final.shape == (B, taps - 1, C)


def test_matches_torch_conv1d_cut_to_causal_outputs():
    torch = pytest.importorskip("torch")
    x, weight, bias, _ = _data(4, seed=1)
    layer = torch.nn.Conv1d(C, C, 4, groups=C, padding=3)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.T[:, None, :]))   # ours [K, C] -> torch [C, 1, K]
        layer.bias.copy_(torch.from_numpy(bias))
        want = layer(torch.from_numpy(x).transpose(1, 2))[..., :T].transpose(1, 2).numpy()
    y, _ = conv1d.apply(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_apply_equals_step_loop_with_resets(reverse):
    x, weight, bias, state = _data(4, seed=2)
    reset = np.zeros((B, T), bool)
    reset[0, 5] = True
    reset[1, [0, 1, 9]] = True
    got = conv1d.apply(x, weight, bias, initial_state=state, reset=reset, reverse=reverse)
    want = conv1d.reference(x, weight, bias, initial_state=state, reset=reset, reverse=reverse)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_reset_equals_running_the_segments_separately():
    x, weight, bias, state = _data(3, seed=3)
    reset = np.zeros((B, T), bool)
    reset[:, 6] = True
    y, final = conv1d.apply(x, weight, bias, initial_state=state, reset=reset)
    y_first, _ = conv1d.apply(x[:, :6], weight, bias, initial_state=state)
    y_second, final_second = conv1d.apply(x[:, 6:], weight, bias)                  # fresh state
    np.testing.assert_allclose(y, np.concatenate([y_first, y_second], axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final, final_second, rtol=0, atol=0)


def test_reset_near_the_end_zeroes_the_older_part_of_the_final_state():
    x, weight, bias, state = _data(4, seed=4)
    reset = np.zeros((B, T), bool)
    reset[:, T - 1] = True
    _, final = conv1d.apply(x, weight, bias, initial_state=state, reset=reset)
    np.testing.assert_array_equal(final[:, :2], 0.0)
    np.testing.assert_array_equal(final[:, 2], x[:, T - 1])


def test_two_pieces_carrying_the_state_equal_the_whole():
    x, weight, bias, state = _data(4, seed=5)
    y, final = conv1d.apply(x, weight, bias, initial_state=state)
    y1, mid = conv1d.apply(x[:, :2], weight, bias, initial_state=state)   # shorter than the window
    y2, final2 = conv1d.apply(x[:, 2:], weight, bias, initial_state=mid)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final2, final, rtol=0, atol=0)


def test_gradients_match_the_step_loop():
    x, weight, bias, state = _data(4, seed=6)
    reset = np.zeros((B, T), bool)
    reset[2, 4] = True
    w_out = np.random.default_rng(7).normal(size=(B, T, C)).astype(np.float32)

    def loss(fn, x, weight, bias, state):
        y, final = fn(x, weight, bias, initial_state=state, reset=reset)
        return jnp.sum(y * w_out) + jnp.sum(final ** 2)

    got = jax.grad(lambda *a: loss(conv1d.apply, *a), argnums=(0, 1, 2, 3))(x, weight, bias, state)
    want = jax.grad(lambda *a: loss(conv1d.reference, *a), argnums=(0, 1, 2, 3))(x, weight, bias, state)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bfloat16_input_keeps_dtype_and_float32_state():
    x, weight, bias, state = _data(4, seed=8)
    y, final = conv1d.apply(jnp.asarray(x, jnp.bfloat16), weight, bias, initial_state=state)
    want, _ = conv1d.apply(x, weight, bias, initial_state=state)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("bad, match", [
    (dict(x=np.zeros((B, C), np.float32)), "x must have shape"),
    (dict(weight=np.zeros((4, C + 1), np.float32)), "weight must have shape"),
    (dict(bias=np.zeros((C + 1,), np.float32)), "bias must have shape"),
    (dict(initial_state=np.zeros((B, 2, C), np.float32)), "initial_state must have shape"),
    (dict(reset=np.zeros((B, T + 1), bool)), "reset must have shape"),
    (dict(x=np.zeros((B, T, C), np.int32)), "float dtype"),
])
def test_malformed_input_raises_value_error_naming_the_argument(bad, match):
    x, weight, bias, state = _data(4)
    args = dict(x=x, weight=weight, bias=bias, initial_state=state, reset=None) | bad
    with pytest.raises(ValueError, match=match):
        conv1d.apply(args["x"], args["weight"], args["bias"], initial_state=args["initial_state"],
                     reset=args["reset"])
