"""Griffin and Hawk language models against a naive float64 forward pass written from the paper.

``naive_logits`` is independent of zoo's code: RMSNorm, the gated MLP and the embedding written
out, the recurrent block from tests/test_rglru.py's loop, and local attention as dense masked
multi-query attention over each segment with RoPE at absolute positions within the segment (the
form recurrentgemma writes). Under ``jax.enable_x64`` every mode agrees with it to 1e-9 (the modes
differ only in the order of float operations). Decoding (``lm_step``) is checked against the
parallel logits in float32 at 1e-5. recurrentgemma itself is compared in
tests/test_convert_recurrentgemma.py (refs).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rglru import naive_recurrent_block

import zoo
from zoo.models import griffin

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, VOCAB = 2, 12, 37
CONFIG = griffin.GriffinConfig(d_model=16, d_rnn=12, d_mlp=40, n_heads=2, window=3, vocab_size=VOCAB,
                               block_types=("recurrent", "attention", "recurrent"), logits_soft_cap=8.0)


# --------------------------------------------------------------------------------------------
# The naive model.


def _gelu(z):
    return 0.5 * z * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _rms(p, x):
    return x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * p["scale"]


def _rope(x, positions):
    """First half of each head rotated (pairs i, i + K/4) at absolute positions [B, T]."""
    k = x.shape[-1]
    half = k // 4
    freq = 1.0 / 10_000 ** (2 * np.arange(half) / (k // 2))
    angle = positions[:, :, None, None] * freq                                 # [B, T, 1, K/4]
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return jnp.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle),
                            rest], -1)


def naive_attention(p, x, reset, n_heads, window):
    batch, time, d = x.shape
    head = d // n_heads
    segment = np.cumsum(reset, 1)
    positions = np.zeros((batch, time))
    for t in range(1, time):
        positions[:, t] = np.where(reset[:, t], 0, positions[:, t - 1] + 1)
    q = _rope((x @ p["w_q"]).reshape(batch, time, n_heads, head), positions)
    k = _rope((x @ p["w_k"])[:, :, None], positions)[:, :, 0]
    v = x @ p["w_v"]
    t_idx, s_idx = np.arange(time)[:, None], np.arange(time)[None, :]
    mask = (s_idx <= t_idx) & (t_idx - s_idx <= window) & (segment[:, :, None] == segment[:, None, :])
    scores = jnp.einsum("bthk,bsk->bhts", q, k) / math.sqrt(head)
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    o = jnp.einsum("bhts,bsk->bthk", jax.nn.softmax(scores, -1), v).reshape(batch, time, d)
    return o @ p["w_o"] + p["b_o"]


def naive_logits(config, lm, tokens, reset):
    d = config.d_model
    x = lm["embedding"][tokens]
    if config.scale_embeddings:
        x = x * float(jnp.asarray(math.sqrt(d), jnp.bfloat16))
    for p, kind in zip(lm["backbone"]["blocks"], config.block_types, strict=True):
        normed = _rms(p["temporal_norm"], x)
        if kind == "recurrent":
            taps, d_rnn = p["temporal"]["conv_w"].shape
            fresh = {"conv": jnp.zeros((B, taps - 1, d_rnn)), "rglru": {"h": jnp.zeros((B, d_rnn)),
                                                                      "start": jnp.ones(B)}}
            y, _ = naive_recurrent_block(p["temporal"], normed, fresh, reset)
        else:
            y = naive_attention(p["temporal"], normed, reset, config.n_heads, config.window)
        r = x + y
        m = _rms(p["mlp_norm"], r)
        mlp = p["mlp"]
        x = r + (_gelu(m @ mlp["w_gate"] + mlp["b_gate"]) * (m @ mlp["w_up"] + mlp["b_up"])) @ mlp["w_down"] \
            + mlp["b_down"]
    logits = _rms(lm["backbone"]["final_norm"], x) @ lm["embedding"].T
    cap = config.logits_soft_cap
    return cap * jnp.tanh(logits / cap) if cap else logits


def _lm(seed, config=CONFIG, dtype=jnp.float64):
    """Random weights everywhere (biases and norm scales too), and random tokens with resets."""
    rng = np.random.default_rng(seed)
    lm = griffin.lm_init(jax.random.key(seed), config)
    noisy = lambda p: jnp.asarray(np.asarray(p, np.float64) + 0.2 * rng.normal(size=p.shape), dtype)
    lm = jax.tree.map(noisy, lm)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, T)), jnp.int32)
    reset = np.zeros((B, T), bool)
    reset[0, 5] = True
    reset[1, [7, 8]] = True
    return lm, tokens, reset


# --------------------------------------------------------------------------------------------
# Values.


# The modes agree with each other in the harness; the other modes against float64 run with `-m slow`.
@pytest.mark.parametrize("mode", [m if m == "sequential" else pytest.param(m, marks=pytest.mark.slow)
                                  for m in griffin.MODES])
def test_logits_match_the_naive_float64_model(mode):
    with jax.enable_x64(True):
        lm, tokens, reset = _lm(0)
        got, _ = griffin.lm_apply(CONFIG, lm, tokens, reset=jnp.asarray(reset), mode=mode,
                                  dtype=jnp.float64)
        want = naive_logits(CONFIG, lm, tokens, reset)
        assert float(jnp.max(jnp.abs(want))) > 1.0
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_hawk_is_the_all_recurrent_stack():
    with jax.enable_x64(True):
        hawk = griffin.HawkConfig(d_model=16, d_rnn=12, d_mlp=40, n_layers=2, vocab_size=VOCAB,
                                  logits_soft_cap=0.0, scale_embeddings=False)
        assert hawk.block_types == ("recurrent", "recurrent")
        lm, tokens, reset = _lm(1, hawk)
        got, _ = griffin.lm_apply(hawk, lm, tokens, reset=jnp.asarray(reset), dtype=jnp.float64)
        np.testing.assert_allclose(got, naive_logits(hawk, lm, tokens, reset), rtol=1e-9, atol=1e-9)


def test_decoding_token_by_token_equals_the_parallel_logits():
    lm, tokens, reset = _lm(2, dtype=jnp.float32)
    want, final = griffin.lm_apply(CONFIG, lm, tokens)
    state = griffin.lm_initial_state(CONFIG, lm, B)
    for t in range(T):
        state, got = griffin.lm_step(CONFIG, lm, state, tokens[:, t])
        np.testing.assert_allclose(got, want[:, t], rtol=1e-5, atol=1e-5, err_msg=f"token {t}")
    for s, f in zip(jax.tree.leaves(state), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(s, f, rtol=1e-5, atol=1e-5)


def test_attention_sees_exactly_the_window():
    """Changing the token `window + 1` steps back leaves the attention block's output unchanged;
    changing the token `window` steps back does not."""
    config = dataclasses.replace(CONFIG, block_types=("attention",))
    rec = zoo.get("griffin", **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    params = rec.init(jax.random.key(3), 16)
    xs = jax.random.normal(jax.random.key(4), (1, T, 16))
    base, _ = rec.apply(params, xs)
    t = T - 1
    far, _ = rec.apply(params, xs.at[:, t - config.window - 1].add(1.0))
    near, _ = rec.apply(params, xs.at[:, t - config.window].add(1.0))
    np.testing.assert_allclose(far[:, t], base[:, t], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(near[:, t] - base[:, t]))) > 1e-3


def test_embedding_scale_is_sqrt_width_rounded_to_bfloat16():
    config = dataclasses.replace(CONFIG, d_model=24, d_rnn=24)
    embedding = jnp.asarray(np.random.default_rng(5).normal(size=(VOCAB, 24)), jnp.float32)
    x = griffin.embed(config, embedding, jnp.asarray([[3, 4]]))
    # sqrt(24) = 4.89898 is 4.90625 in bfloat16 (8 significant bits).
    np.testing.assert_array_equal(x, embedding[jnp.asarray([[3, 4]])] * 4.90625)


def test_state_size_counts_the_floats_of_the_state():
    config = dataclasses.replace(CONFIG, window=6, conv_width=3)
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    rec = zoo.get("griffin", **kwargs)
    state = rec.initial_state(rec.init(jax.random.key(0), 16), 1)
    floats = sum(leaf.size for leaf in jax.tree.leaves(state))
    # two recurrent blocks: conv window 2 x 12, h 12, start 1; one attention block: 6 x (8 + 8 + 1)
    assert floats == zoo.list_models()["griffin"].state_size(**kwargs) == 2 * (24 + 12 + 1) + 6 * 17


# --------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("bad,match", [
    (dict(d_model=12, d_rnn=12), "head width divisible by 4"),
    (dict(block_types=("recurrent", "mlp")), "block_types"),
    (dict(block_types=()), "block_types"),
    (dict(window=0), "window"),
    (dict(d_rnn=13), "multiple of n_heads"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("griffin", **bad)


def test_bad_tokens_raise():
    lm = griffin.lm_init(jax.random.key(0), CONFIG)
    with pytest.raises(ValueError, match=r"tokens must be an integer array \[B, T\]"):
        griffin.lm_apply(CONFIG, lm, jnp.zeros((B, T), jnp.float32))
    with pytest.raises(ValueError, match=r"token_t must be an integer array \[B\]"):
        griffin.lm_step(CONFIG, lm, griffin.lm_initial_state(CONFIG, lm, B), jnp.zeros((B, 1), jnp.int32))
