"""linear_transformer, retnet and lightning: each block against a float64 numpy loop of its paper's
equations (no zoo.ops inside), in every mode, forwards and backwards, with resets, from a random
state, and split into two calls that carry the state; plus their config checks.

The models run in float32 from float32 weights and inputs; the loops redo the same computation in
float64, so the difference is float32 rounding: compared at rtol 1e-4 and atol 1e-5 of each output's
scale (the normalisations in retnet and lightning divide by per-token statistics, which can amplify
rounding by a small factor).

Positions (retnet): the loop carries an absolute position counter beside the state, restarted at 0 by
a reset and counted in the order of processing (from the end when reverse=True), and rotates q and k
at that position, as the paper writes it. The model keeps no counter (its state is held in the next
token's frame), so agreement, also across two calls, checks that the two descriptions coincide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")


# The harness checks every mode against the step loop; the loop of the paper's equations runs here in
# the sequential mode, and in the other modes with -m slow.
def _sequential_then_slow(modes):
    return [pytest.param(m, marks=() if m == "sequential" else pytest.mark.slow) for m in modes]


B, T, D_IN, T_SPLIT = 2, 11, 5, 4
MODES = ("chunked", "parallel", "sequential")
# Row 0 runs unbroken; row 1 starts a segment at 5 and a length-1 segment at 8.
RESET = np.zeros((B, T), bool)
RESET[1, [5, 8]] = True


def _silu(a):
    return a / (1 + np.exp(-a))


def _heads(a, h):
    return a.reshape(*a.shape[:-1], h, a.shape[-1] // h)


# --------------------------------------------------------------------------------------------
# One token of each block in float64 (state, x_t [B, d_in]) -> (state, y_t). Written from the papers.


def _linear_transformer_step(p, c, state, x):
    """Katharopoulos et al. 2020, eq. 18-20: φ = elu + 1, S += φ(k) vᵀ, z += φ(k), o = Sᵀφ(q) / zᵀφ(q)."""
    phi = {"elu+1": lambda a: np.where(a > 0, a + 1, np.exp(a)), "relu": lambda a: np.maximum(a, 0),
           "identity": lambda a: a}[c["feature_map"]]
    h = c["n_heads"]
    q, k, v = (_heads(x @ p[f"w_{n}"], h) for n in "qkv")
    q, k = phi(q), phi(k)
    S, z = state if c["normalize"] else (state, None)
    S = S + np.einsum("bhk,bhv->bhkv", k, v)
    o = np.einsum("bhkv,bhk->bhv", S, q) * c["scale"]
    if c["normalize"]:
        z = z + k
        o = o / (np.einsum("bhk,bhk->bh", z, q)[..., None] * c["scale"] + 1e-10)
    y = o.reshape(x.shape[0], -1) @ p["w_o"]
    return ((S, z) if c["normalize"] else S), y


def _rotary(a, position, base):
    """RoFormer's rotation of a [B, H, K] at position [B]: entry i with i + K/2, angle p·base^(-2i/K)."""
    half = a.shape[-1] // 2
    angle = position[:, None, None] * base ** (-2.0 * np.arange(half) / a.shape[-1])
    first, second = a[..., :half], a[..., half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                           second * np.cos(angle) + first * np.sin(angle)], axis=-1)


def _retnet_step(p, c, state, x):
    """Sun et al. 2023, §2.1-2.2: rotated q, k at the absolute position; S = γ_h S + k vᵀ with
    γ_h = 1 - 2^(-5-h); o = Sᵀq / sqrt(K); GroupNorm per head; swish(x W_g) ⊙ Y; W_o. With
    ``use_short_conv`` (FLA), the projections first pass a causal depthwise convolution over the last
    ``conv_size`` tokens (the window carries the ones before this token) and a SiLU."""
    h, dk = c["n_heads"], c["d_head"]
    projections = [x @ p[f"w_{n}"] for n in "qkv"]
    if c.get("use_short_conv"):
        window, S, position = state
        taps = np.concatenate([window, np.concatenate(projections, -1)[:, None]], axis=1)   # [B, C, W]
        mixed = _silu(np.einsum("bkw,kw->bw", taps, p["conv_kernel"]) + p.get("conv_bias", 0.0))
        projections = np.split(mixed, [h * dk, 2 * h * dk], axis=-1)
        window = taps[:, 1:]
    else:
        S, position = state
    q, k, v = (_heads(a, h) for a in projections)
    q, k = _rotary(q, position, c["rope_base"]), _rotary(k, position, c["rope_base"])
    gamma = 1 - 2.0 ** (-5.0 - np.arange(h))
    S = gamma[None, :, None, None] * S + np.einsum("bhk,bhv->bhkv", k, v)
    o = np.einsum("bhkv,bhk->bhv", S, q) / np.sqrt(dk)
    if c["norm"] == "group":                   # GroupNorm, one group per head; "rms": FLA's RMSNorm
        o = o - o.mean(-1, keepdims=True)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + c["norm_eps"])
    y = o.reshape(x.shape[0], -1) * p["norm_scale"] + p.get("norm_bias", 0.0)
    y = (_silu(x @ p["w_g"]) * y) @ p["w_o"]
    new = (S, position + 1)
    return ((window, *new) if c.get("use_short_conv") else new), y


def _lightning_log_decay(c):
    h, layer, layers = c["n_heads"], c["layer_idx"], c["num_layers"]
    if c["decay"] == "fla":                     # FLA's chunk_lightning_attn
        return -(8.0 / h) * (1 - layer / layers) * np.arange(h)
    # TransNormerLLM's release: ALiBi slopes, for the H = 3 used here worked out by hand from
    # _build_slope_tensor (the 2 slopes of H = 2, then every other one of H = 4).
    assert h == 3
    slopes = np.array([2.0 ** -4, 2.0 ** -8, 2.0 ** -2])
    return -slopes * (1 - layer / (layers - 1) + 1e-5)


def _lightning_step(p, c, state, x):
    """TransNormerLLM's NormLinearAttention: q, k = SiLU(x W), v = x W_v, u = act(x W_u) (identity in
    the release); S = λ_h S + k vᵀ; o = Sᵀq; SRMSNorm over all heads; ⊙ u; W_o."""
    h = c["n_heads"]
    q, k, v = (_heads(x @ p[f"w_{n}"], h) for n in "qkv")
    q, k = _silu(q), _silu(k)
    lam = np.exp(_lightning_log_decay(c))
    S = lam[None, :, None, None] * state + np.einsum("bhk,bhv->bhkv", k, v)
    o = np.einsum("bhkv,bhk->bhv", S, q).reshape(x.shape[0], -1)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + c["norm_eps"])
    u = x @ p["w_u"]
    u = {"identity": u, "sigmoid": 1 / (1 + np.exp(-u)), "swish": _silu(u)}[c["gate_act"]]
    return S, (o * u) @ p["w_o"]


def _fresh_reference_state(name, c, batch):
    h, dk = c["n_heads"], c["d_head"]
    if name == "linear_transformer":
        S = np.zeros((batch, h, dk, dk))
        return (S, np.zeros((batch, h, dk))) if c["normalize"] else S
    if name == "retnet":
        fresh = np.zeros((batch, h, dk, c["expand_v"] * dk)), np.zeros(batch)
        if c.get("use_short_conv"):
            fresh = (np.zeros((batch, c["conv_size"] - 1, h * dk * (2 + c["expand_v"]))), *fresh)
        return fresh
    return np.zeros((batch, h, dk, dk))


STEPS = {"linear_transformer": _linear_transformer_step, "retnet": _retnet_step, "lightning": _lightning_step}


def _where_rows(flag, fresh, carried):
    return np.where(flag.reshape((-1,) + (1,) * (carried.ndim - 1)), fresh, carried)


def _reference(name, c, params, xs, reset=None, reverse=False, state=None):
    """The block over time in float64; a reset (in the order of processing) restores the fresh state."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(xs, np.float64)
    batch, time = xs.shape[:2]
    fresh = _fresh_reference_state(name, c, batch)
    state = fresh if state is None else state
    reset = np.zeros((batch, time), bool) if reset is None else np.asarray(reset)
    ys = [None] * time
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        flag = (reset[:, t + 1] if t + 1 < time else np.zeros(batch, bool)) if reverse else reset[:, t]
        state = jax.tree.map(functools.partial(_where_rows, flag), fresh, state)
        state, ys[t] = STEPS[name](p, c, state, xs[:, t])
    return np.stack(ys, axis=1), state


# --------------------------------------------------------------------------------------------
# Set-up: small configs with several heads and multi-chunk, padded sequences (T = 11, chunk 4).

CONFIGS = {
    "linear_transformer": {"d_model": 6, "n_heads": 2, "d_head": 4, "chunk_size": 4},
    "retnet": {"d_model": 6, "n_heads": 3, "d_head": 4, "expand_v": 2, "chunk_size": 4, "rope_base": 50.0},
    "lightning": {"d_model": 6, "n_heads": 3, "d_head": 4, "layer_idx": 1, "num_layers": 3, "chunk_size": 4},
}


def _setup(name, seed=0, **overrides):
    config = dict(CONFIGS[name], **overrides)
    rec = zoo.get(name, **config)
    c = zoo.list_models()[name].defaults() | config
    keys = jax.random.split(jax.random.key(seed), 4)
    params = rec.init(keys[0], D_IN)
    # Parameters that start constant (the norm's scale 1, shift 0) are randomised so each is tested.
    for leaf, base in (("norm_scale", 1.0), ("norm_bias", 0.0)):
        if leaf in params:
            params[leaf] = base + 0.3 * jax.random.normal(keys[1], params[leaf].shape)
    xs = jax.random.normal(keys[2], (B, T, D_IN), jnp.float32)
    return rec, c, params, xs


def _random_state(rec, params, key):
    """A non-zero state; positive so that linear attention's normaliser stays positive."""
    state = rec.initial_state(params, B)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.uniform(k, s.shape, jnp.float32, 0.1, 0.5)
                                     for s, k in zip(leaves, keys, strict=True)])


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)), err_msg=what)


# --------------------------------------------------------------------------------------------
# Every mode against the loop.


def _as_reference_state(name, state):
    """The model's state as the loop's. retnet: a state in the frame of the next token, when the
    counter is 0, is the loop's S as it stands (rotation by 0), with position 0 (after the
    convolution's window, when there is one)."""
    if name == "retnet":
        *window, S = jax.tree.map(lambda s: np.asarray(s, np.float64), jax.tree.leaves(state))
        return (*window, S, np.zeros(S.shape[0]))
    return jax.tree.map(lambda s: np.asarray(s, np.float64), state)


def _as_model_state(name, state):
    """The loop's final state in the model's form. retnet: every key of S turned back by the position
    counter, into the frame of the next token (rotation along K by -position)."""
    if name == "retnet":
        *window, S, position = state
        turned = _rotary(np.swapaxes(S, -1, -2).reshape(S.shape[0], -1, S.shape[-2]), -position,
                         CONFIGS["retnet"]["rope_base"])
        S = np.swapaxes(turned.reshape(np.swapaxes(S, -1, -2).shape), -1, -2)
        return (*window, S) if window else S
    return state


@pytest.mark.parametrize("mode", _sequential_then_slow(MODES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_apply_equals_float64_loop_from_a_random_state_with_resets_both_directions(name, mode):
    rec, c, params, xs = _setup(name)
    state = _random_state(rec, params, jax.random.key(3))
    for reverse in (False, True):
        ys, final = rec.apply(params, xs, state=state, reset=RESET, mode=mode, reverse=reverse)
        ys_ref, final_ref = _reference(name, c, params, xs, RESET, reverse, _as_reference_state(name, state))
        _close(ys, ys_ref, f"{name} {mode} reverse={reverse}: outputs")
        final_ref = _as_model_state(name, final_ref)
        for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(final_ref), strict=True):
            _close(got, want, f"{name} {mode} reverse={reverse}: final state")


@pytest.mark.parametrize("mode", _sequential_then_slow(["chunked", "sequential"]))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_calls_carrying_the_state_equal_the_loop_over_the_whole(name, mode):
    """apply(x[:, :4]) then apply(x[:, 4:], state): the second call continues at position 4."""
    rec, c, params, xs = _setup(name, seed=1)
    ys_a, mid = rec.apply(params, xs[:, :T_SPLIT], mode=mode)
    ys_b, _ = rec.apply(params, xs[:, T_SPLIT:], state=mid, mode=mode)
    ys_ref, _ = _reference(name, c, params, xs)
    _close(jnp.concatenate([ys_a, ys_b], axis=1), ys_ref, f"{name} {mode}: outputs")


def test_retnet_steps_continue_an_apply_at_the_right_positions():
    """Decoding after a prefill: the two steps after apply(x[:, :T-2]) see positions T-2 and T-1."""
    rec, c, params, xs = _setup("retnet", seed=4)
    _, state = rec.apply(params, xs[:, :-2], mode="chunked")
    state, y_a = rec.step(params, state, xs[:, -2])
    _, y_b = rec.step(params, state, xs[:, -1])
    ys_ref, _ = _reference("retnet", c, params, xs)
    _close(jnp.stack([y_a, y_b], axis=1), ys_ref[:, -2:], "retnet: steps after apply")


RETNET_SHORT_CONV = {"use_short_conv": True, "conv_size": 3, "conv_bias": True}


@pytest.mark.parametrize("mode", _sequential_then_slow(MODES))
def test_retnet_short_conv_equals_the_loop_from_a_random_state_both_directions(mode):
    rec, c, params, xs = _setup("retnet", seed=6, **RETNET_SHORT_CONV)
    assert params["conv_kernel"].shape == (3, 3 * 4 * (2 + 2)) and "conv_bias" in params
    state = _random_state(rec, params, jax.random.key(7))
    for reverse in (False, True):
        ys, final = rec.apply(params, xs, state=state, reset=RESET, mode=mode, reverse=reverse)
        ys_ref, final_ref = _reference("retnet", c, params, xs, RESET, reverse,
                                       _as_reference_state("retnet", state))
        _close(ys, ys_ref, f"retnet short conv {mode} reverse={reverse}: outputs")
        for got, want, what in zip(final, _as_model_state("retnet", final_ref), ("window", "S"), strict=True):
            _close(got, want, f"retnet short conv {mode} reverse={reverse}: {what}")


def test_retnet_short_conv_steps_carry_the_window_after_an_apply():
    """Prefill then decode: the window and S that apply leaves feed step, token by token."""
    rec, c, params, xs = _setup("retnet", seed=8, **RETNET_SHORT_CONV)
    _, state = rec.apply(params, xs[:, :T_SPLIT], mode="chunked")
    outputs = []
    for t in range(T_SPLIT, T):
        state, y_t = rec.step(params, state, xs[:, t])
        outputs.append(y_t)
    ys_ref, _ = _reference("retnet", c, params, xs)
    _close(jnp.stack(outputs, axis=1), ys_ref[:, T_SPLIT:], "retnet short conv: steps after apply")
    info = zoo.list_models()["retnet"]
    assert info.state_size(**CONFIGS["retnet"], **RETNET_SHORT_CONV) == sum(
        np.prod(a.shape[1:]) for a in jax.tree.leaves(state))


@pytest.mark.parametrize("name,overrides", [
    ("linear_transformer", {"normalize": False, "feature_map": "relu", "scale": None}),
    ("retnet", {"norm": "rms"}),
    ("lightning", {"decay": "alibi", "gate_act": "sigmoid"}),
])
def test_other_options_equal_the_loop(name, overrides):
    rec, c, params, xs = _setup(name, seed=5, **overrides)
    if "scale" in c and c["scale"] is None:
        c = dict(c, scale=c["d_head"] ** -0.5)
    for mode in ("chunked", "sequential"):
        ys, final = rec.apply(params, xs, reset=RESET, mode=mode)
        ys_ref, final_ref = _reference(name, c, params, xs, RESET)
        _close(ys, ys_ref, f"{name} {overrides} {mode}: outputs")
        if name != "retnet":
            _close(final, final_ref, f"{name} {overrides} {mode}: final state")


# --------------------------------------------------------------------------------------------
# Registration and config checks.


@pytest.mark.parametrize("name,title", [
    ("linear_transformer", "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"),
    ("retnet", "Retentive Network: A Successor to Transformer for Large Language Models"),
    ("lightning", "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
                  "Language Models"),
])
def test_registered_on_the_matrix_engine_with_its_paper(name, title):
    info = zoo.list_models()[name]
    assert info.engine == "matrix" and info.paper == title and set(info.modes) == set(MODES)


@pytest.mark.parametrize("name,overrides,field", [
    ("linear_transformer", {"feature_map": "softmax"}, "feature_map"),
    ("linear_transformer", {"feature_map": "identity"}, "feature_map"),     # with normalize=True
    ("linear_transformer", {"scale": -1.0}, "scale"),
    ("linear_transformer", {"n_heads": 0}, "n_heads"),
    ("retnet", {"d_head": 5}, "d_head"),
    ("retnet", {"norm": "layer"}, "norm"),
    ("retnet", {"expand_v": 0}, "expand_v"),
    ("retnet", {"rope_base": 1.0}, "rope_base"),
    ("retnet", {"use_short_conv": 1}, "use_short_conv"),
    ("retnet", {"use_short_conv": True, "conv_size": 0}, "conv_size"),
    ("lightning", {"layer_idx": 2, "num_layers": 2}, "layer_idx"),
    ("lightning", {"decay": "linear"}, "decay"),
    ("lightning", {"gate_act": "tanh"}, "gate_act"),
    ("lightning", {"d_head": 2.5}, "d_head"),
])
def test_bad_config_raises_value_error_naming_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        zoo.get(name, **overrides)


def test_identity_feature_map_is_allowed_without_the_normaliser():
    rec = zoo.get("linear_transformer", feature_map="identity", normalize=False)
    params = rec.init(jax.random.key(0), D_IN)
    assert jax.tree.leaves(rec.initial_state(params, 1))[0].shape == (1, 2, 8, 8)
