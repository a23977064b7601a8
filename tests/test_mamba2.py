"""mamba2: the block against a float64 numpy loop written from the paper, and against the same block
computed in torch with mamba_ssm's own reference functions on our weights (the `refs` extra).

The model runs in float32; the numpy loop in float64 from the same float32 weights and inputs, so
the difference is float32 rounding: compared at rtol 1e-4 and atol 1e-5 of each output's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.mamba2 import Mamba2Config

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

BATCH, T, D_IN = 2, 13, 6
CONFIG = {"d_model": 8, "d_state": 4, "d_conv": 3, "d_head": 4, "n_groups": 2, "chunk_size": 4}


def _silu(v):
    return v / (1 + np.exp(-v))


def _numpy_step(p, c, window, h, u_t):
    """One token of the block in float64: (window, h, y_t)."""
    e, g, n, heads = c.d_inner, c.n_groups, c.d_state, c.n_heads
    proj = u_t @ p["w_in"]
    z, xbc, dt = proj[:, :e], proj[:, e:2 * e + 2 * g * n], proj[:, 2 * e + 2 * g * n:]
    taps = np.concatenate([window, xbc[:, None]], axis=1)                     # [B, K, C], oldest first
    xbc = _silu(np.einsum("bkc,kc->bc", taps, p["conv_kernel"]) + p["conv_bias"])
    x, b, cc = xbc[:, :e], xbc[:, e:e + g * n], xbc[:, e + g * n:]
    delta = np.logaddexp(0.0, dt + p["dt_bias"])
    A = -np.exp(p["a_log"])
    y = np.zeros((u_t.shape[0], e))
    h = h.copy()
    for head in range(heads):
        grp = head // (heads // g)
        xh = x[:, head * c.d_head:(head + 1) * c.d_head]
        bh, ch = b[:, grp * n:(grp + 1) * n], cc[:, grp * n:(grp + 1) * n]
        h[:, head] = (np.exp(delta[:, head] * A[head])[:, None, None] * h[:, head]
                      + np.einsum("bp,bn->bpn", delta[:, head, None] * xh, bh))
        y[:, head * c.d_head:(head + 1) * c.d_head] = (np.einsum("bpn,bn->bp", h[:, head], ch)
                                                       + p["d_skip"][head] * xh)
    gated = (y * _silu(z)).reshape(u_t.shape[0], g, e // g)
    normed = gated / np.sqrt(np.mean(gated**2, axis=-1, keepdims=True) + c.norm_eps)
    out = (normed.reshape(u_t.shape[0], e) * p["norm_scale"]) @ p["w_out"]
    return taps[:, 1:], h, out


def _numpy_block(params, c, us, state, reset, reverse):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    window, h = (np.asarray(s, np.float64) for s in state)
    ys = np.zeros((us.shape[0], us.shape[1], c.d_model))
    order = range(us.shape[1] - 1, -1, -1) if reverse else range(us.shape[1])
    for t in order:
        flag = reset[:, t + 1] if reverse and t + 1 < us.shape[1] else (None if reverse else reset[:, t])
        if flag is not None:
            window = np.where(flag[:, None, None], 0.0, window)
            h = np.where(flag[:, None, None, None], 0.0, h)
        window, h, ys[:, t] = _numpy_step(p, c, window, h, np.asarray(us[:, t], np.float64))
    return ys, (window, h)


def _setup(seed=0, **overrides):
    config = dict(CONFIG, **overrides)
    rec = zoo.get("mamba2", **config)
    keys = jax.random.split(jax.random.key(seed), 4)
    params = rec.init(keys[0], D_IN)
    # Randomise the parameters that start constant (D = 1, norm scale = 1), so that each is tested.
    params["d_skip"] = jax.random.normal(keys[1], params["d_skip"].shape)
    params["norm_scale"] = 1 + 0.3 * jax.random.normal(keys[2], params["norm_scale"].shape)
    us = jax.random.normal(keys[3], (BATCH, T, D_IN), jnp.float32)
    state = jax.tree.map(lambda s: s + 0.5 * jax.random.normal(keys[3], s.shape),
                         rec.initial_state(params, BATCH))
    return rec, params, us, state, Mamba2Config(**config)


def _close(got, want, what):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


RESET = np.zeros((BATCH, T), bool)
RESET[0, [5, 6]] = True
RESET[1, [0, 9]] = True


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", ["chunked", "sequential"])
def test_apply_matches_a_float64_loop_of_the_block(mode, reverse):
    rec, params, us, state, c = _setup()
    ys, final = jax.jit(rec.apply, static_argnames=("mode", "reverse"))(
        params, us, state=state, reset=jnp.asarray(RESET), mode=mode, reverse=reverse)
    want_ys, want_final = _numpy_block(params, c, us, state, RESET, reverse)
    _close(ys, want_ys, "outputs")
    _close(final[0], want_final[0], "conv window")
    _close(final[1], want_final[1], "ssd state")


def test_step_matches_a_float64_loop_of_the_block():
    rec, params, us, state, c = _setup(1)
    step = jax.jit(rec.step)
    window, h = (np.asarray(s, np.float64) for s in state)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for t in range(4):
        state, y_t = step(params, state, us[:, t])
        window, h, want = _numpy_step(p, c, window, h, np.asarray(us[:, t], np.float64))
        _close(y_t, want, f"step {t}")
    _close(state[1], h, "ssd state")


def test_init_draws_decays_and_step_sizes_in_their_ranges():
    c = Mamba2Config(d_model=64, d_head=4)
    params = zoo.get("mamba2", d_model=64, d_head=4).init(jax.random.key(3), 64)
    A = np.exp(np.asarray(params["a_log"]))
    delta = np.asarray(jax.nn.softplus(params["dt_bias"]))
    assert A.shape == (c.n_heads,) and np.all((A >= 1) & (A <= 16)) and A.std() > 2
    assert np.all(delta >= c.dt_min * (1 - 1e-5)) and np.all(delta <= c.dt_max * (1 + 1e-5))
    assert np.log(delta).std() > 0.5, "log-uniform, not constant"
    assert params["conv_kernel"].shape == (c.d_conv, c.d_inner + 2 * c.n_groups * c.d_state)


@pytest.mark.parametrize("bad,match", [({"d_head": 5}, "d_head"), ({"n_groups": 3}, "n_groups"),
                                       ({"d_state": 0}, "d_state"), ({"chunk_size": 0}, "chunk_size"),
                                       ({"a_init_range": (0.0, 1.0)}, "a_init_range")])
def test_config_that_cannot_work_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("mamba2", **bad)


# --------------------------------------------------------------------------------------------
# Against mamba_ssm's torch references on our weights.


def _torch_forward(ref, params, c, us):
    """mamba_ssm's Mamba2.forward (the non-fused path) written with its reference functions."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    e, g, n, heads, taps = c.d_inner, c.n_groups, c.d_state, c.n_heads, c.d_conv
    batch, time, _ = us.shape
    zxbcdt = F.linear(torch.tensor(np.asarray(us)), t["w_in"].T)
    z, xbc, dt = torch.split(zxbcdt, [e, e + 2 * g * n, heads], dim=-1)
    conv_weight = t["conv_kernel"].T[:, None, :]                               # torch's [C, 1, K]
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), conv_weight, t["conv_bias"], padding=taps - 1,
                          groups=xbc.shape[-1])[..., :time].transpose(1, 2))
    x, b, cc = torch.split(xbc, [e, g * n, g * n], dim=-1)
    y = ref.ssd_chunk_scan_combined_ref(x.reshape(batch, time, heads, c.d_head), dt, -torch.exp(t["a_log"]),
                                        b.reshape(batch, time, g, n), cc.reshape(batch, time, g, n),
                                        c.chunk_size, D=t["d_skip"], dt_bias=t["dt_bias"], dt_softplus=True)
    y = ref.rms_norm_ref(y.reshape(batch, time, e), t["norm_scale"], None, z=z, eps=c.norm_eps,
                         group_size=e // g, norm_before_gate=False)
    return F.linear(y, t["w_out"].T)


def _torch_step(ref, params, c, conv_state, ssm_state, u_t):
    """mamba_ssm's Mamba2.step with selective_state_update_ref; states updated in place."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    e, g, n, heads, p = c.d_inner, c.n_groups, c.d_state, c.n_heads, c.d_head
    z, xbc, dt = torch.split(F.linear(torch.tensor(np.asarray(u_t)), t["w_in"].T), [e, e + 2 * g * n, heads],
                             dim=-1)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))               # [B, C, K]
    conv_state[:, :, -1] = xbc
    xbc = F.silu(torch.sum(conv_state * t["conv_kernel"].T, dim=-1) + t["conv_bias"])
    x, b, cc = torch.split(xbc, [e, g * n, g * n], dim=-1)
    per_channel = lambda v: v[..., None].expand(*v.shape, p)
    y = ref.selective_state_update_ref(
        ssm_state, x.reshape(-1, heads, p), per_channel(dt), per_channel(-torch.exp(t["a_log"]))[..., None]
        .expand(heads, p, n), b.reshape(-1, g, n), cc.reshape(-1, g, n), D=per_channel(t["d_skip"]),
        dt_bias=per_channel(t["dt_bias"]), dt_softplus=True)
    y = ref.rms_norm_ref(y.reshape(-1, e), t["norm_scale"], None, z=z, eps=c.norm_eps, group_size=e // g,
                         norm_before_gate=False)
    return F.linear(y, t["w_out"].T)


@pytest.mark.refs
@pytest.mark.parametrize("mode", ["chunked", "sequential"])
def test_apply_matches_mamba_ssm_reference_block_on_our_weights(mode):
    from tests.refs.mamba_ssm_reference import load_mamba_reference

    ref = load_mamba_reference()
    rec, params, _, _, c = _setup(4)
    us = jax.random.normal(jax.random.key(5), (BATCH, 16, D_IN), jnp.float32)   # a multiple of the chunk
    ys, _ = rec.apply(params, us, mode=mode)
    want = _torch_forward(ref, params, c, us).detach().numpy()
    _close(ys, want, "outputs")


@pytest.mark.refs
def test_step_matches_mamba_ssm_reference_step_on_our_weights():
    import torch

    from tests.refs.mamba_ssm_reference import load_mamba_reference

    ref = load_mamba_reference()
    rec, params, us, _, c = _setup(6)
    conv_width = c.d_inner + 2 * c.n_groups * c.d_state
    conv_state = torch.zeros(BATCH, conv_width, c.d_conv)
    ssm_state = torch.zeros(BATCH, c.n_heads, c.d_head, c.d_state)
    state = rec.initial_state(params, BATCH)
    step = jax.jit(rec.step)
    with torch.no_grad():
        for t in range(6):
            want = _torch_step(ref, params, c, conv_state, ssm_state, us[:, t]).numpy()
            state, y_t = step(params, state, us[:, t])
            _close(y_t, want, f"step {t}")
    _close(state[0], conv_state[:, :, 1:].transpose(1, 2).numpy(), "conv window")
    _close(state[1], ssm_state.numpy(), "ssd state")
