"""The mamba block: against the same block written in torch around mamba_ssm's selective_scan_ref (refs),
its initialisation against the paper's, and its config checks. Step == apply, resets, jit, vmap and
bfloat16 are the shared harness's (tests/test_harness.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.mamba import MambaConfig, inverse_softplus

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

BATCH, T, D_IN = 2, 13, 5


def _torch_block(params, xs, config: MambaConfig, selective_scan_ref):
    """mamba_ssm's ``Mamba.forward`` slow path (use_fast_path=False) on our weights, in torch float32."""
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    e, n, r, k = config.d_inner, config.d_state, config.rank, config.d_conv
    xz = torch.tensor(np.asarray(xs)) @ p["w_in"]
    x, z = (v.transpose(1, 2) for v in xz.chunk(2, dim=-1))                       # [B, E, L]
    conv_state = x[:, :, -(k - 1):].transpose(1, 2)                                 # last K-1 inputs
    weight = p["conv_kernel"].T[:, None, :]                                          # torch's [E, 1, K]
    x = F.silu(F.conv1d(x, weight, p.get("conv_bias"), padding=k - 1, groups=e)[..., :xs.shape[1]])
    x_dbl = x.transpose(1, 2) @ p["w_x"]
    dt, b, c = torch.split(x_dbl, [r, n, n], dim=-1)
    dt = (dt @ p["w_dt"]).transpose(1, 2)
    y, last = selective_scan_ref(x, dt, -torch.exp(p["a_log"]), b.transpose(1, 2).contiguous(),
                                 c.transpose(1, 2).contiguous(), p["d_skip"], z=z, delta_bias=p["dt_bias"],
                                 delta_softplus=True, return_last_state=True)
    out = y.transpose(1, 2) @ p["w_out"]
    return out.numpy(), (conv_state.numpy(), last.numpy())


@pytest.mark.refs
@pytest.mark.parametrize("config", [{}, {"d_model": 16, "d_state": 8, "d_conv": 3, "dt_rank": 3}])
@pytest.mark.parametrize("mode", ["sequential", "chunked", "associative"])
def test_block_matches_torch_block_around_mamba_ssm_selective_scan_ref(config, mode):
    from tests.refs.mamba_ssm_reference import load_mamba_reference

    ref = load_mamba_reference()
    rec = zoo.get("mamba", chunk_size=4, **config)
    cfg = MambaConfig(**config)
    params = rec.init(jax.random.key(0), D_IN)
    # Δ near the top of its range and larger inputs, so the recurrence carries information over steps.
    params["dt_bias"] = params["dt_bias"] + 2.0
    xs = 2.0 * jax.random.normal(jax.random.key(1), (BATCH, T, D_IN), jnp.float32)
    want_out, (want_window, want_h) = _torch_block(params, xs, cfg, ref.selective_scan_ref)
    out, (window, h) = rec.apply(params, xs, mode=mode)
    # float32 on both sides, sums in another order: agreement to a few ulps of the largest values.
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4 * np.max(np.abs(want_out)))
    np.testing.assert_allclose(window, want_window, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=1e-4 * np.max(np.abs(want_h)))


def test_prefill_with_apply_then_decode_with_step_equals_apply_on_the_whole():
    rec = zoo.get("mamba")
    params = rec.init(jax.random.key(2), D_IN)
    xs = jax.random.normal(jax.random.key(3), (BATCH, T, D_IN), jnp.float32)
    want, want_state = rec.apply(params, xs)
    prefix = 6
    got, state = rec.apply(params, xs[:, :prefix])
    steps = []
    for t in range(prefix, T):
        state, y_t = rec.step(params, state, xs[:, t])
        steps.append(y_t)
    got = jnp.concatenate([got, jnp.stack(steps, axis=1)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_initialisation_follows_the_paper():
    config = MambaConfig(d_model=64, d_state=16)
    rec = zoo.get("mamba", d_model=64, d_state=16)
    params = rec.init(jax.random.key(4), 64)
    e = config.d_inner
    assert config.rank == math.ceil(64 / 16) and params["w_dt"].shape == (config.rank, e)
    # S4D-real: A[e, n] = -(n + 1) for every channel; D = 1.
    s4d_real = -np.broadcast_to(np.arange(1, 17), (e, 16))
    np.testing.assert_allclose(-np.exp(params["a_log"]), s4d_real, rtol=1e-6)
    np.testing.assert_array_equal(params["d_skip"], np.ones(e))
    # softplus(dt_bias) is Δ at zero input: log-uniform in [dt_min, dt_max] = [1e-3, 1e-1].
    dt = np.asarray(jax.nn.softplus(params["dt_bias"]), np.float64)
    assert np.all(dt >= 1e-3 * (1 - 1e-5)) and np.all(dt <= 1e-1 * (1 + 1e-5))
    log_dt = np.log(dt)
    assert abs(np.mean(log_dt) - 0.5 * (np.log(1e-3) + np.log(1e-1))) < 0.4    # mean of U(log 1e-3, log 1e-1)
    assert np.std(log_dt) > 0.8 * (np.log(1e-1) - np.log(1e-3)) / np.sqrt(12)   # spread, not a constant
    assert params["conv_kernel"].shape == (config.d_conv, e)
    assert np.max(np.abs(params["conv_kernel"])) <= 1 / np.sqrt(config.d_conv)


def test_inverse_softplus_inverts_softplus_without_cancellation():
    dt = jnp.asarray([1e-4, 1e-3, 0.05, 0.1, 3.0], jnp.float32)
    np.testing.assert_allclose(jax.nn.softplus(inverse_softplus(dt)), dt, rtol=1e-5)


def test_state_is_the_conv_window_and_the_ssm_state_whatever_the_length():
    rec = zoo.get("mamba", d_model=8, d_state=4, d_conv=4, expand=2)
    params = rec.init(jax.random.key(5), D_IN)
    for length in (1, 7, 40):
        _, (window, h) = rec.apply(params, jnp.ones((BATCH, length, D_IN)) * 0.3)
        assert window.shape == (BATCH, 3, 16) and h.shape == (BATCH, 16, 4)
    assert zoo.list_models()["mamba"].state_size() == 3 * 16 + 16 * 4


@pytest.mark.parametrize("bad", [{"d_model": 0}, {"d_state": -1}, {"expand": 1.5}, {"d_conv": 0},
                                 {"dt_rank": 0}, {"dt_min": 0.2, "dt_max": 0.1}, {"dt_min": 0.0},
                                 {"dt_init_floor": 0.0}, {"chunk_size": 0}])
def test_invalid_config_raises_naming_the_field(bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        zoo.get("mamba", **bad)
