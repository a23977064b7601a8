"""DeltaNet, Gated DeltaNet and Longhorn against float64 loops of their block equations.

Each reference below is a plain numpy loop over time written from the papers' and the authors' code's
equations (see each model's docstring); none calls zoo.ops. The conformance harness
(tests/test_harness.py) already checks step against apply, resets, reverse, jit, vmap and bfloat16;
here each model's ``apply`` in every mode is checked against its own definition, with a random
non-zero initial state and resets inside the sequence, plus parameter counts, shapes and config
errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from block_loop_checks import short_conv

import zoo

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN = 2, 9, 5
RESET = np.zeros((B, T), bool)
RESET[0, 5] = True
RESET[1, [0, 3]] = True
# float32 apply against a float64 loop: a few float32 roundings per step, relative to each output's scale.
RTOL = 1e-4


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def l2_normalise(x, eps=1e-6):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def rms_norm_heads(o, scale, eps):
    """o [..., H, V]: each head divided by its RMS, times the per-channel scale [V]."""
    return o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps) * scale


# --------------------------------------------------------------------------------------------
# DeltaNet and Gated DeltaNet.


def delta_block_reference(p, xs, state, reset, *, heads, key_dim, log_decay, beta, use_gate, use_short_conv,
                          eps):
    """The (gated) DeltaNet layer as a loop: projections, SiLU'd short conv, l2-normalised q and k,
    S ← exp(g) S;  S ← S + k (β (v − Sᵀk))ᵀ;  o = Sᵀq / √K;  per-head RMSNorm (× SiLU gate);  W_o."""
    qkv = np.concatenate([xs @ p["w_q"], xs @ p["w_k"], xs @ p["w_v"]], axis=-1)
    if use_short_conv:
        qkv, window = short_conv(qkv, p["conv_kernel"], p.get("conv_bias"), state[0], reset)
    qkv = silu(qkv)
    q, k, v = np.split(qkv, [key_dim, 2 * key_dim], axis=-1)
    q, k, v = (a.reshape(*a.shape[:-1], heads, -1) for a in (q, k, v))
    q, k = l2_normalise(q), l2_normalise(k)
    scale = q.shape[-1] ** -0.5
    S = state[-1].copy()                                                   # [B, H, K, V]
    o = np.zeros(v.shape)
    for b in range(xs.shape[0]):
        for t in range(xs.shape[1]):
            if reset[b, t]:
                S[b] = 0.0
            for h in range(heads):
                S[b, h] *= np.exp(log_decay[b, t, h])
                error = v[b, t, h] - S[b, h].T @ k[b, t, h]
                S[b, h] += np.outer(k[b, t, h], beta[b, t, h] * error)
                o[b, t, h] = S[b, h].T @ q[b, t, h] * scale
    y = rms_norm_heads(o, p["norm_scale"], eps).reshape(*xs.shape[:2], -1)
    if use_gate:
        y = y * silu(xs @ p["w_g"])
    final = (window, S) if use_short_conv else (S,)
    return y @ p["w_o"], final


def deltanet_reference(p, xs, state, reset, c):
    beta = sigmoid(xs @ p["w_b"]) if c.use_beta else np.ones((*xs.shape[:2], c.n_heads))
    beta = 2.0 * beta if c.allow_neg_eigval else beta
    return delta_block_reference(p, xs, state, reset, heads=c.n_heads, key_dim=c.key_dim,
                                 log_decay=np.zeros((*xs.shape[:2], c.n_heads)), beta=beta,
                                 use_gate=c.use_gate, use_short_conv=c.use_short_conv, eps=c.norm_eps)


def gated_deltanet_reference(p, xs, state, reset, c):
    log_decay = -np.exp(p["a_log"]) * softplus(xs @ p["w_a"] + p["dt_bias"])
    beta = sigmoid(xs @ p["w_b"])
    beta = 2.0 * beta if c.allow_neg_eigval else beta
    return delta_block_reference(p, xs, state, reset, heads=c.n_heads, key_dim=c.key_dim, log_decay=log_decay,
                                 beta=beta, use_gate=c.use_gate, use_short_conv=c.use_short_conv,
                                 eps=c.norm_eps)


# --------------------------------------------------------------------------------------------
# Longhorn.


def longhorn_reference(p, us, state, reset, c):
    """The authors' ``Longhorn.step`` folded over time (their selective_scan_online7_ref):
    β = sigmoid(W_Δ δ + b_Δ), ε = β / (1 + β‖k‖²), S ← (1 − ε k²ᵀ) ⊙ S + (ε x) kᵀ, y = S q + D x."""
    e, r, n = c.d_inner, c.rank, c.d_state
    xz = us @ p["w_in"]
    x, z = xz[..., :e], xz[..., e:]
    x, window = short_conv(x, p["conv_kernel"], p.get("conv_bias"), state[0], reset)
    x = silu(x)
    S = state[1].copy()                                                    # [B, E, N]
    ys = np.zeros(x.shape)
    for b in range(us.shape[0]):
        for t in range(us.shape[1]):
            if reset[b, t]:
                S[b] = 0.0
            dkq = x[b, t] @ p["w_x"]
            delta, k, q = dkq[:r], dkq[r:r + n], dkq[r + n:]
            beta = sigmoid(delta @ p["w_dt"] + p["dt_bias"])                 # [E]
            eps = beta / (1.0 + beta * np.sum(k * k))
            S[b] = (1.0 - np.outer(eps, k * k)) * S[b] + np.outer(eps * x[b, t], k)
            ys[b, t] = S[b] @ q + p["d_skip"] * x[b, t]
    return (ys * silu(z)) @ p["w_out"], (window, S)


# --------------------------------------------------------------------------------------------
# apply in every mode == the reference.


CASES = [
    ("deltanet", {}, deltanet_reference),
    ("deltanet", {"use_gate": True, "use_beta": False, "use_short_conv": False, "expand_k": 0.5},
     deltanet_reference),
    ("gated_deltanet", {}, gated_deltanet_reference),
    ("gated_deltanet", {"use_gate": False, "expand_v": 1.0, "n_heads": 4, "allow_neg_eigval": True},
     gated_deltanet_reference),
    ("longhorn", {}, longhorn_reference),
    ("longhorn", {"dt_rank": 3, "conv_bias": False, "d_state": 5}, longhorn_reference),
]


def _random_state(rec, params, key):
    """A non-zero initial state: every leaf of the fresh state plus N(0, 0.5) noise."""
    leaves, tree = jax.tree.flatten(rec.initial_state(params, B))
    keys = jax.random.split(key, len(leaves))
    noisy = [s + 0.5 * jax.random.normal(k, s.shape) for s, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def _assert_close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = float(np.max(np.abs(want)))
    assert scale > 0, f"{what}: the reference is all zeros, so the check would be empty"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@pytest.mark.parametrize("name,overrides,reference", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}"
                              for n, o, _ in CASES])
def test_apply_in_every_mode_equals_the_float64_loop_of_the_block(name, overrides, reference):
    rec = zoo.get(name, **overrides)
    config = zoo.list_models()[name].make_config(**overrides)
    keys = jax.random.split(jax.random.key(3), 3)
    params = rec.init(keys[0], D_IN)
    xs = jax.random.normal(keys[1], (B, T, D_IN), jnp.float32)
    state = _random_state(rec, params, keys[2])
    ys_ref, final_ref = reference(f64(params), np.asarray(xs, np.float64), f64(state), RESET, config)
    for mode in rec.modes:          # "auto" is one of them (the harness checks which)
        ys, final = rec.apply(params, xs, state=state, reset=jnp.asarray(RESET), mode=mode)
        _assert_close(ys, ys_ref, f"{name} {overrides} mode={mode}: outputs")
        for i, (got, want) in enumerate(zip(jax.tree.leaves(final), jax.tree.leaves(final_ref), strict=True)):
            _assert_close(got, want, f"{name} {overrides} mode={mode}: final state leaf {i}")


# --------------------------------------------------------------------------------------------
# Parameter counts, shapes, initialisation.


def _count(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def test_deltanet_parameter_count_and_state_shapes():
    d, heads, taps = 16, 2, 4
    rec = zoo.get("deltanet", d_model=d, n_heads=heads, expand_k=1.0, expand_v=2.0, conv_size=taps,
                  use_gate=True)
    params = rec.init(jax.random.key(0), D_IN)
    dk, dv = d, 2 * d
    expected = (D_IN * (2 * dk + dv)            # W_q, W_k, W_v
                + D_IN * heads                  # W_β
                + taps * (2 * dk + dv)          # short convolutions (no bias by default)
                + D_IN * dv                     # W_g
                + dv // heads                   # norm scale shared by the heads
                + dv * d)                       # W_o
    assert _count(params) == expected
    window, memory = rec.initial_state(params, 3)
    assert window.shape == (3, taps - 1, 2 * dk + dv)
    assert memory.shape == (3, heads, dk // heads, dv // heads)
    ys, _ = rec.apply(params, jnp.ones((3, T, D_IN)))
    assert ys.shape == (3, T, d)


def test_gated_deltanet_parameter_count_state_shapes_and_decay_init():
    d, heads, d_head, taps = 16, 2, 8, 4
    rec = zoo.get("gated_deltanet", d_model=d, n_heads=heads, d_head=d_head, expand_v=2.0, conv_size=taps)
    params = rec.init(jax.random.key(0), D_IN)
    dk, dv = heads * d_head, heads * 2 * d_head
    expected = (D_IN * (2 * dk + dv) + taps * (2 * dk + dv)
                + 2 * D_IN * heads             # W_β, W_a
                + 2 * heads                    # A_log, dt_bias
                + D_IN * dv                    # W_g (use_gate=True by default, as FLA)
                + dv // heads + dv * d)
    assert _count(params) == expected
    window, memory = rec.initial_state(params, 1)
    assert window.shape == (1, taps - 1, 2 * dk + dv) and memory.shape == (1, heads, d_head, 2 * d_head)
    # FLA's initialisation: A uniform in (0, 16], softplus(dt_bias) = Δ in [1e-4, 0.1].
    big = zoo.get("gated_deltanet", n_heads=64).init(jax.random.key(1), D_IN)
    a = np.exp(np.asarray(big["a_log"], np.float64))
    dt = softplus(np.asarray(big["dt_bias"], np.float64))
    assert np.all((a > 0) & (a <= 16 + 1e-5)) and a.max() > 8 and a.min() < 8
    assert np.all((dt >= 1e-4 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))
    # a_init_range moves A's range and nothing else; at low = 0 no head is drawn without decay.
    slow = zoo.get("gated_deltanet", n_heads=64, a_init_range=(0.0, 1.0)).init(jax.random.key(1), D_IN)
    a_slow = np.exp(np.asarray(slow["a_log"], np.float64))
    assert np.all((a_slow > 0) & (a_slow <= 1 + 1e-6)) and a_slow.max() > 0.5 and a_slow.min() < 0.5
    assert all(np.array_equal(slow[k], big[k]) for k in big if k != "a_log")
    fixed = zoo.get("gated_deltanet", n_heads=4, a_init_range=(2.0, 2.0)).init(jax.random.key(1), D_IN)
    np.testing.assert_allclose(np.exp(np.asarray(fixed["a_log"])), 2.0, rtol=1e-6)


def test_longhorn_parameter_count_state_shapes_and_decay_range():
    d, n, taps, expand = 16, 4, 4, 2
    rec = zoo.get("longhorn", d_model=d, d_state=n, d_conv=taps, expand=expand)
    params = rec.init(jax.random.key(0), D_IN)
    e, r = expand * d, 1                                     # dt_rank "auto" = ceil(16 / 16)
    expected = (D_IN * 2 * e + taps * e + e                # in-proj, conv taps and bias
                + e * (r + 2 * n) + r * e + e              # W_x, W_Δ and its bias
                + e + e * d)                               # D, out-proj
    assert _count(params) == expected
    window, memory = rec.initial_state(params, 2)
    assert window.shape == (2, taps - 1, e) and memory.shape == (2, e, n)
    state_size = zoo.list_models()["longhorn"].state_size(d_model=d, d_state=n, d_conv=taps)
    assert state_size == (taps - 1) * e + e * n
    # The transition 1 − ε k² stays in (0, 1] whatever k and β (ε‖k‖² < 1): no decay parameter needed.
    from zoo.models.longhorn import LonghornConfig, online_step_inputs
    big = jax.tree.map(lambda w: 3.0 * w, params)
    x = 3.0 * jax.random.normal(jax.random.key(2), (4, 7, e))
    a, _, _ = online_step_inputs(big, x, LonghornConfig(d_model=d, d_state=n, d_conv=taps, expand=expand))
    assert float(jnp.min(a)) > 0.0 and float(jnp.max(a)) <= 1.0


# --------------------------------------------------------------------------------------------
# Bad configs.


@pytest.mark.parametrize("name,overrides,field", [
    ("deltanet", {"n_heads": 3}, "n_heads"),
    ("deltanet", {"expand_k": 0.0}, "expand_k"),
    ("deltanet", {"conv_size": 0}, "conv_size"),
    ("deltanet", {"use_gate": "yes"}, "use_gate"),
    ("deltanet", {"chunk_size": 0}, "chunk_size"),
    ("gated_deltanet", {"expand_v": 0.3}, "expand_v"),
    ("gated_deltanet", {"d_head": 0}, "d_head"),
    ("gated_deltanet", {"norm_eps": -1.0}, "norm_eps"),
    ("gated_deltanet", {"a_init_range": (1.0, 0.5)}, "a_init_range"),
    ("gated_deltanet", {"a_init_range": (-1.0, 2.0)}, "a_init_range"),
    ("gated_deltanet", {"a_init_range": (0.0, 0.0)}, "a_init_range"),
    ("gated_deltanet", {"a_init_range": (1.0,)}, "a_init_range"),
    ("longhorn", {"d_state": 0}, "d_state"),
    ("longhorn", {"dt_rank": 0}, "dt_rank"),
    ("longhorn", {"expand": 1.5}, "expand"),
])
def test_bad_config_raises_value_error_naming_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        zoo.get(name, **overrides)
