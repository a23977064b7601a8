"""rwkv6: the Finch block against a float64 numpy loop of its equations, written from the paper and
the RNN form of RWKV-LM's ``rwkv_v6_demo.py`` (``time_mixing``: the state is the last token of each
shift and the per-head matrix S), not from zoo's code.

Every parameter is drawn at random (the LoRAs, zero at init, too), the initial state is random, and
rows carry segment resets. The model runs in float32, the loop in float64 from the same float32
weights, so the difference is float32 rounding: compared at rtol 1e-4 and atol 1e-5 of each array's
scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_loop_checks import (
    check_apply_against_loop,
    check_float64_apply_against_loop,
    check_step_against_loop,
    close,
    numpy_block_loop,
    sequential_then_slow,
)

import zoo
from zoo.models.rwkv6 import RWKV6Config

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")




BATCH, T, D_IN = 2, 11, 5
CONFIG = {"d_model": 8, "d_head": 4, "d_ffn": 12, "mix_lora_rank": 3, "decay_lora_rank": 2, "layer_idx": 1,
          "n_layers": 3, "chunk_size": 4}
RESET = np.zeros((BATCH, T), bool)
RESET[0, [4, 5]] = True
RESET[1, [0, 8]] = True


def _silu(v):
    return v / (1 + np.exp(-v))


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _layer_norm(x, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)


def _numpy_step(p, c, state, x_t):
    """One token of the block in float64; state = (last LN_1 output, S, last LN_2 output)."""
    last_a, S, last_b = (s.copy() for s in state)
    heads, dh = c.n_heads, c.d_head
    x = x_t @ p["w_in"] if "w_in" in p else x_t
    # Time mix.
    a = _layer_norm(x, c.norm_eps) * p["ln1_scale"] + p["ln1_bias"]
    delta = last_a - a
    hidden = np.tanh((a + delta * p["mu_x"]) @ p["mix_a"]).reshape(x.shape[0], 5, c.mix_lora_rank)
    mixed = {}
    for j, name in enumerate("wkvrg"):                        # the official order: w, k, v, r, g
        mixed[name] = a + delta * (p["mu"][j] + hidden[:, j] @ p["mix_b"][j])
    r, k, v = mixed["r"] @ p["w_r"], mixed["k"] @ p["w_k"], mixed["v"] @ p["w_v"]
    g = _silu(mixed["g"] @ p["w_g"])
    decay = np.exp(-np.exp(p["decay_base"] + np.tanh(mixed["w"] @ p["decay_a"]) @ p["decay_b"]))
    out = np.zeros_like(x)
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        kv = np.einsum("bk,bv->bkv", k[:, cols], v[:, cols])
        o = np.einsum("bk,bkv->bv", r[:, cols], S[:, h] + p["bonus"][h][None, :, None] * kv)
        S[:, h] = decay[:, cols, None] * S[:, h] + kv
        out[:, cols] = (_layer_norm(o, c.group_norm_eps) * p["gn_scale"][cols] + p["gn_bias"][cols])
    x = x + (out * g) @ p["w_o"]
    # Channel mix.
    b = _layer_norm(x, c.norm_eps) * p["ln2_scale"] + p["ln2_bias"]
    delta = last_b - b
    key = np.maximum((b + delta * p["cm_mu_k"]) @ p["cm_w_k"], 0.0) ** 2
    x = x + _sigmoid((b + delta * p["cm_mu_r"]) @ p["cm_w_r"]) * (key @ p["cm_w_v"])
    return (a, S, b), x


def _numpy_block(params, c, xs, state, reset, reverse):
    return numpy_block_loop(_numpy_step, params, c, xs, state, reset, reverse)


def _setup(seed=0, d_in=D_IN, **overrides):
    config = dict(CONFIG, **overrides)
    rec = zoo.get("rwkv6", **config)
    keys = jax.random.split(jax.random.key(seed), 4)
    params = rec.init(keys[0], d_in)
    names = sorted(params)
    draws = jax.random.split(keys[1], len(names))
    params = {name: params[name] + 0.3 * jax.random.normal(k, params[name].shape)
              for name, k in zip(names, draws, strict=True)}
    xs = jax.random.normal(keys[2], (BATCH, T, d_in), jnp.float32)
    state = rec.initial_state(params, BATCH)
    draws = jax.random.split(keys[3], len(state))
    state = tuple(s + jax.random.normal(k, s.shape, jnp.float32) for s, k in zip(state, draws, strict=True))
    return rec, params, xs, state, RWKV6Config(**config)


STATE_NAMES = ("time-mix shift", "S", "channel-mix shift")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", sequential_then_slow(["chunked", "parallel", "sequential", "auto"]))
def test_apply_matches_a_float64_loop_of_the_block(mode, reverse):
    check_apply_against_loop(_setup, _numpy_block, STATE_NAMES, RESET, mode, reverse)


@pytest.mark.parametrize("mode", sequential_then_slow(["chunked", "parallel", "sequential"]))
def test_float64_apply_matches_the_loop_to_float64_precision(mode):
    check_float64_apply_against_loop(_setup, _numpy_block, RESET, mode)


def test_step_matches_a_float64_loop_without_input_projection():
    check_step_against_loop(_setup, _numpy_step, STATE_NAMES, CONFIG["d_model"])


def test_token_shift_reads_the_neighbour_on_the_side_time_comes_from():
    """The time-mix shift state after apply is the last LN_1 output forwards and the first one
    backwards: what the next call (in that direction) must read as its previous token."""
    rec, params, xs, _, c = _setup(seed=2)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    u = np.asarray(xs, np.float64) @ p["w_in"]
    for reverse, t in ((False, T - 1), (True, 0)):
        _, (last_a, _, _) = rec.apply(params, xs, reverse=reverse)
        want = _layer_norm(u[:, t], c.norm_eps) * p["ln1_scale"] + p["ln1_bias"]
        close(last_a, want, f"reverse={reverse}")


def test_init_follows_the_official_code():
    c = RWKV6Config(d_model=32, d_head=8, layer_idx=2, n_layers=4)
    params = zoo.get("rwkv6", d_model=32, d_head=8, layer_idx=2, n_layers=4).init(jax.random.key(3), 32)
    r01, r10 = 2 / 3, 1 - 2 / 4
    n = np.arange(32)
    np.testing.assert_allclose(params["decay_base"], -6 + 5 * (n / 31) ** (0.7 + 1.3 * r01), rtol=1e-5)
    np.testing.assert_allclose(params["bonus"].reshape(-1), r01 * (1 - n / 31) + ((n + 1) % 3 - 1) * 0.1,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["mu"][2], 1 - ((n / 32) ** r10 + 0.3 * r01), rtol=1e-5)   # v
    np.testing.assert_allclose(params["mu"][3], 1 - (n / 32) ** (0.5 * r10), rtol=1e-5)          # r
    np.testing.assert_allclose(params["gn_scale"], np.full(32, (3 / 4) ** 0.7), rtol=1e-6)
    assert np.all(np.asarray(params["mix_a"]) == 0) and np.all(np.asarray(params["decay_a"]) == 0)
    assert 0 < float(np.max(np.abs(params["mix_b"]))) <= 0.01
    assert params["bonus"].shape == (c.n_heads, c.d_head)


@pytest.mark.parametrize("bad,match", [
    ({"d_head": 5}, "d_head"), ({"d_ffn": 0}, "d_ffn"), ({"mix_lora_rank": 0}, "mix_lora_rank"),
    ({"layer_idx": 3, "n_layers": 3}, "layer_idx"), ({"chunk_size": 0}, "chunk_size"),
    ({"group_norm_eps": 0.0}, "group_norm_eps"),
])
def test_config_that_cannot_work_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("rwkv6", **bad)
