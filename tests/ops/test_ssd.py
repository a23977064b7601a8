"""zoo.ops.ssd (Mamba-2's SSD): both modes against a float64 loop, and against mamba_ssm's torch references.

The float64 loop below is written here from the paper's equations (numpy, one head at a time), so it
shares no code with the engine. Under ``jax.enable_x64`` the modes agree with it to 1e-10: they
differ only in the order of float operations. Gradients are compared with JAX's gradients of the
engine's own ``reference`` loop (also float64), which the first test ties to the numpy loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops.ssd_scan import MODES, reference, segsum, ssd, step

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

BATCH, T, H, P, G, N = 2, 11, 4, 3, 2, 5
CHUNK = 4  # T = 11 is not a multiple: the chunked mode pads with identity steps


def _random(seed, groups=G, d_shape=(H,), time=T):
    rng = np.random.default_rng(seed)
    data = {
        "x": rng.normal(size=(BATCH, time, H, P)),
        "dt": rng.normal(size=(BATCH, time, H)),
        "A": -np.exp(rng.normal(size=H)),
        "B": rng.normal(size=(BATCH, time, groups, N)),
        "C": rng.normal(size=(BATCH, time, groups, N)),
        "D": rng.normal(size=d_shape),
        "z": rng.normal(size=(BATCH, time, H, P)),
        "dt_bias": rng.normal(size=H),
        "initial_states": rng.normal(size=(BATCH, H, P, N)),
        "w": rng.normal(size=(BATCH, time, H, P)),
        "w_final": rng.normal(size=(BATCH, H, P, N)),
    }
    reset = rng.random((BATCH, time)) < 0.25
    reset[0, 5] = True
    data["reset"] = reset
    return data


def _numpy_loop(x, dt, A, B, C, D, z, dt_bias, h0, reset, reverse=False):
    """The paper's recurrence, head by head, in float64 numpy."""
    batch, time, heads, _ = x.shape
    per_group = heads // B.shape[2]
    D = np.broadcast_to(np.reshape(D, (heads, -1)), (heads, x.shape[-1]))
    delta = np.logaddexp(0.0, dt + dt_bias)                  # softplus
    y = np.zeros_like(x)
    h = h0.copy()
    order = range(time - 1, -1, -1) if reverse else range(time)
    for t in order:
        if reset is not None:
            flag = reset[:, t + 1] if reverse and t + 1 < time else (None if reverse else reset[:, t])
            if flag is not None:
                h[flag] = 0.0
        for head in range(heads):
            g = head // per_group
            a = np.exp(delta[:, t, head] * A[head])
            h[:, head] = (a[:, None, None] * h[:, head]
                          + np.einsum("bp,bn->bpn", delta[:, t, head, None] * x[:, t, head], B[:, t, g]))
            y[:, t, head] = np.einsum("bpn,bn->bp", h[:, head], C[:, t, g]) + D[head] * x[:, t, head]
    return (y if z is None else y * z / (1 + np.exp(-z))), h


def _kwargs(data, with_reset, reverse):
    return {"D": data["D"], "z": data["z"], "dt_bias": data["dt_bias"], "dt_softplus": True,
            "reset": data["reset"] if with_reset else None, "reverse": reverse}


def _ssd(mode):
    def run(x, dt, A, B, C, **kwargs):
        return ssd(x, dt, A, B, C, CHUNK, mode=mode, **kwargs)

    return run


def _values_and_grads(fn, data, **kwargs):
    def loss(x, dt, A, B, C, h0, D, z, dt_bias):
        kw = dict(kwargs, D=D, z=z, dt_bias=dt_bias)
        y, final = fn(x, dt, A, B, C, initial_states=h0, return_final_states=True, **kw)
        return jnp.sum(y * data["w"]) + jnp.sum(final * data["w_final"]), (y, final)

    names = ("x", "dt", "A", "B", "C", "initial_states", "D", "z", "dt_bias")
    (_, (y, final)), grads = jax.value_and_grad(loss, argnums=tuple(range(9)), has_aux=True)(
        *(data[k] for k in names))
    return (y, final, *grads)


def _assert_close(got, want, rtol, atol=0.0):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"item {i}: {g.shape} != {w.shape}"
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"item {i}")


# --------------------------------------------------------------------------------------------
# Both modes against the float64 loop.


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["no_reset", "reset"])
def test_reference_matches_the_numpy_loop_of_the_paper(with_reset, reverse):
    with jax.enable_x64(True):
        d = _random(0)
        want = _numpy_loop(d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"],
                           d["initial_states"], d["reset"] if with_reset else None, reverse)
        got = reference(d["x"], d["dt"], d["A"], d["B"], d["C"], initial_states=d["initial_states"],
                        return_final_states=True, **_kwargs(d, with_reset, reverse))
        _assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["no_reset", "reset"])
def test_every_mode_matches_float64_reference_in_values_and_gradients(mode, with_reset, reverse):
    with jax.enable_x64(True):
        d = _random(1)
        kwargs = _kwargs(d, with_reset, reverse)
        want = _values_and_grads(reference, d, **kwargs)
        got = _values_and_grads(_ssd(mode), d, **kwargs)
        _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups,d_shape", [(1, (H, P)), (H, (H,))], ids=["one_group_D_per_channel",
                                                                             "a_group_per_head"])
def test_groups_and_per_channel_skip(mode, groups, d_shape):
    with jax.enable_x64(True):
        d = _random(2, groups=groups, d_shape=d_shape)
        want = _numpy_loop(d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"],
                           d["initial_states"], d["reset"])
        got = _ssd(mode)(d["x"], d["dt"], d["A"], d["B"], d["C"], initial_states=d["initial_states"],
                         return_final_states=True, **_kwargs(d, True, False))
        _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("chunk_size", [1, 3, 11, 16])
def test_chunked_mode_any_chunk_size_equals_the_loop(chunk_size):
    """Chunks of one step, chunks that divide nothing, one chunk exactly, and one chunk longer than T."""
    with jax.enable_x64(True):
        d = _random(3)
        want = _numpy_loop(d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"], d["dt_bias"],
                           d["initial_states"], d["reset"])
        got = ssd(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size, initial_states=d["initial_states"],
                  return_final_states=True, mode="chunked", **_kwargs(d, True, False))
        _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("mode", MODES)
def test_decays_that_underflow_stay_exact_and_finite(mode):
    """exp(Δ A) far below the smallest float32 (Δ A ≈ -1e3 per step): no 0/0, no inf - inf, finite
    gradients, and the state forgets everything but the last token exactly as the loop does."""
    d = _random(4)
    A = -np.full(H, 200.0)
    dt = np.abs(d["dt"]) + 5.0
    args = [jnp.asarray(v, jnp.float32) for v in (d["x"], dt, A, d["B"], d["C"])]
    y, final = ssd(*args, CHUNK, initial_states=jnp.asarray(d["initial_states"], jnp.float32),
                   return_final_states=True, mode=mode, reset=d["reset"], dt_softplus=True)
    want_y, want_final = _numpy_loop(d["x"], dt, A, d["B"], d["C"], np.zeros(H), None, np.zeros(H),
                                     d["initial_states"], d["reset"])
    _assert_close((y, final), (want_y, want_final), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(ssd(*a, CHUNK, mode=mode, reset=d["reset"], dt_softplus=True) ** 2),
                     argnums=(0, 1, 2, 3, 4))(*args)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_segsum_sums_each_segment_directly():
    with jax.enable_x64(True):
        log_a = np.random.default_rng(5).normal(size=(3, 6))
        got = np.asarray(segsum(log_a))
        for t in range(6):
            for s in range(6):
                want = log_a[:, s + 1:t + 1].sum(-1) if s <= t else np.full(3, -np.inf)
                np.testing.assert_allclose(got[:, t, s], want, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Segments, step, dtypes.


@pytest.mark.parametrize("mode", MODES)
def test_seq_idx_equals_running_the_packed_sequences_separately(mode):
    """Tokens of different sequences never interact; initial_states belongs to sequence 0."""
    d = _random(6)
    seq_idx = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3]], np.int32)
    args = [jnp.asarray(d[k], jnp.float32) for k in ("x", "dt", "A", "B", "C")]
    kw = {"D": jnp.asarray(d["D"], jnp.float32), "dt_bias": jnp.asarray(d["dt_bias"], jnp.float32),
          "dt_softplus": True}
    h0 = jnp.asarray(d["initial_states"], jnp.float32)
    y, final = ssd(*args, CHUNK, initial_states=h0, seq_idx=seq_idx, return_final_states=True, mode=mode,
                   **kw)
    for b in range(BATCH):
        bounds = np.flatnonzero(np.diff(seq_idx[b])) + 1
        for lo, hi in zip([0, *bounds], [*bounds, T], strict=True):
            piece = [a[b:b + 1, lo:hi] for a in args[:2]] + [args[2]] + [a[b:b + 1, lo:hi] for a in args[3:]]
            start = h0[b:b + 1] if seq_idx[b, lo] == 0 else None
            y_piece, final_piece = ssd(*piece, CHUNK, initial_states=start, return_final_states=True,
                                       mode=mode, **kw)
            np.testing.assert_allclose(y[b:b + 1, lo:hi], y_piece, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(final[b:b + 1], final_piece, rtol=1e-5, atol=1e-5)
    reset = np.concatenate([seq_idx[:, :1] != 0, np.diff(seq_idx, axis=1) != 0], axis=1)
    y_reset = ssd(*args, CHUNK, initial_states=h0, reset=reset, mode=mode, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_reset))


def test_step_fold_equals_ssd():
    d = _random(7)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    kw = {"D": f32(d["D"]), "dt_bias": f32(d["dt_bias"]), "dt_softplus": True}
    state = f32(d["initial_states"])
    ys = []
    for t in range(T):
        state, y_t = step(state, f32(d["x"][:, t]), f32(d["dt"][:, t]), f32(d["A"]), f32(d["B"][:, t]),
                          f32(d["C"][:, t]), z=f32(d["z"][:, t]), **kw)
        ys.append(y_t)
    y, final = ssd(*(f32(d[k]) for k in ("x", "dt", "A", "B", "C")), CHUNK, z=f32(d["z"]),
                   initial_states=f32(d["initial_states"]), return_final_states=True, **kw)
    _assert_close((jnp.stack(ys, axis=1), state), (y, final), rtol=1e-5, atol=1e-5)
    assert state.dtype == jnp.float32


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs_are_within_a_percent_and_the_state_stays_float32(mode):
    d = _random(8)
    names = ("x", "dt", "A", "B", "C")
    def run(dtype):
        return ssd(*(jnp.asarray(d[k], dtype) for k in names), CHUNK, z=jnp.asarray(d["z"], dtype),
                   dt_softplus=True, return_final_states=True, mode=mode, reset=d["reset"])

    (y32, f32), (y16, f16) = run(jnp.float32), run(jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16 and f16.dtype == jnp.float32
    for got, want in ((y16, y32), (f16, f32)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2 * scale)


def test_jit_and_vmap_equal_eager():
    d = _random(9)
    args = [jnp.asarray(d[k], jnp.float32) for k in ("x", "dt", "A", "B", "C")]
    eager = ssd(*args, CHUNK, dt_softplus=True, reset=d["reset"])
    jitted = jax.jit(lambda *a: ssd(*a, CHUNK, dt_softplus=True, reset=d["reset"]))(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    stacked = [jnp.stack([a, 2 * a]) for a in args]
    vmapped = jax.vmap(lambda x, dt, A, B, C: ssd(x, dt, A, B, C, CHUNK, dt_softplus=True))(*stacked)
    for e in range(2):
        want = ssd(*(s[e] for s in stacked), CHUNK, dt_softplus=True)
        np.testing.assert_allclose(vmapped[e], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Malformed input.


def test_malformed_inputs_raise_errors_naming_the_argument_and_shapes():
    d = {k: jnp.asarray(v, jnp.float32) if k != "reset" else v for k, v in _random(10).items()}
    x, dt, A, B, C = (d[k] for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(ValueError, match=r"x must have shape .*\(2, 11, 4\)"):
        ssd(x[..., 0], dt, A, B, C)
    with pytest.raises(ValueError, match=r"dt must have shape .*\(2, 11, 4\).*\(2, 11, 3\)"):
        ssd(x, dt[..., :3], A, B, C)
    with pytest.raises(ValueError, match=r"H must be a multiple of G"):
        ssd(x, dt, A, B[:, :, :1].repeat(3, axis=2), C[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match=r"C must have shape"):
        ssd(x, dt, A, B, C[..., :2])
    with pytest.raises(ValueError, match="x has dtype int32"):
        ssd(x.astype(jnp.int32), dt, A, B, C)
    with pytest.raises(ValueError, match=r"D must have shape"):
        ssd(x, dt, A, B, C, D=jnp.ones((H, P + 1)))
    with pytest.raises(ValueError, match=r"initial_states must have shape .*\(2, 4, 3, 5\)"):
        ssd(x, dt, A, B, C, initial_states=d["initial_states"][..., :2])
    with pytest.raises(ValueError, match=r"reset must have shape .*\(2, 11\)"):
        ssd(x, dt, A, B, C, reset=d["reset"][:, :5])
    with pytest.raises(ValueError, match="seq_idx must be an integer"):
        ssd(x, dt, A, B, C, seq_idx=jnp.zeros((BATCH, T), jnp.float32))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            ssd(x, dt, A, B, C, bad)
    with pytest.raises(ValueError, match="mode"):
        ssd(x, dt, A, B, C, mode="fast")
    with pytest.raises(ValueError, match=r"state must have shape"):
        step(d["initial_states"][:, :2], x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])


# --------------------------------------------------------------------------------------------
# Against mamba_ssm's own pure-PyTorch references (the `refs` extra).


@pytest.fixture(scope="module")
def mamba_ref():
    from tests.refs.mamba_ssm_reference import load_mamba_reference

    return load_mamba_reference()


def _torch(v, grad=False):
    import torch

    return torch.tensor(np.asarray(v), dtype=torch.float32, requires_grad=grad)


@pytest.mark.refs
@pytest.mark.parametrize("mode", MODES)
def test_matches_mamba_ssm_chunk_scan_combined_ref_with_gradients(mamba_ref, mode):
    """``ssd_chunk_scan_combined_ref`` (no initial state; T a multiple of its chunk size) in float32,
    forward and backward (torch autograd through the reference vs JAX autodiff through each mode)."""
    time, chunk = 12, 4
    d = _random(11, time=time)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    tensors = {k: _torch(d[k], grad=True) for k in names}
    out = mamba_ref.ssd_chunk_scan_combined_ref(tensors["x"], tensors["dt"], tensors["A"], tensors["B"],
                                                tensors["C"], chunk, D=tensors["D"], z=tensors["z"],
                                                dt_bias=tensors["dt_bias"], dt_softplus=True)
    (out * _torch(d["w"])).sum().backward()

    def loss(x, dt, A, B, C, D, z, dt_bias):
        y = ssd(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, mode=mode)
        return jnp.sum(y * d["w"]), y

    (_, y), grads = jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True)(
        *(jnp.asarray(d[k], jnp.float32) for k in names))
    scale = float(np.max(np.abs(out.detach().numpy())))
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-4, atol=1e-5 * scale)
    for name, g in zip(names, grads, strict=True):
        want = tensors[name].grad.numpy()
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(want))), err_msg=name)


@pytest.mark.refs
@pytest.mark.parametrize("mode", MODES)
def test_initial_and_final_states_match_mamba_ssm_ssd_minimal_discrete(mamba_ref, mode):
    """``ssd_minimal_discrete`` (Listing 1 of the paper) takes one B, C per head, the per-step log
    decay Δ A and X = Δ x; it returns y without D and the final state."""
    import torch

    time, chunk = 12, 4
    d = _random(12, groups=H, time=time)
    delta = np.logaddexp(0.0, d["dt"])
    y_ref, final_ref = mamba_ref.ssd_minimal_discrete(
        _torch(d["x"] * delta[..., None]), _torch(delta * d["A"]), _torch(d["B"]), _torch(d["C"]), chunk,
        initial_states=_torch(d["initial_states"])[:, None])
    with torch.no_grad():
        y_ref, final_ref = y_ref.numpy(), final_ref.numpy()
    y, final = ssd(*(jnp.asarray(d[k], jnp.float32) for k in ("x", "dt", "A", "B", "C")), chunk,
                   dt_softplus=True, initial_states=jnp.asarray(d["initial_states"], jnp.float32),
                   return_final_states=True, mode=mode)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(y_ref))))
    np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(final_ref))))


@pytest.mark.refs
def test_step_matches_mamba_ssm_selective_state_update_ref(mamba_ref):
    """``selective_state_update_ref`` takes dt, dt_bias, D and A per (head, channel); it updates its
    state in place and returns y."""
    d = _random(13)
    state_ref = _torch(d["initial_states"])
    expand = lambda v: np.broadcast_to(v[..., None], v.shape + (P,))
    A_full = np.broadcast_to(d["A"][:, None, None], (H, P, N))
    state = jnp.asarray(d["initial_states"], jnp.float32)
    for t in range(3):
        y_ref = mamba_ref.selective_state_update_ref(
            state_ref, _torch(d["x"][:, t]), _torch(expand(d["dt"][:, t])), _torch(A_full),
            _torch(d["B"][:, t]), _torch(d["C"][:, t]), D=_torch(expand(d["D"])), z=_torch(d["z"][:, t]),
            dt_bias=_torch(expand(d["dt_bias"])), dt_softplus=True)
        state, y = step(state, *(jnp.asarray(v, jnp.float32) for v in (d["x"][:, t], d["dt"][:, t], d["A"],
                                                                        d["B"][:, t], d["C"][:, t])),
                        D=jnp.asarray(d["D"], jnp.float32), z=jnp.asarray(d["z"][:, t], jnp.float32),
                        dt_bias=jnp.asarray(d["dt_bias"], jnp.float32), dt_softplus=True)
        np.testing.assert_allclose(y, y_ref.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state, state_ref.numpy(), rtol=1e-5, atol=1e-5)
