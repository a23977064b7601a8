"""hydra: the block against its quasiseparable matrix built densely in float64, and against the
authors' forward pass written in torch with mamba_ssm's reference functions (the `refs` extra).

The dense reference follows the paper's definition entry by entry (the module docstring spells it
out): per head, ``m_ij`` below the diagonal from the forward generators, above it from the backward
ones, ``δ_i`` on it, nothing across a segment boundary; the given states add their own terms. The
model runs in float32 from the same weights, so outputs agree to float32 rounding (rtol 1e-4, atol
1e-5 of the scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.hydra import HydraConfig

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

BATCH, T, D_IN = 2, 11, 6
CONFIG = {"d_model": 8, "d_state": 4, "d_conv": 5, "d_head": 4, "n_groups": 2, "chunk_size": 4}


def _silu(v):
    return v / (1 + np.exp(-v))


def _projections(p, c, us, segment):
    """Everything before the mixer, in float64: z, x [B, T, H, P], the generators and the decays."""
    e, g, n, heads, taps = c.d_inner, c.n_groups, c.d_state, c.n_heads, c.d_conv
    batch, time, _ = us.shape
    proj = us @ p["w_in"]
    z, xbc, dt = proj[..., :e], proj[..., e:2 * e + 4 * g * n], proj[..., 2 * e + 4 * g * n:]
    conv = np.zeros_like(xbc) + p["conv_bias"]
    for b in range(batch):
        for t in range(time):
            for k in range(taps):
                s = t + k - taps // 2
                if 0 <= s < time and segment[b, s] == segment[b, t]:
                    conv[b, t] += p["conv_kernel"][k] * xbc[b, s]
    xbc = _silu(conv)
    x = xbc[..., :e]
    gens = [xbc[..., e + i * g * n:e + (i + 1) * g * n].reshape(batch, time, g, n) for i in range(4)]
    A = -np.exp(p["a_log"])
    delta_f = np.logaddexp(0.0, dt[..., :heads] + p["dt_bias"])
    delta_b = np.logaddexp(0.0, dt[..., heads:] + p["dt_bias"])
    diag = x @ p["w_diag"] + p["d_skip"]
    return z, x.reshape(batch, time, heads, c.d_head), gens, (delta_f, delta_b), A, diag


def _dense_hydra(params, c, us, state, reset):
    """Outputs and final states from the explicit quasiseparable matrix (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    us = np.asarray(us, np.float64)
    h_f0, h_b0 = (np.asarray(s, np.float64) for s in state)
    batch, time, _ = us.shape
    segment = np.cumsum(reset, axis=1)
    z, x, (b_f, c_f, b_b, c_b), (delta_f, delta_b), A, diag = _projections(p, c, us, segment)
    a_f, a_b = np.exp(delta_f * A), np.exp(delta_b * A)
    heads, per_group = c.n_heads, c.n_heads // c.n_groups
    y = np.zeros_like(x)
    final_f, final_b = np.zeros_like(h_f0), np.zeros_like(h_b0)
    for b in range(batch):
        seg = segment[b]
        for h in range(heads):
            g = h // per_group
            m = np.zeros((time, time))
            for i in range(time):
                for j in range(time):
                    if seg[i] != seg[j]:
                        continue
                    if i > j:      # C_f,i-1 · B_f,j Δ_f,j Π_{j<k<i} a_f,k
                        m[i, j] = (c_f[b, i - 1, g] @ b_f[b, j, g] * delta_f[b, j, h]
                                   * np.prod(a_f[b, j + 1:i, h]))
                    elif i < j:    # C_b,i+1 · B_b,j Δ_b,j Π_{i<k<j} a_b,k
                        m[i, j] = (c_b[b, i + 1, g] @ b_b[b, j, g] * delta_b[b, j, h]
                                   * np.prod(a_b[b, i + 1:j, h]))
                    else:
                        m[i, j] = diag[b, i, h]
            y[b, :, h] = m @ x[b, :, h]
            # The given states: forwards before step 0, backwards after step T-1.
            for i in range(time):
                if i > 0 and seg[i] == 0:
                    y[b, i, h] += np.prod(a_f[b, :i, h]) * h_f0[b, h] @ c_f[b, i - 1, g]
                if i < time - 1 and seg[i] == seg[-1]:
                    y[b, i, h] += np.prod(a_b[b, i + 1:, h]) * h_b0[b, h] @ c_b[b, i + 1, g]
            for j in range(time):
                if seg[j] == seg[-1]:
                    final_f[b, h] += (np.prod(a_f[b, j + 1:, h]) * delta_f[b, j, h]
                                      * np.outer(x[b, j, h], b_f[b, j, g]))
                if seg[j] == seg[0]:
                    final_b[b, h] += (np.prod(a_b[b, :j, h]) * delta_b[b, j, h]
                                      * np.outer(x[b, j, h], b_b[b, j, g]))
            if seg[-1] == 0:
                final_f[b, h] += np.prod(a_f[b, :, h]) * h_f0[b, h]
            if seg[0] == seg[-1]:
                final_b[b, h] += np.prod(a_b[b, :, h]) * h_b0[b, h]
    y = y.reshape(batch, time, c.d_inner)
    normed = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + c.norm_eps) * p["norm_scale"] * _silu(z)
    return normed @ p["w_out"], (final_f, final_b)


def _setup(seed=0, **overrides):
    config = dict(CONFIG, **overrides)
    rec = zoo.get("hydra", **config)
    keys = jax.random.split(jax.random.key(seed), 5)
    params = rec.init(keys[0], D_IN)
    # Randomise what starts constant (A = 1, D = 1, norm scale = 1), so that each is tested.
    params["a_log"] = 0.5 * jax.random.normal(keys[1], params["a_log"].shape)
    params["d_skip"] = jax.random.normal(keys[2], params["d_skip"].shape)
    params["norm_scale"] = 1 + 0.3 * jax.random.normal(keys[3], params["norm_scale"].shape)
    us = jax.random.normal(keys[4], (BATCH, T, D_IN), jnp.float32)
    state = jax.tree.map(lambda s: s + jax.random.normal(keys[4], s.shape), rec.initial_state(params, BATCH))
    return rec, params, us, state, HydraConfig(**config)


def _close(got, want, what):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


RESET = np.zeros((BATCH, T), bool)
RESET[0, [4, 5]] = True
RESET[1, [0, 8]] = True


@pytest.mark.parametrize("mode", ["chunked", "sequential"])
@pytest.mark.parametrize("case", ["paper", "segments_and_states", "even_conv"])
def test_apply_equals_the_dense_quasiseparable_matrix(case, mode):
    """"paper": one sequence from zero states, the paper's setting; then resets with given states;
    then an even convolution width (taps t-K//2 .. t+K-1-K//2)."""
    rec, params, us, state, c = _setup(1, **({"d_conv": 4} if case == "even_conv" else {}))
    reset = np.zeros((BATCH, T), bool) if case == "paper" else RESET
    if case == "paper":
        state = rec.initial_state(params, BATCH)
    apply = jax.jit(rec.apply, static_argnames=("mode",))
    ys, final = apply(params, us, state=state, reset=jnp.asarray(reset), mode=mode)
    want_ys, (want_f, want_b) = _dense_hydra(params, c, us, state, reset)
    _close(ys, want_ys, "outputs")
    _close(final[0], want_f, "forward state")
    _close(final[1], want_b, "backward state")


def test_every_output_reads_both_directions():
    """The gradient of a random read-out of y_5 reaches every x_j of its row, before and after t = 5
    (bidirectional mixing), and nothing of the other row. (A gradient, not ``jax.jacrev``: vmap of the
    backward pass at this size crashes XLA:CPU's YNNPACK fusion in jaxlib 0.10.2.)"""
    rec, params, us, _, _ = _setup(2)
    w = jax.random.normal(jax.random.key(7), (rec.apply(params, us)[0].shape[-1],))
    grad = jax.grad(lambda u: jnp.sum(rec.apply(params, u)[0][0, 5] * w))(us)
    reach = np.abs(np.asarray(grad[0])).sum(axis=-1)
    assert np.all(reach > 1e-6), "y_5 depends on every x_j of its row"
    assert np.all(np.asarray(grad[1]) == 0), "rows do not mix"


def test_reverse_is_the_mirror_image_on_flipped_time():
    rec, params, us, state, _ = _setup(3)
    ys_rev, final_rev = rec.apply(params, us, state=state, reverse=True)
    ys, final = rec.apply(params, jnp.flip(us, axis=1), state=state)
    _close(ys_rev, np.flip(np.asarray(ys), axis=1), "outputs")
    _close(final_rev[0], np.asarray(final[0]), "forward state")


def test_step_is_refused_and_the_recurrence_says_it_is_not_causal():
    rec, params, us, state, _ = _setup(4)
    assert rec.causal is False
    with pytest.raises(TypeError, match="step"):
        rec.step(params, state, us[:, 0])


@pytest.mark.parametrize("bad,match", [({"d_head": 5}, "d_head"), ({"n_groups": 3}, "n_groups"),
                                       ({"d_conv": 0}, "d_conv"), ({"chunk_size": 2.5}, "chunk_size")])
def test_config_that_cannot_work_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        zoo.get("hydra", **bad)


# --------------------------------------------------------------------------------------------
# Against the authors' forward pass (goombalab/hydra, Hydra.forward without the fused kernel),
# written in torch with mamba_ssm's reference SSD and gated RMSNorm, on our weights.


def _torch_hydra(ref, params, c, us):
    import torch
    import torch.nn.functional as F

    t = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    e, g, n, heads, p = c.d_inner, c.n_groups, c.d_state, c.n_heads, c.d_head
    batch, time, _ = us.shape
    proj = F.linear(torch.tensor(np.asarray(us)), t["w_in"].T)
    z, xbc, dt = torch.split(proj, [e, e + 4 * g * n, 2 * heads], dim=-1)
    dt = torch.cat((dt[:, :, :heads], torch.flip(dt[:, :, heads:], (1,))), dim=0)
    conv_weight = t["conv_kernel"].T[:, None, :]
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), conv_weight, t["conv_bias"], padding=c.d_conv // 2,
                          groups=xbc.shape[-1]).transpose(1, 2))
    x, bc = torch.split(xbc, [e, 4 * g * n], dim=-1)
    x_og = x
    x = torch.cat((x, torch.flip(x, (1,))), dim=0)
    bc = torch.cat((bc[:, :, :2 * g * n], torch.flip(bc[:, :, 2 * g * n:], (1,))), dim=0)
    b, cc = torch.split(bc, [g * n, g * n], dim=-1)
    y = ref.ssd_chunk_scan_combined_ref(x.reshape(2 * batch, time, heads, p), dt, -torch.exp(t["a_log"]),
                                        b.reshape(2 * batch, time, g, n), cc.reshape(2 * batch, time, g, n),
                                        c.chunk_size, dt_bias=t["dt_bias"], dt_softplus=True)
    y = torch.roll(y.reshape(2 * batch, time, e), shifts=1, dims=1)
    y[:, 0, :] = 0.0
    y = y[:batch] + torch.flip(y[batch:], (1,))
    y = y + x_og * torch.repeat_interleave(F.linear(x_og, t["w_diag"].T, bias=t["d_skip"]), p, dim=-1)
    y = ref.rms_norm_ref(y, t["norm_scale"], None, z=z, eps=c.norm_eps, norm_before_gate=True)
    return F.linear(y, t["w_out"].T)


@pytest.mark.refs
@pytest.mark.parametrize("mode", ["chunked", "sequential"])
def test_apply_matches_the_authors_forward_in_torch_on_our_weights(mode):
    from tests.refs.mamba_ssm_reference import load_mamba_reference

    ref = load_mamba_reference()
    rec, params, _, _, c = _setup(5, d_conv=7)
    us = jax.random.normal(jax.random.key(6), (BATCH, 12, D_IN), jnp.float32)   # a multiple of the chunk
    ys, _ = rec.apply(params, us, mode=mode)
    _close(ys, _torch_hydra(ref, params, c, us).detach().numpy(), "outputs")
