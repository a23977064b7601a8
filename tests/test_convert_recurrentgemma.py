"""zoo.convert.from_recurrentgemma against recurrentgemma's own JAX Griffin: the same logits.

Both sides run in float32 on the same random weights (recurrentgemma's initialisation with every
parameter, biases and norm scales included, moved by N(0, 0.1²) noise so that none is zero) and the
same tokens. They order some sums differently (RoPE by relative offset instead of absolute position,
1 - a² as -expm1, one block-diagonal product for both gates), so the logits agree to rounding:
compared at 1e-4 absolute and relative (logits are O(1)-O(10)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.convert import from_recurrentgemma
from zoo.models import griffin

rg = pytest.importorskip("recurrentgemma.jax")
common = pytest.importorskip("recurrentgemma.common")
# Small shapes checked for values: compiled without XLA's optimisation passes (tests/conftest.py).
pytestmark = [pytest.mark.refs, pytest.mark.usefixtures("quick_compile")]

B, T, VOCAB = 2, 13, 50
R, A = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION
PATTERNS = {"griffin": (R, R, A), "hawk": (R, R)}
TOL = 1e-4


@functools.cache          # the same model in several tests: initialised (eagerly) once
def rg_model(pattern: str, soft_cap: float = 30.0, scale_embeddings: bool = True):
    config = rg.GriffinConfig(vocab_size=VOCAB, width=16, mlp_expanded_width=48, num_heads=2,
                              block_types=PATTERNS[pattern], embeddings_scale_by_sqrt_dim=scale_embeddings,
                              attention_window_size=4, logits_soft_cap=soft_cap, lru_width=24,
                              scan_type=common.ScanType.LINEAR_NATIVE)
    model = rg.Griffin(config, gradient_checkpointing=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (B, T)), jnp.int32)
    params = model.init(jax.random.key(0), tokens, _positions(np.zeros((B, T), bool)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys, strict=True)])
    return model, config, params, tokens


def _positions(reset: np.ndarray) -> jnp.ndarray:
    """recurrentgemma's segment_pos: the position of each token within its segment."""
    pos = np.zeros(reset.shape, np.int32)
    for b in range(reset.shape[0]):
        for t in range(1, reset.shape[1]):
            pos[b, t] = 0 if reset[b, t] else pos[b, t - 1] + 1
    return jnp.asarray(pos)


# The modes agree with each other in the harness; chunked against recurrentgemma is a `-m slow` run.
@pytest.mark.parametrize("mode", ["sequential", pytest.param("chunked", marks=pytest.mark.slow)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_logits_match_recurrentgemma(pattern, mode):
    model, config, params, tokens = rg_model(pattern)
    want, _ = model.apply(params, tokens, _positions(np.zeros((B, T), bool)))
    zoo_config, lm = from_recurrentgemma(params, config)
    assert zoo_config.block_types == tuple(k.name.lower() for k in PATTERNS[pattern])
    got, _ = griffin.lm_apply(zoo_config, lm, tokens, mode=mode)
    assert got.shape == (B, T, VOCAB)
    assert float(np.max(np.abs(want))) > 1.0, "the comparison should see non-trivial logits"
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_packed_segments_match_recurrentgemma_segment_positions(pattern):
    model, config, params, tokens = rg_model(pattern, soft_cap=0.0, scale_embeddings=False)
    reset = np.zeros((B, T), bool)
    reset[0, [5, 6]] = True
    reset[1, 9] = True
    want, _ = model.apply(params, tokens, _positions(reset))
    zoo_config, lm = from_recurrentgemma(params, config)
    assert zoo_config.logits_soft_cap == 0.0 and not zoo_config.scale_embeddings
    got, _ = griffin.lm_apply(zoo_config, lm, tokens, reset=jnp.asarray(reset))
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_decoding_after_a_prompt_matches_recurrentgemma_with_its_cache(pattern):
    """A prompt longer than the window, then tokens one at a time with each side's own state."""
    model, config, params, tokens = rg_model(pattern)
    prompt = 9
    positions = _positions(np.zeros((B, T), bool))
    want_prompt, cache = model.apply(params, tokens[:, :prompt], positions[:, :prompt])
    zoo_config, lm = from_recurrentgemma(params, config)
    got_prompt, state = griffin.lm_apply(zoo_config, lm, tokens[:, :prompt])
    np.testing.assert_allclose(got_prompt, want_prompt, rtol=TOL, atol=TOL)
    # Jitted once each: eager, every token dispatches the whole model op by op (minutes on 2 cores).
    rg_step = jax.jit(model.apply)
    zoo_step = jax.jit(griffin.lm_step, static_argnums=0)
    for t in range(prompt, T):
        want_t, cache = rg_step(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        state, got_t = zoo_step(zoo_config, lm, state, tokens[:, t])
        np.testing.assert_allclose(got_t, want_t[:, 0], rtol=TOL, atol=TOL, err_msg=f"token {t}")


def test_complex_rglru_is_refused():
    from zoo.convert import from_recurrentgemma_rglru

    layer = rg.RGLRU(width=8, num_heads=2, only_real=False)
    x = jnp.ones((1, 3, 8))
    params = layer.init(jax.random.key(0), x, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="complex"):
        from_recurrentgemma_rglru(params)
