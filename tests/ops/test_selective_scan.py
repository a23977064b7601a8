"""zoo.ops.selective: every mode against loops in float64, and mamba_ssm's torch reference (refs).

Float64 comparisons (under ``jax.enable_x64``) hold to 1e-10: the modes differ from the loop only in
the order of float operations. ``reference`` itself is checked against an independent numpy loop in
complex128/float64 written here from the paper's equations. Float32 comparisons hold to 1e-5
relative; bfloat16 inputs to 1e-2 (8-bit mantissa, float32 state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import selective
from zoo.ops.selective import reference, selective_scan, selective_state_update

BATCH, D, L, N = 2, 6, 11, 3
CHUNK = 4  # L = 11 is not a multiple: the last chunk is shorter


def _mode_kwargs(mode, chunk=CHUNK):
    return {"mode": mode, "chunk_size": chunk} if mode != "associative" else {"mode": mode}


def _random(seed, *, groups=None, complex_a=False, dtype=np.float64):
    """Random problem in mamba_ssm's layout; B, C grouped [B, G, N, L] when ``groups``."""
    rng = np.random.default_rng(seed)
    bc_shape = (BATCH, N, L) if groups is None else (BATCH, groups, N, L)
    data = {
        "u": rng.normal(size=(BATCH, D, L)),
        "delta": rng.normal(-1.0, 1.0, (BATCH, D, L)),
        "A": -np.exp(rng.normal(size=(D, N))),
        "B": rng.normal(size=bc_shape),
        "C": rng.normal(size=bc_shape),
        "D": rng.normal(size=D),
        "z": rng.normal(size=(BATCH, D, L)),
        "delta_bias": rng.normal(0.0, 0.5, D),
        "h0": rng.normal(size=(BATCH, D, N)),
        "reset": rng.random((BATCH, L)) < 0.2,
    }
    data["reset"][0, 5] = True
    data = {k: (v if v.dtype == bool else v.astype(dtype)) for k, v in data.items()}
    if complex_a:
        cdtype = np.complex128 if dtype == np.float64 else np.complex64
        data["A"] = (data["A"] + 1j * rng.normal(0.0, 2.0, (D, N))).astype(cdtype)
        data["B"] = (data["B"] + 1j * rng.normal(size=bc_shape)).astype(cdtype)
        data["C"] = (data["C"] + 1j * rng.normal(size=bc_shape)).astype(cdtype)
        data["h0"] = (data["h0"] + 1j * rng.normal(size=(BATCH, D, N))).astype(cdtype)
    return data


def _numpy_loop(d, *, softplus=True, reset=None, reverse=False, h0=None):
    """The paper's equations, one step at a time, in float64 / complex128 (independent of zoo)."""
    u, A = np.asarray(d["u"], np.float64), np.asarray(d["A"])
    delta = np.asarray(d["delta"], np.float64) + d["delta_bias"][:, None]
    dt = np.log1p(np.exp(delta)) if softplus else delta
    Bm, Cm = (np.asarray(d[k]) for k in ("B", "C"))
    if Bm.ndim == 3:
        Bm, Cm = Bm[:, None], Cm[:, None]
    per_channel = lambda m, t: np.repeat(m[..., t], D // m.shape[1], axis=1)       # [B, D, N]
    h = np.zeros((BATCH, D, N), A.dtype) if h0 is None else np.array(h0)
    out = np.zeros((BATCH, D, L))
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        if reset is not None:
            flag = reset[:, t] if not reverse else (reset[:, t + 1] if t + 1 < L else np.zeros(BATCH, bool))
            h = np.where(flag[:, None, None], 0.0, h)
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * per_channel(Bm, t)
        y = np.sum(h * per_channel(Cm, t), axis=-1)
        y = 2 * y.real if np.iscomplexobj(y) else y
        out[:, :, t] = (y + d["D"] * u[:, :, t]) * d["z"][:, :, t] / (1 + np.exp(-d["z"][:, :, t]))
    return out, h


def _args(d):
    return (d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"], True)


def _values_and_grads(fn, d, **kwargs):
    """Outputs, final state and gradients of a random linear read-out wrt every float argument."""
    rng = np.random.default_rng(99)
    w_out = rng.normal(size=(BATCH, D, L))
    w_final = rng.normal(size=(BATCH, D, N))

    def loss(u, delta, A, Bm, Cm, skip, z, bias, h0):
        out, final = fn(u, delta, A, Bm, Cm, skip, z, bias, True, initial_state=h0, return_final_state=True,
                        **kwargs)
        final = jnp.real(final) + jnp.imag(final) if jnp.iscomplexobj(final) else final
        return jnp.sum(out * w_out) + jnp.sum(final * w_final), (out, final)

    args = (*_args(d)[:-1], d["h0"])
    grads, (out, final) = jax.grad(loss, argnums=tuple(range(9)), has_aux=True)(*args)
    return (out, final, *grads)


def _assert_close(got, want, rtol, atol=0.0):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.shape(g) == np.shape(w), f"item {i}: {np.shape(g)} != {np.shape(w)}"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=f"item {i}")


# --------------------------------------------------------------------------------------------
# The reference against the equations; every mode against the reference.


@pytest.mark.parametrize("complex_a", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_reference_matches_numpy_loop_of_the_equations(complex_a, reverse):
    with jax.enable_x64(True):
        d = _random(0, groups=2, complex_a=complex_a)
        want_out, want_h = _numpy_loop(d, reset=d["reset"], reverse=reverse, h0=d["h0"])
        out, h = reference(*_args(d), initial_state=d["h0"], reset=d["reset"], reverse=reverse,
                           return_final_state=True)
        _assert_close((out, h), (want_out, want_h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", selective.MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["no_reset", "reset"])
def test_every_mode_matches_float64_reference_in_values_and_gradients(mode, reverse, with_reset):
    with jax.enable_x64(True):
        d = _random(1)
        kwargs = {"reverse": reverse, "reset": d["reset"] if with_reset else None}
        want = _values_and_grads(reference, d, **kwargs)
        got = _values_and_grads(selective_scan, d, **kwargs, **_mode_kwargs(mode))
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


# Every mode runs the same chunk loop (they differ only inside a chunk, which the tests above cover),
# so the layouts of B and C are checked in one mode whose loop has full chunks and a shorter last one.
@pytest.mark.parametrize("layout", ["grouped", "time_invariant", "complex_grouped", "complex_time_invariant"])
def test_other_layouts_of_B_and_C_match_reference_and_keep_their_gradient_shapes(layout, mode="chunked"):
    with jax.enable_x64(True):
        d = _random(2, groups=3, complex_a=layout.startswith("complex"))
        if layout.endswith("time_invariant"):
            rng = np.random.default_rng(3)
            d["B"], d["C"] = (rng.normal(size=(D, N)) * (1 + 0.5j if layout.startswith("complex") else 1)
                              for _ in range(2))
        want = _values_and_grads(reference, d, reset=d["reset"])
        got = _values_and_grads(selective_scan, d, reset=d["reset"], **_mode_kwargs(mode))
        assert got[5].shape == np.shape(d["B"]) and got[6].shape == np.shape(d["C"])
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,chunk",
                         [("sequential", 1), ("chunked", 3), ("sequential", 11), ("chunked", 64)])
def test_any_chunk_size_matches_reference(mode, chunk):
    with jax.enable_x64(True):
        d = _random(4)
        want = _values_and_grads(reference, d, reset=d["reset"], reverse=True)
        got = _values_and_grads(selective_scan, d, reset=d["reset"], reverse=True,
                                **_mode_kwargs(mode, chunk))
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", selective.MODES)
def test_float32_modes_under_jit_match_float64_loop(mode):
    d = _random(5, dtype=np.float32)
    want_out, want_h = _numpy_loop(d, reset=d["reset"], h0=d["h0"])
    fn = jax.jit(lambda *args, **kwargs: selective_scan(*args, True, return_final_state=True, **kwargs,
                                                        **_mode_kwargs(mode)))
    out, h = fn(*_args(d)[:-1], initial_state=d["h0"], reset=d["reset"])
    assert out.dtype == jnp.float32 and h.dtype == jnp.float32
    scale = np.max(np.abs(want_out))
    _assert_close((out, h), (want_out, want_h), rtol=1e-5, atol=1e-5 * scale)


def test_bfloat16_inputs_are_within_a_percent_and_keep_a_float32_state():
    d = _random(6, dtype=np.float32)
    out32, h32 = selective_scan(*_args(d), initial_state=d["h0"], return_final_state=True)
    bf16 = {k: jnp.asarray(d[k], jnp.bfloat16) for k in ("u", "delta", "z")}
    out16, h16 = selective_scan(bf16["u"], bf16["delta"], d["A"], d["B"], d["C"], d["D"], bf16["z"],
                                d["delta_bias"], True, initial_state=d["h0"], return_final_state=True)
    assert out16.dtype == jnp.bfloat16 and h16.dtype == jnp.float32
    for got, want in ((out16, out32), (h16, h32)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2 * scale)


def test_auto_mode_is_chunked_and_matches_reference():
    assert selective._auto_mode() == "chunked"
    d = _random(7, dtype=np.float32)
    got = selective_scan(*_args(d), initial_state=d["h0"], reset=d["reset"])
    want = reference(*_args(d), initial_state=d["h0"], reset=d["reset"])
    _assert_close((got,), (want,), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Complex A: mamba_ssm's real interleaved layout, complex arrays and (real, imag) pairs agree.


@pytest.mark.parametrize("mode", selective.MODES)
def test_complex_A_in_its_three_forms_matches_complex128_loop(mode):
    d = _random(8, complex_a=True, dtype=np.float32)
    want_out, want_h = _numpy_loop(d, h0=d["h0"])
    interleave = lambda m: np.stack([m.real, m.imag], -1).reshape(*m.shape[:-1], 2 * L).astype(np.float32)
    pair = lambda m: (m.real.astype(np.float32), m.imag.astype(np.float32))
    forms = {
        "complex": (d["A"], d["B"], d["C"], d["h0"]),
        "mamba_interleaved": (d["A"], interleave(d["B"]), interleave(d["C"]), d["h0"]),
        "pairs": (pair(d["A"]), pair(d["B"]), pair(d["C"]), pair(d["h0"])),
    }
    scale = np.max(np.abs(want_out))
    for name, (A, Bm, Cm, h0) in forms.items():
        out, h = selective_scan(d["u"], d["delta"], A, Bm, Cm, d["D"], d["z"], d["delta_bias"], True,
                                initial_state=h0, return_final_state=True, **_mode_kwargs(mode))
        h = h[0] + 1j * np.asarray(h[1]) if name == "pairs" else h
        assert out.dtype == jnp.float32 and (name == "pairs" or h.dtype == jnp.complex64), name
        np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
        np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", ["sequential", "chunked"])
def test_complex_A_gradients_match_reference(mode):
    with jax.enable_x64(True):
        d = _random(9, complex_a=True)
        want = _values_and_grads(reference, d, reset=d["reset"], reverse=True)
        got = _values_and_grads(selective_scan, d, reset=d["reset"], reverse=True, **_mode_kwargs(mode))
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Steps, resets.


@pytest.mark.parametrize("form", ["real", "grouped", "complex"])
def test_folding_selective_state_update_over_time_equals_selective_scan(form):
    d = _random(10, groups=2 if form == "grouped" else None, complex_a=form == "complex", dtype=np.float32)
    out, final = selective_scan(*_args(d), initial_state=d["h0"], return_final_state=True)
    h = d["h0"]
    for t in range(L):
        h, y_t = selective_state_update(h, d["u"][:, :, t], d["delta"][:, :, t], d["A"], d["B"][..., t],
                                        d["C"][..., t], D=d["D"], z=d["z"][:, :, t],
                                        dt_bias=d["delta_bias"], dt_softplus=True)
        np.testing.assert_allclose(y_t, out[:, :, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, final, rtol=1e-5, atol=1e-6)


def _segments(flags, reverse):
    starts = [0] + [t for t in range(1, len(flags)) if flags[t]]
    bounds = [*starts, len(flags)]
    segs = list(zip(bounds[:-1], bounds[1:], strict=True))
    return segs[::-1] if reverse else segs


@pytest.mark.parametrize("mode", selective.MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_reset_equals_running_segments_separately(mode, reverse):
    d = _random(11, dtype=np.float32)
    d["reset"][1, 0] = True  # discards the initial state going forwards
    out, final = selective_scan(*_args(d), initial_state=d["h0"], reset=d["reset"], reverse=reverse,
                                return_final_state=True, **_mode_kwargs(mode))
    for i in range(BATCH):
        carry = np.zeros_like(d["h0"][i:i + 1]) if d["reset"][i, 0] and not reverse else d["h0"][i:i + 1]
        for n, (lo, hi) in enumerate(_segments(d["reset"][i], reverse)):
            part = {k: v[i:i + 1, ..., lo:hi] if k in ("u", "delta", "z", "B", "C") else v
                    for k, v in d.items()}
            seg_out, last = reference(*_args(part), initial_state=carry if n == 0 else np.zeros_like(carry),
                                      reverse=reverse, return_final_state=True)
            np.testing.assert_allclose(out[i:i + 1, :, lo:hi], seg_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(final[i:i + 1], last, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Memory: the chunked modes never hold the [B, L, D, N] states.


def _compiled_temp_bytes(mode, length, d_inner=64, n=16):
    S = jax.ShapeDtypeStruct
    shapes = (S((1, d_inner, length), jnp.float32), S((1, d_inner, length), jnp.float32),
              S((d_inner, n), jnp.float32), S((1, n, length), jnp.float32), S((1, n, length), jnp.float32))

    def loss(u, delta, A, Bm, Cm):
        return jnp.sum(selective_scan(u, delta, A, Bm, Cm, delta_softplus=True, mode=mode) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_training_memory_of_chunked_modes_grows_far_slower_than_the_states_and_associative_does_not():
    d_inner, n, short, long = 64, 16, 2048, 8192
    states_growth = (long - short) * d_inner * n * 4             # bytes of [1, L, D, N] float32 states added
    for mode in ("sequential", "chunked"):
        growth = _compiled_temp_bytes(mode, long) - _compiled_temp_bytes(mode, short)
        # Per step: the output and its cotangent (2·D floats) and one stored state per chunk (D·N/K
        # floats), about 1/7 of the D·N floats of a state at K = 64.
        assert growth < states_growth / 4, f"{mode}: temporaries grew {growth / 2**20:.1f} MiB"
    growth = _compiled_temp_bytes("associative", long) - _compiled_temp_bytes("associative", short)
    assert growth > states_growth


# --------------------------------------------------------------------------------------------
# Malformed input.


def test_malformed_inputs_raise_errors_naming_the_argument_and_shapes():
    d = _random(12, dtype=np.float32)
    u, delta, A, Bm, Cm = d["u"], d["delta"], d["A"], d["B"], d["C"]
    with pytest.raises(ValueError, match=r"u must have shape \[B, D, L\], got \(2, 6\)"):
        selective_scan(u[:, :, 0], delta, A, Bm, Cm)
    with pytest.raises(ValueError, match=r"delta has shape \(2, 6, 10\) but u has \(2, 6, 11\)"):
        selective_scan(u, delta[..., 1:], A, Bm, Cm)
    with pytest.raises(ValueError, match=r"A must have shape \[D, N\] with D = 6, got \(5, 3\)"):
        selective_scan(u, delta, A[1:], Bm, Cm)
    with pytest.raises(ValueError, match=r"B has shape \(2, 4, 11\)"):
        selective_scan(u, delta, A, np.concatenate([Bm, Bm[:, :1]], 1), Cm)
    with pytest.raises(ValueError, match=r"C has shape \(2, 4, 3, 11\).*D % G == 0"):
        selective_scan(u, delta, A, Bm, np.stack([Cm] * 4, 1))
    with pytest.raises(ValueError, match="C is complex"):
        selective_scan(u, delta, A, Bm, Cm.astype(np.complex64))
    with pytest.raises(ValueError, match=r"2L = 22"):
        selective_scan(u, delta, A.astype(np.complex64), Bm, Cm)
    with pytest.raises(ValueError, match=r"u has dtype int32"):
        selective_scan(u.astype(np.int32), delta, A, Bm, Cm)
    with pytest.raises(ValueError, match=r"D must have shape \[D\] = \(6,\), got \(5,\)"):
        selective_scan(u, delta, A, Bm, Cm, D=d["D"][1:])
    with pytest.raises(ValueError, match=r"z has shape \(2, 6, 10\)"):
        selective_scan(u, delta, A, Bm, Cm, z=d["z"][..., 1:])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, D, N\] = \(2, 6, 3\)"):
        selective_scan(u, delta, A, Bm, Cm, initial_state=d["h0"][:1])
    with pytest.raises(ValueError, match=r"reset must have shape \[B, L\] = \(2, 11\), got \(2, 10\)"):
        selective_scan(u, delta, A, Bm, Cm, reset=d["reset"][:, 1:])
    with pytest.raises(ValueError, match="mode='nope'"):
        selective_scan(u, delta, A, Bm, Cm, mode="nope")
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            selective_scan(u, delta, A, Bm, Cm, mode="chunked", chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size.*associative"):
        selective_scan(u, delta, A, Bm, Cm, mode="associative", chunk_size=4)
    with pytest.raises(ValueError, match=r"dt has shape \(2, 5\) but x has \(2, 6\)"):
        selective_state_update(d["h0"], u[:, :, 0], delta[:, :5, 0], A, Bm[..., 0], Cm[..., 0])
    with pytest.raises(ValueError, match=r"state must have shape \[B, D, N\] = \(2, 6, 3\), got \(2, 6, 4\)"):
        selective_state_update(np.zeros((2, 6, 4), np.float32), u[:, :, 0], delta[:, :, 0], A, Bm[..., 0],
                               Cm[..., 0])


# --------------------------------------------------------------------------------------------
# mamba_ssm's pure-PyTorch reference (refs extra).


def _torch(x):
    import torch
    return torch.tensor(np.asarray(x))


@pytest.mark.refs
@pytest.mark.parametrize("form", ["real", "grouped", "time_invariant", "complex_interleaved"])
def test_matches_mamba_ssm_selective_scan_ref_in_values_and_gradients(form):
    from tests.refs.mamba_ssm_reference import load_mamba_reference

    ref = load_mamba_reference()
    import torch

    d = _random(13, groups=3 if form == "grouped" else None, complex_a=form == "complex_interleaved",
                dtype=np.float32)
    d["h0"] = np.zeros_like(d["h0"])  # selective_scan_ref always starts from zeros
    if form == "time_invariant":
        d["B"], d["C"] = (np.random.default_rng(14).normal(size=(D, N)).astype(np.float32) for _ in range(2))
    if form == "complex_interleaved":
        interleave = lambda m: np.stack([m.real, m.imag], -1).reshape(*m.shape[:-1], 2 * L).astype(np.float32)
        d["B"], d["C"] = interleave(d["B"]), interleave(d["C"])
    w_out = np.random.default_rng(15).normal(size=(BATCH, D, L)).astype(np.float32)

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    t_args = {k: _torch(d[k]).requires_grad_(True) for k in names}
    t_out, t_last = ref.selective_scan_ref(*(t_args[k] for k in names), delta_softplus=True,
                                           return_last_state=True)
    (t_out * _torch(w_out)).sum().backward()

    def loss(*args):
        out, last = selective_scan(*args, True, return_final_state=True)
        return jnp.sum(out * w_out), (out, last)

    grads, (out, last) = jax.grad(loss, argnums=tuple(range(8)), has_aux=True)(*(d[k] for k in names))
    # float32 on both sides with sums in different orders: a few ulps per step over L = 11 steps.
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, t_last.detach().numpy(), rtol=1e-5, atol=1e-5)
    for k, g in zip(names, grads, strict=True):
        want = t_args[k].grad.numpy()
        if np.iscomplexobj(want):
            # torch's gradient of a real loss wrt complex A is dL/dRe + i dL/dIm; JAX's is its conjugate.
            want = np.conj(want)
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5 * scale, err_msg=k)
    del torch


@pytest.mark.refs
def test_selective_state_update_matches_mamba_ssm_selective_state_update_ref():
    from tests.refs.mamba_ssm_reference import load_mamba_reference

    ref = load_mamba_reference()
    d = _random(16, dtype=np.float32)
    t = 3
    state = _torch(d["h0"]).clone()
    out = ref.selective_state_update_ref(state, _torch(d["u"][:, :, t]), _torch(d["delta"][:, :, t]),
                                         _torch(d["A"]), _torch(d["B"][..., t]), _torch(d["C"][..., t]),
                                         D=_torch(d["D"]), z=_torch(d["z"][:, :, t]),
                                         dt_bias=_torch(d["delta_bias"]), dt_softplus=True)
    h, y = selective_state_update(d["h0"], d["u"][:, :, t], d["delta"][:, :, t], d["A"], d["B"][..., t],
                                  d["C"][..., t], D=d["D"], z=d["z"][:, :, t], dt_bias=d["delta_bias"],
                                  dt_softplus=True)
    np.testing.assert_allclose(y, out.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, state.numpy(), rtol=1e-5, atol=1e-6)
