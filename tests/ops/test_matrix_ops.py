"""The front ends of the matrix engine (``zoo/ops/matrix_ops.py``) against peer references, in float32.

Each op runs in every mode (sequential, chunked with chunks of 5 in T = 12 so the last chunk is
padded, parallel) with a random initial state and ``output_final_state=True``, and its output and
final state are held to 1e-5 relative to the reference's largest magnitude:

* FLA's pure-PyTorch ``naive`` references (fla-core 0.6.0, loaded by ``tests/refs/fla_reference.py``):
  linear_attention (``naive_recurrent_linear_attn``, with and without the normaliser), simple_gla
  (``naive_recurrent_simple_gla`` and ``naive_chunk_simple_gla``), retention (``naive_retention``,
  which has no state; with a state against ``naive_recurrent_simple_gla`` and RetNet's decays), gla
  (``naive_recurrent_gla``), hgrn2 (``naive_recurrent_gla`` with k = 1 - exp(g)), rwkv6
  (``naive_recurrent_rwkv6``, layout [B, H, T, K]). FLA has no naive reference for Lightning
  Attention: ``lightning_attention`` is checked against ``naive_recurrent_simple_gla`` with the
  decays FLA's ``chunk_lightning_attn`` builds, g_h = -(8 / H)(1 - layer_idx / num_layers) h.
* ``mlstm_kernels`` 2.0.6's JAX native kernels (``tests/refs/mlstm_kernels_reference.py``, layout
  [B, NH, S, D]): the chunkwise kernel (``chunkwise--native_autograd``) with and without initial
  states, final (C, n, m) included, and the parallel kernel (no states).
* GateLoop has no peer reference implementation: ``gateloop`` is checked against a complex float64
  numpy loop written here from the paper's recurrence.

The ValueErrors of the front ends' own arguments are checked without the references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import ops

B, T, H, K, V = 2, 12, 2, 3, 4
RTOL = 1e-5
MODES = (("sequential", None), ("chunked", 5), ("parallel", None))
MODE_IDS = ("sequential", "chunked5", "parallel")


pytestmark = pytest.mark.usefixtures("quick_compile")   # tests/conftest.py


@pytest.fixture(scope="module")
def fla():
    from tests.refs.fla_reference import load_fla_reference

    return load_fla_reference()


@pytest.fixture(scope="module")
def mlstm_ref():
    from tests.refs.mlstm_kernels_reference import load_mlstm_kernels_reference

    return load_mlstm_kernels_reference()


def _assert_close(got, want, what="", rtol=RTOL):
    """Elementwise within rtol, and within rtol of the largest magnitude of ``want``."""
    got = np.asarray(got.detach() if hasattr(got, "detach") else got, np.float64)
    want = np.asarray(want.detach() if hasattr(want, "detach") else want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.max(np.abs(want))), err_msg=what)


def _normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _log_decay(rng, *shape):
    """log of a decay in (0, 1): log σ(z + 2), decays 0.5 .. 0.98."""
    return (-np.logaddexp(0.0, -(rng.standard_normal(shape) + 2.0))).astype(np.float32)


def _data(seed):
    rng = np.random.default_rng(seed)
    return {"q": _normal(rng, B, T, H, K), "k": _normal(rng, B, T, H, K), "v": _normal(rng, B, T, H, V),
            "S0": _normal(rng, B, H, K, V), "g": _log_decay(rng, B, T, H), "gk": _log_decay(rng, B, T, H, K),
            "u": _normal(rng, H, K)}


def _torch(*arrays):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _heads_first(x):
    """[B, T, H, ...] <-> [B, H, T, ...]"""
    return np.swapaxes(np.asarray(x), 1, 2)


def _jax(*arrays):
    return [jnp.asarray(a) for a in arrays]


def _each_mode(op, *args, **kwargs):
    """[(mode id, (o, final_state))] of ``op`` in every mode, as numpy."""
    results = []
    for mode_id, (mode, chunk) in zip(MODE_IDS, MODES, strict=True):
        o, state = op(*args, mode=mode, chunk_size=chunk, **kwargs)
        results.append((mode_id, jax.tree.map(np.asarray, (o, state))))
    return results


def _elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(x)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# FLA references.


@pytest.mark.refs
def test_linear_attention_matches_fla_naive_recurrent_linear_attn(fla):
    d = _data(0)
    o_ref, S_ref = fla.naive_recurrent_linear_attn(*_torch(d["q"], d["k"], d["v"]),
                                                   initial_state=_torch(d["S0"])[0], output_final_state=True)
    for mode_id, (o, S) in _each_mode(ops.linear_attention, *_jax(d["q"], d["k"], d["v"]),
                                      initial_state=jnp.asarray(d["S0"]), output_final_state=True):
        _assert_close(o, o_ref, f"{mode_id} o")
        _assert_close(S, S_ref, f"{mode_id} final state")


@pytest.mark.refs
def test_normalised_linear_attention_matches_fla_with_positive_features(fla):
    """normalize=True with φ = elu + 1 on q and k; FLA's key-sum state is [B, 1, H, K] (it adds it to a
    cumulative sum over time), zoo's is [B, H, K]."""
    d = _data(1)
    q, k = _elu_plus_one(d["q"]), _elu_plus_one(d["k"])
    z0 = np.abs(_normal(np.random.default_rng(11), B, H, K))
    S0 = np.abs(d["S0"])
    o_ref, (S_ref, z_ref) = fla.naive_recurrent_linear_attn(
        *_torch(q, k, d["v"]), initial_state=tuple(_torch(S0, z0[:, None])), output_final_state=True,
        normalize=True)
    for mode_id, (o, (S, z)) in _each_mode(ops.linear_attention, *_jax(q, k, d["v"]), normalize=True,
                                           initial_state=tuple(_jax(S0, z0)), output_final_state=True):
        _assert_close(o, o_ref, f"{mode_id} o")
        _assert_close(S, S_ref, f"{mode_id} final S")
        _assert_close(z, z_ref[:, 0], f"{mode_id} final key sum")


@pytest.mark.refs
def test_simple_gla_matches_fla_naive_recurrent_and_chunk_simple_gla(fla):
    d = _data(2)
    args = _torch(d["q"], d["k"], d["v"], d["g"])
    o_rec, S_rec = fla.naive_recurrent_simple_gla(*args, initial_state=_torch(d["S0"])[0],
                                                  output_final_state=True)
    o_chunk, S_chunk = fla.naive_chunk_simple_gla(*args, initial_state=_torch(d["S0"])[0],
                                                  output_final_state=True, chunk_size=4)
    for mode_id, (o, S) in _each_mode(ops.simple_gla, *_jax(d["q"], d["k"], d["v"], d["g"]),
                                      initial_state=jnp.asarray(d["S0"]), output_final_state=True):
        for name, (o_ref, S_ref) in (("recurrent", (o_rec, S_rec)), ("chunk", (o_chunk, S_chunk))):
            _assert_close(o, o_ref, f"{mode_id} o vs {name}")
            _assert_close(S, S_ref, f"{mode_id} final state vs {name}")


@pytest.mark.refs
def test_retention_matches_fla_naive_retention_and_with_a_state_simple_gla_with_retnet_decays(fla):
    """``naive_retention`` ([B, H, T, K], no state, o only); with an initial and final state against
    ``naive_recurrent_simple_gla`` with RetNet's decays γ_h = 1 - 2^(-5-h), written here."""
    d = _data(3)
    o_ref = fla.naive_retention(*_torch(*(_heads_first(d[n]) for n in ("q", "k", "v"))))
    for mode_id, (o, state) in _each_mode(ops.retention, *_jax(d["q"], d["k"], d["v"])):
        assert state is None
        _assert_close(o, _heads_first(o_ref), f"{mode_id} o")
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(H))
    g = np.broadcast_to(np.log(gamma), (B, T, H)).astype(np.float32)
    o_ref, S_ref = fla.naive_recurrent_simple_gla(*_torch(d["q"], d["k"], d["v"], g),
                                                  initial_state=_torch(d["S0"])[0], output_final_state=True)
    for mode_id, (o, S) in _each_mode(ops.retention, *_jax(d["q"], d["k"], d["v"]),
                                      initial_state=jnp.asarray(d["S0"]), output_final_state=True):
        _assert_close(o, o_ref, f"{mode_id} o with a state")
        _assert_close(S, S_ref, f"{mode_id} final state")


@pytest.mark.refs
@pytest.mark.parametrize("layer_idx,num_layers", [(0, 4), (3, 4)])
def test_lightning_attention_matches_simple_gla_with_fla_lightning_decays(fla, layer_idx, num_layers):
    """FLA has no naive Lightning reference; its ``chunk_lightning_attn`` is simple GLA with the fixed
    log decay g_h = -(8 / H)(1 - layer_idx / num_layers) h (its ``g_gamma``), built here."""
    d = _data(4)
    g_gamma = -(8.0 / H * (1.0 - layer_idx / num_layers)) * np.arange(H)
    g = np.broadcast_to(g_gamma, (B, T, H)).astype(np.float32)
    o_ref, S_ref = fla.naive_recurrent_simple_gla(*_torch(d["q"], d["k"], d["v"], g),
                                                  initial_state=_torch(d["S0"])[0], output_final_state=True)
    args = (*_jax(d["q"], d["k"], d["v"]), layer_idx, num_layers)
    for mode_id, (o, S) in _each_mode(ops.lightning_attention, *args, initial_state=jnp.asarray(d["S0"]),
                                      output_final_state=True):
        _assert_close(o, o_ref, f"{mode_id} o")
        _assert_close(S, S_ref, f"{mode_id} final state")


@pytest.mark.refs
def test_gla_matches_fla_naive_recurrent_gla(fla):
    d = _data(5)
    o_ref, S_ref = fla.naive_recurrent_gla(*_torch(d["q"], d["k"], d["v"], d["gk"]),
                                           initial_state=_torch(d["S0"])[0], output_final_state=True)
    for mode_id, (o, S) in _each_mode(ops.gla, *_jax(d["q"], d["k"], d["v"], d["gk"]),
                                      initial_state=jnp.asarray(d["S0"]), output_final_state=True):
        _assert_close(o, o_ref, f"{mode_id} o")
        _assert_close(S, S_ref, f"{mode_id} final state")


@pytest.mark.refs
def test_hgrn2_matches_fla_naive_recurrent_gla_with_one_minus_forget_as_key(fla):
    d = _data(6)
    k = 1.0 - np.exp(d["gk"].astype(np.float64))
    o_ref, S_ref = fla.naive_recurrent_gla(*_torch(d["q"], k.astype(np.float32), d["v"], d["gk"]),
                                           initial_state=_torch(d["S0"])[0], output_final_state=True)
    for mode_id, (o, S) in _each_mode(ops.hgrn2, *_jax(d["q"], d["v"], d["gk"]),
                                      initial_state=jnp.asarray(d["S0"]), output_final_state=True):
        _assert_close(o, o_ref, f"{mode_id} o")
        _assert_close(S, S_ref, f"{mode_id} final state")


@pytest.mark.refs
def test_rwkv6_matches_fla_naive_recurrent_rwkv6(fla):
    """FLA's layout is [B, H, T, K]; w is the log decay (-exp of the model's parameterisation)."""
    d = _data(7)
    w = (-np.exp(_normal(np.random.default_rng(17), B, T, H, K))).astype(np.float32)
    o_ref, S_ref = fla.naive_recurrent_rwkv6(*_torch(*(_heads_first(x) for x in (d["q"], d["k"], d["v"], w))),
                                             _torch(d["u"])[0], initial_state=_torch(d["S0"])[0],
                                             output_final_state=True)
    for mode_id, (o, S) in _each_mode(ops.rwkv6, *_jax(d["q"], d["k"], d["v"], w, d["u"]),
                                      initial_state=jnp.asarray(d["S0"]), output_final_state=True):
        _assert_close(o, _heads_first(o_ref), f"{mode_id} o")
        _assert_close(S, S_ref, f"{mode_id} final state")


# --------------------------------------------------------------------------------------------
# GateLoop: no peer reference; a complex float64 loop written here.


def _gateloop_loop(q, k, v, log_a, S0, scale):
    """S_t = diag(exp(log_a_t)) S_{t-1} + k_t v_tᵀ (complex), o_t = Re(Σ_k s q_{t,k} S_t[k, :])."""
    S = S0.astype(np.complex128)
    o = np.zeros(v.shape)
    for t in range(q.shape[1]):
        S = np.exp(log_a[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.real(np.einsum("bhk,bhkv->bhv", scale * q[:, t], S))
    return o, S


def test_gateloop_matches_a_complex_float64_loop():
    """Real q, k, v, a complex transition a = |a| e^{iθ} per key dimension and a complex initial state,
    as GateLoop's model uses it; the state comes back complex64."""
    d = _data(8)
    rng = np.random.default_rng(18)
    log_a = (d["gk"] + 1j * _normal(rng, B, T, H, K)).astype(np.complex64)
    S0 = (d["S0"] + 1j * _normal(rng, B, H, K, V)).astype(np.complex64)
    want_o, want_S = _gateloop_loop(*(x.astype(np.float64) for x in (d["q"], d["k"], d["v"])),
                                    log_a.astype(np.complex128), S0, K ** -0.5)
    for mode_id, (o, S) in _each_mode(ops.gateloop, *_jax(d["q"], d["k"], d["v"], log_a),
                                      initial_state=jnp.asarray(S0), output_final_state=True):
        assert o.dtype == np.float32 and S.dtype == np.complex64, mode_id
        _assert_close(o, want_o, f"{mode_id} o")
        np.testing.assert_allclose(S, want_S, rtol=RTOL, atol=RTOL * float(np.max(np.abs(want_S))),
                                   err_msg=f"{mode_id} final state")


# --------------------------------------------------------------------------------------------
# mLSTM against mlstm_kernels' JAX kernels.


def _mlstm_data(seed):
    rng = np.random.default_rng(seed)
    d = {"q": _normal(rng, B, T, H, K), "k": _normal(rng, B, T, H, K), "v": _normal(rng, B, T, H, V),
         "i": _normal(rng, B, T, H), "f": _normal(rng, B, T, H) + 1.0}
    state = (_normal(rng, B, H, K, V), _normal(rng, B, H, K), 0.5 * _normal(rng, B, H))
    return d, state


def _mlstm_kernel_args(d):
    """q, k, v -> [B, NH, S, D]; i, f -> [B, NH, S]."""
    return [jnp.asarray(np.swapaxes(d[n], 1, 2)) for n in ("q", "k", "v", "i", "f")]


@pytest.mark.refs
@pytest.mark.parametrize("with_state,eps", [(False, 1e-6), (True, 1e-2)],
                         ids=["fresh_state", "initial_state_eps_1e-2"])
def test_mlstm_matches_mlstm_kernels_chunkwise_native_kernel(mlstm_ref, with_state, eps):
    """Sigmoid forget gate; the kernel's chunk is 4 (it needs S % chunk == 0); final (C, n, m) too.
    With the initial state, eps = 1e-2 makes the normaliser's eps term (which weighs eps·exp(m_t) in
    unstabilised terms, so depends on where eps is added and on m) visible at the 1e-2 level."""
    d, state = _mlstm_data(9)
    c0, n0, m0 = (jnp.asarray(x) for x in state) if with_state else (None, None, None)
    h_ref, (c_ref, n_ref, m_ref) = mlstm_ref.mlstm_chunkwise__native_autograd(
        *_mlstm_kernel_args(d), c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True,
        chunk_size=4, eps=eps)
    init = tuple(_jax(*state)) if with_state else None
    for mode_id, (h, (C, n, m)) in _each_mode(ops.mlstm, *_jax(d["q"], d["k"], d["v"], d["i"], d["f"]),
                                              initial_state=init, output_final_state=True, eps=eps):
        _assert_close(h, _heads_first(h_ref), f"{mode_id} h")
        _assert_close(C, c_ref, f"{mode_id} final C")
        _assert_close(n, n_ref, f"{mode_id} final n")
        _assert_close(m, m_ref, f"{mode_id} final m")


@pytest.mark.refs
def test_mlstm_matches_mlstm_kernels_parallel_native_kernel(mlstm_ref):
    """The parallel kernel has no states, and its stabiliser starts from m = -inf (zoo's from 0); the
    two differ only in the eps·exp(m) term of the normaliser, far below 1e-5 here."""
    d, _ = _mlstm_data(10)
    h_ref = mlstm_ref.mlstm_parallel__native_autograd(*_mlstm_kernel_args(d))
    for mode_id, (h, _) in _each_mode(ops.mlstm, *_jax(d["q"], d["k"], d["v"], d["i"], d["f"])):
        _assert_close(h, _heads_first(h_ref), f"{mode_id} h")


# --------------------------------------------------------------------------------------------
# The front ends' own arguments.


def test_front_ends_return_no_state_unless_asked():
    d = _data(12)
    q, k, v, g, gk = _jax(d["q"], d["k"], d["v"], d["g"], d["gk"])
    i = jnp.asarray(d["g"])
    seq = {"mode": "sequential"}            # the cheapest to compile; what is returned is mode-independent
    results = [ops.linear_attention(q, k, v, **seq), ops.simple_gla(q, k, v, g, **seq),
               ops.retention(q, k, v, **seq), ops.lightning_attention(q, k, v, 0, 2, **seq),
               ops.gla(q, k, v, gk, **seq), ops.hgrn2(q, v, gk, **seq), ops.gateloop(q, k, v, gk, **seq),
               ops.rwkv6(q, k, v, gk, jnp.asarray(d["u"]), **seq), ops.mlstm(q, k, v, i, i, **seq)]
    for o, state in results:
        assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
        assert state is None


def test_front_end_errors_name_the_argument_and_shapes():
    d = _data(13)
    q, k, v, g, gk, u = _jax(d["q"], d["k"], d["v"], d["g"], d["gk"], d["u"])
    with pytest.raises(ValueError, match=r"gla: gk must have shape \[B, T, H, K\].*got \(2, 12, 2\)"):
        ops.gla(q, k, v, g)
    with pytest.raises(ValueError, match=r"simple_gla: g must have shape \[B, T, H\].*got \(2, 12, 2, 3\)"):
        ops.simple_gla(q, k, v, gk)
    with pytest.raises(ValueError, match=r"hgrn2: g must have shape \[B, T, H, K\].*got \(2, 12, 2\)"):
        ops.hgrn2(q, v, g)
    with pytest.raises(ValueError, match=r"gateloop: log_a must have shape \[B, T, H, K\], got \(2, 12, 2\)"):
        ops.gateloop(q, k, v, g)
    with pytest.raises(ValueError, match=r"rwkv6: w must have shape \[B, T, H, K\].*got \(2, 12, 2\)"):
        ops.rwkv6(q, k, v, g, u)
    for bad_u in (u[0], u[:, :2], jnp.ones((H, K, 1))):
        with pytest.raises(ValueError, match=r"rwkv6: u must have shape \[H, K\] = \(2, 3\)"):
            ops.rwkv6(q, k, v, gk, bad_u)
    with pytest.raises(ValueError, match="mlstm: forget_gate must be 'sigmoid' or 'exp', got 'tanh'"):
        ops.mlstm(q, k, v, g, g, forget_gate="tanh")
    with pytest.raises(ValueError, match=r"mlstm: f must be an array \[B, T, H\], got shape \(2, 12, 2, 3\)"):
        ops.mlstm(q, k, v, g, gk)
    with pytest.raises(ValueError, match=r"log_input_gate must have shape"):
        ops.mlstm(q, k, v, gk, g)
    for layer_idx, num_layers in ((4, 4), (-1, 4), (1.0, 4), (0, 0)):
        with pytest.raises(ValueError, match=r"lightning_attention: need 0 <= layer_idx < num_layers"):
            ops.lightning_attention(q, k, v, layer_idx, num_layers)
    with pytest.raises(ValueError, match=r"retention: q must have shape \[B, T, H, K\]"):
        ops.retention(q[..., 0], k, v)


def test_lightning_attention_with_q_of_the_wrong_rank_raises_a_value_error():
    """A q without its K axis must be refused with a ValueError naming q; it fails earlier, dividing
    by the head count it takes as 0 (``lightning_log_decay(0, ...)``: ZeroDivisionError)."""
    d = _data(14)
    q, k, v = _jax(d["q"], d["k"], d["v"])
    with pytest.raises(ValueError, match=r"lightning_attention: q must have shape \[B, T, H, K\]"):
        ops.lightning_attention(q[..., 0], k, v, 0, 2)
