"""Samba against a float64 numpy forward pass written from the paper, its layer order and its config checks.

``naive_samba`` does not call zoo: the Mamba layer is a plain loop over time (projections, causal
depthwise convolution, the selective recurrence of Gu & Dao's Section 3), the attention is dense
masked softmax attention over each segment's window with RoPE at absolute positions (the form of
the reference code), and RMSNorm, SwiGLU and the residual adds are written out. Step == apply,
resets, jit, vmap and bfloat16 are the shared harness's (tests/test_harness.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.samba import SambaConfig

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN = 2, 11, 5
# Small enough to run in seconds, large enough that the window (3) is shorter than the segments and
# that GQA (4 query heads on 2 key/value heads) is exercised.
CONFIG = dict(d_model=16, n_layers=4, n_heads=4, n_kv_heads=2, window=3, d_mlp=24, d_state=3, chunk_size=4)


# --------------------------------------------------------------------------------------------
# The naive model (float64 numpy).


def _silu(x):
    return x / (1 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


def _rms(p, x):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]


def _swiglu(p, x):
    return (_silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def _segment_starts(reset_row):
    return np.asarray(reset_row, bool) | (np.arange(len(reset_row)) == 0)


def naive_mamba(p, u, reset, d_state):
    """One Mamba block, token by token; a segment start empties the conv history and h."""
    batch, time, _ = u.shape
    taps, e = p["conv_kernel"].shape
    rank = p["w_dt"].shape[0]
    a = -np.exp(p["a_log"])                                                      # [E, N]
    out = np.zeros((batch, time, p["w_out"].shape[1]))
    for b in range(batch):
        starts = _segment_starts(reset[b])
        history, h = np.zeros((taps, e)), np.zeros((e, d_state))
        for t in range(time):
            if starts[t]:
                history, h = np.zeros((taps, e)), np.zeros((e, d_state))
            xz = u[b, t] @ p["w_in"]
            x, z = xz[:e], xz[e:]
            history = np.concatenate([history[1:], x[None]])                   # oldest first
            x = _silu(np.sum(p["conv_kernel"] * history, 0) + p["conv_bias"])
            dbc = x @ p["w_x"]
            delta = _softplus(dbc[:rank] @ p["w_dt"] + p["dt_bias"])               # [E]
            b_t, c_t = dbc[rank:rank + d_state], dbc[rank + d_state:]
            h = np.exp(delta[:, None] * a) * h + (delta * x)[:, None] * b_t[None, :]
            y = (h @ c_t + p["d_skip"] * x) * _silu(z)
            out[b, t] = y @ p["w_out"]
    return out


def _rope(x, base=10_000.0):
    """x [B, T, heads, K] rotated at positions t: entry i paired with i + K/2."""
    k = x.shape[-1]
    freq = base ** (-2 * np.arange(k // 2) / k)
    angle = np.arange(x.shape[1])[None, :, None, None] * freq                     # [1, T, 1, K/2]
    first, second = x[..., :k // 2], x[..., k // 2:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                           second * np.cos(angle) + first * np.sin(angle)], -1)


def naive_swa(p, x, reset, n_heads, kv_heads, window):
    """Dense attention, masked to the query's own segment and the `window` keys before it."""
    batch, time, _ = x.shape
    head = p["w_q"].shape[1] // n_heads
    q = _rope((x @ p["w_q"]).reshape(batch, time, n_heads, head))
    k = _rope((x @ p["w_k"]).reshape(batch, time, kv_heads, head))
    v = (x @ p["w_v"]).reshape(batch, time, kv_heads, head)
    group = np.arange(n_heads) // (n_heads // kv_heads)                           # query head -> kv head
    k, v = k[:, :, group], v[:, :, group]
    segment = np.cumsum(reset, 1)
    t_idx, s_idx = np.arange(time)[:, None], np.arange(time)[None, :]
    mask = (s_idx <= t_idx) & (t_idx - s_idx <= window) & (segment[:, :, None] == segment[:, None, :])
    scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(head)
    scores = np.where(mask[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", weights, v).reshape(batch, time, n_heads * head)
    return o @ p["w_o"]


def naive_samba(params, xs, reset, config: SambaConfig, kinds=("mamba", "swa")):
    """The paper's order (Mamba, MLP, SWA, MLP) repeated over n_layers layers; then the final RMSNorm."""
    x = xs @ params["w_in"] if "w_in" in params else xs
    kinds = list(kinds) * (config.n_layers // 2)
    for p, kind in zip(params["layers"], kinds, strict=True):
        normed = _rms(p["mixer_norm"], x)
        if kind == "mamba":
            x = x + naive_mamba(p["mixer"], normed, reset, config.d_state)
        else:
            x = x + naive_swa(p["mixer"], normed, reset, config.n_heads, config.kv_heads, config.window)
        x = x + _swiglu(p["mlp"], _rms(p["mlp_norm"], x))
    return _rms(params["final_norm"], x)


def _float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def model():
    rec = zoo.get("samba", **CONFIG)
    params = rec.init(jax.random.key(0), D_IN)
    # Δ near the top of its range, so the Mamba layers carry information over several steps.
    layers = tuple(dict(layer, mixer=dict(layer["mixer"], dt_bias=layer["mixer"]["dt_bias"] + 2.0))
                   if "dt_bias" in layer["mixer"] else layer for layer in params["layers"])
    params = dict(params, layers=layers)
    xs = jax.random.normal(jax.random.key(1), (B, T, D_IN), jnp.float32)
    reset = np.zeros((B, T), bool)
    reset[0, 6] = True            # row 0: segments of 6 and 5 tokens; row 1: one segment
    return rec, params, xs, reset


@pytest.mark.parametrize("mode", ["sequential", "chunked"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["no-reset", "reset"])
def test_apply_matches_naive_float64_model(model, mode, with_reset):
    rec, params, xs, reset = model
    reset = reset if with_reset else np.zeros_like(reset)
    ys, _ = jax.jit(rec.apply, static_argnames="mode")(params, xs, reset=jnp.asarray(reset), mode=mode)
    want = naive_samba(_float64(params), np.asarray(xs, np.float64), reset, SambaConfig(**CONFIG))
    # float32 against float64: within 1e-5 of the largest output (DESIGN.md's tolerance).
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_the_reset_changes_the_output_so_the_reference_sees_it(model):
    """Guards the test above: with and without the reset the outputs must differ after t = 6."""
    rec, params, xs, reset = model
    config = SambaConfig(**CONFIG)
    with_reset = naive_samba(_float64(params), np.asarray(xs, np.float64), reset, config)
    without = naive_samba(_float64(params), np.asarray(xs, np.float64), np.zeros_like(reset), config)
    np.testing.assert_allclose(with_reset[:, :6], without[:, :6], rtol=1e-12)
    assert np.max(np.abs(with_reset[0, 6:] - without[0, 6:])) > 1e-3


def test_layers_follow_the_paper_order_mamba_mlp_swa_mlp(model):
    rec, params, xs, reset = model
    config = SambaConfig(**CONFIG)
    assert len(params["layers"]) == config.n_layers == 4
    for i, layer in enumerate(params["layers"]):
        assert set(layer) == {"mixer_norm", "mixer", "mlp_norm", "mlp"}, "norm, mixer, norm, MLP"
        want = {"a_log", "conv_kernel", "w_in"} if i % 2 == 0 else {"w_q", "w_k", "w_v", "w_o"}
        assert want <= set(layer["mixer"]), f"layer {i} is {'Mamba' if i % 2 == 0 else 'SWA'}"
        assert layer["mlp"]["w_gate"].shape == (config.d_model, config.d_mlp), "SwiGLU of width d_mlp"
    # The naive model with each pair of layers swapped (SWA first) is another function: the
    # agreement in test_apply_matches_naive_float64_model pins the order down.
    swapped = tuple(params["layers"][i ^ 1] for i in range(len(params["layers"])))
    zeros = np.zeros_like(reset)
    paper = naive_samba(_float64(params), np.asarray(xs, np.float64), zeros, config)
    other = naive_samba(_float64(dict(params, layers=swapped)), np.asarray(xs, np.float64), zeros, config,
                        kinds=("swa", "mamba"))
    assert np.max(np.abs(other - paper)) > 1e-2


def test_state_is_one_entry_per_layer_and_its_size_matches_the_formula(model):
    rec, params, xs, reset = model
    config = SambaConfig(**CONFIG)
    _, state = jax.eval_shape(rec.apply, params, xs)
    assert len(state) == 4
    for i in (0, 2):
        window, h = state[i]
        assert window.shape == (B, config.d_conv - 1, 2 * 16) and h.shape == (B, 2 * 16, config.d_state)
    for i in (1, 3):
        assert state[i]["keys"].shape == (B, config.window, 2, 4) and state[i]["valid"].shape == (B, 3)
    floats = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(rec.initial_state(params, 1)))
    assert zoo.list_models()["samba"].state_size(**CONFIG) == floats


def test_output_projections_are_scaled_as_the_reference_initialises_them():
    """mamba_init: each residual branch's last projection is divided by sqrt(2 · n_layers)."""
    n_layers, d = 4, 32
    params = zoo.get("samba", d_model=d, n_layers=n_layers, d_mlp=64).init(jax.random.key(3), d)
    scale = 1 / np.sqrt(2 * n_layers)
    for layer in params["layers"]:
        out = layer["mixer"]["w_out" if "w_out" in layer["mixer"] else "w_o"]
        # LeCun-normal rows have std 1/sqrt(fan_in) before the scaling.
        for w in (out, layer["mlp"]["w_down"]):
            assert abs(np.std(np.asarray(w)) * np.sqrt(w.shape[0]) / scale - 1) < 0.15


@pytest.mark.parametrize("bad, field", [
    ({"d_model": 0}, "d_model"), ({"n_layers": 0}, "n_layers"), ({"n_layers": 1.5}, "n_layers"),
    ({"window": 0}, "window"), ({"d_mlp": -1}, "d_mlp"), ({"n_heads": 3}, "n_heads"),
    ({"n_heads": 16}, "even"), ({"n_kv_heads": 3}, "n_kv_heads"), ({"n_kv_heads": 0}, "n_kv_heads"),
    ({"d_state": 0}, "d_state"), ({"d_conv": 0}, "d_conv"), ({"chunk_size": 0}, "chunk_size"),
    ({"rope_base": 1.0}, "rope_base"),
])
def test_invalid_config_raises_value_error_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        zoo.get("samba", **bad)


def test_an_odd_layer_count_ends_with_a_mamba_layer_as_in_the_reference():
    params = zoo.get("samba", n_layers=3).init(jax.random.key(4), 16)
    assert ["a_log" in layer["mixer"] for layer in params["layers"]] == [True, False, True]


@pytest.mark.parametrize("args, field", [((16, 3, 4), "n_heads"), ((16, 2, 0), "window"),
                                         ((16, 4, 4, 3), "n_kv_heads"), ((12, 4, 4), "even")])
def test_the_attention_mixer_checks_its_arguments(args, field):
    from zoo.models.samba import sliding_window_attention

    with pytest.raises(ValueError, match=f"swa: .*{field}"):
        sliding_window_attention(*args)
