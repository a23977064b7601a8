"""The peer-reference loaders work, and what they load is itself right on tiny cases.

Each reference function is compared with a float64 numpy loop written here from the equations (not
from the reference's code). The references compute in float32, so they agree with the loops to a few
float32 ulps of each output's scale; RTOL below (scale-relative) is the agreement level they are held
to, which is also the level the zoo ops are matched to them.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.refs.fla_reference import load_fla_reference
from tests.refs.mlstm_kernels_reference import load_mlstm_kernels_reference

pytestmark = pytest.mark.refs

RTOL = 1e-5
B, T, H, K, V = 2, 7, 2, 4, 3


def assert_close(got, want, rtol=RTOL, what=""):
    """Elementwise within rtol, and within rtol of the largest magnitude of ``want``."""
    got = np.asarray(got.detach() if hasattr(got, "detach") else got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)), err_msg=what)


def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def log_decay(rng, *shape):
    """log of a decay in (0, 1): log σ(z) for z around 2 (decays 0.5 .. 0.98)."""
    return -np.logaddexp(0.0, -(rng.standard_normal(shape) + 2.0)).astype(np.float32)


def qkv_state(rng):
    """q, k [B, T, H, K], v [B, T, H, V] and an initial state [B, H, K, V], all random normal."""
    return normal(rng, B, T, H, K), normal(rng, B, T, H, K), normal(rng, B, T, H, V), normal(rng, B, H, K, V)


def torch_args(*arrays):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# --------------------------------------------------------------------------------------------
# float64 loops, [B, T, H, ...] layout: S_t = Diag(exp(w_t)) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ (s q_t).


def outer_product_loop(q, k, v, log_w, scale, s0=None, bonus=None):
    """``log_w`` broadcasts against k ([B, T, H, 1] scalar or [B, T, H, K] per key). With ``bonus``
    u [H, K] (RWKV-6), the output reads the previous state plus the current token weighted by u:
    o_t = (S_{t-1} + Diag(u) k_t v_tᵀ)ᵀ (s q_t), and the state updates after."""
    q, k, v, log_w = (np.asarray(a, np.float64) for a in (q, k, v, log_w))
    s = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3])) if s0 is None else np.array(s0, np.float64)
    outputs = []
    for t in range(q.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        if bonus is None:
            s = np.exp(log_w[:, t])[..., None] * s + kv
            read = s
        else:
            read = s + np.asarray(bonus, np.float64)[None, :, :, None] * kv
            s = np.exp(log_w[:, t])[..., None] * s + kv
        outputs.append(np.einsum("bhk,bhkv->bhv", scale * q[:, t], read))
    return np.stack(outputs, axis=1), s


def delta_rule_loop(q, k, v, beta, scale, log_alpha=None, s0=None):
    """The (gated) delta rule in the [B, T, H, ...] layout (α_t = 1 without ``log_alpha``)::

        S' = α_t S_{t-1};  S_t = S' + β_t k_t (v_t - S'ᵀ k_t)ᵀ;  o_t = S_tᵀ (s q_t)
    """
    q, k, v, beta = (np.asarray(a, np.float64) for a in (q, k, v, beta))
    s = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3])) if s0 is None else np.array(s0, np.float64)
    outputs = []
    for t in range(q.shape[1]):
        if log_alpha is not None:
            s = np.exp(np.asarray(log_alpha, np.float64)[:, t])[..., None, None] * s
        error = v[:, t] - np.einsum("bhkv,bhk->bhv", s, k[:, t])
        s = s + beta[:, t, :, None, None] * k[:, t, :, :, None] * error[:, :, None, :]
        outputs.append(np.einsum("bhk,bhkv->bhv", scale * q[:, t], s))
    return np.stack(outputs, axis=1), s


def heads_first(x):
    """[B, T, H, ...] -> [B, H, T, ...]."""
    return np.swapaxes(x, 1, 2)


# --------------------------------------------------------------------------------------------
# FLA


def test_fla_loader_reads_the_files_without_importing_fla():
    ref = load_fla_reference()
    for name, fn in vars(ref).items():
        assert fn.__module__.startswith("_zoo_fla_reference."), name
    import sys

    assert "fla" not in sys.modules, "loading the references must not import the fla package"


def test_fla_simple_gla_recurrent_chunk_and_parallel_equal_a_float64_loop():
    ref = load_fla_reference()
    rng = np.random.default_rng(0)
    q, k, v, s0 = qkv_state(rng)
    g = log_decay(rng, B, T, H)
    want, want_final = outer_product_loop(q, k, v, g[..., None], scale=0.5, s0=s0)

    o, final = ref.naive_recurrent_simple_gla(*torch_args(q, k, v, g), scale=0.5,
                                              initial_state=torch_args(s0)[0], output_final_state=True)
    assert_close(o, want, what="recurrent o")
    assert_close(final, want_final, what="recurrent final state")
    # T = 7 with chunks of 3: the chunked form pads the last chunk.
    o, final = ref.naive_chunk_simple_gla(*torch_args(q, k, v, g), initial_state=torch_args(s0)[0],
                                          output_final_state=True, chunk_size=3, scale=0.5)
    assert_close(o, want, what="chunk o")
    assert_close(final, want_final, what="chunk final state")
    o, _ = ref.naive_parallel_simple_gla(*torch_args(q, k, v, g), scale=0.5)      # no initial state
    assert_close(o, outer_product_loop(q, k, v, g[..., None], scale=0.5)[0], what="parallel o")


def test_fla_gla_recurrent_equals_a_float64_loop_with_per_key_decay():
    ref = load_fla_reference()
    rng = np.random.default_rng(1)
    q, k, v, s0 = qkv_state(rng)
    gk = log_decay(rng, B, T, H, K)
    want, want_final = outer_product_loop(q, k, v, gk, scale=K**-0.5, s0=s0)     # scale fixed at K^-1/2
    o, final = ref.naive_recurrent_gla(*torch_args(q, k, v, gk), initial_state=torch_args(s0)[0],
                                       output_final_state=True)
    assert_close(o, want, what="o")
    assert_close(final, want_final, what="final state")


def test_fla_retention_is_simple_gla_with_fixed_decays_in_heads_first_layout():
    ref = load_fla_reference()
    rng = np.random.default_rng(2)
    q, k, v = normal(rng, B, T, H, K), normal(rng, B, T, H, K), normal(rng, B, T, H, V)
    decay = np.log1p(-(2.0 ** (-5.0 - np.arange(H))))                             # RetNet's γ_h
    want, _ = outer_product_loop(q, k, v, np.broadcast_to(decay[None, None, :, None], (B, T, H, 1)),
                                 scale=K**-0.5)
    o = ref.naive_retention(*torch_args(heads_first(q), heads_first(k), heads_first(v)))
    assert_close(o, heads_first(want), what="o [B, H, T, V]")


def test_fla_linear_attention_recurrent_and_normalised_equal_a_float64_loop():
    ref = load_fla_reference()
    rng = np.random.default_rng(3)
    # Positive features (as after a feature map), so the normaliser is far from zero.
    q, k = np.abs(normal(rng, B, T, H, K)) + 0.1, np.abs(normal(rng, B, T, H, K)) + 0.1
    v, s0 = normal(rng, B, T, H, V), normal(rng, B, H, K, V)
    zeros = np.zeros((B, T, H, 1), np.float32)
    want, want_final = outer_product_loop(q, k, v, zeros, scale=0.5, s0=s0)
    o, final = ref.naive_recurrent_linear_attn(*torch_args(q, k, v), scale=0.5,
                                               initial_state=torch_args(s0)[0], output_final_state=True)
    assert_close(o, want, what="o")
    assert_close(final, want_final, what="final state")
    unnormalised, _ = outer_product_loop(q, k, v, zeros, scale=0.5)
    key_sums = np.cumsum(k.astype(np.float64), axis=1)
    normaliser = np.einsum("bthk,bthk->bth", 0.5 * q.astype(np.float64), key_sums)
    o, _ = ref.naive_recurrent_linear_attn(*torch_args(q, k, v), scale=0.5, normalize=True)
    assert_close(o, unnormalised / (normaliser[..., None] + 1e-10), what="normalised o")


def test_fla_rwkv6_recurrent_equals_a_float64_loop_with_the_bonus_in_heads_first_layout():
    ref = load_fla_reference()
    rng = np.random.default_rng(4)
    q, k, v, s0 = qkv_state(rng)
    w, u = log_decay(rng, B, T, H, K), normal(rng, H, K)
    want, want_final = outer_product_loop(q, k, v, w, scale=0.5, s0=s0, bonus=u)
    o, final = ref.naive_recurrent_rwkv6(*torch_args(*map(heads_first, (q, k, v, w)), u), scale=0.5,
                                         initial_state=torch_args(s0)[0], output_final_state=True)
    assert_close(o, heads_first(want), what="o [B, H, T, V]")
    assert_close(final, want_final, what="final state")


def test_fla_hgrn_recurrent_equals_a_float64_loop():
    ref = load_fla_reference()
    rng = np.random.default_rng(5)
    x, g, h0 = normal(rng, B, T, 5), log_decay(rng, B, T, 5), normal(rng, B, 5)
    h, want = h0.astype(np.float64), []
    for t in range(T):
        h = np.exp(g[:, t].astype(np.float64)) * h + x[:, t]
        want.append(h)
    o, final = ref.naive_recurrent_hgrn(*torch_args(x, g, h0), output_final_state=True)
    assert_close(o, np.stack(want, axis=1), what="o")
    assert_close(final, h, what="final state")


def test_fla_delta_rules_equal_a_float64_loop():
    ref = load_fla_reference()
    rng = np.random.default_rng(6)
    q, v, s0 = normal(rng, B, T, H, K), normal(rng, B, T, H, V), normal(rng, B, H, K, V)
    # Unit keys and β in (0, 1): the delta rule's usual regime, where its state stays bounded.
    k = normal(rng, B, T, H, K)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = (1.0 / (1.0 + np.exp(-normal(rng, B, T, H)))).astype(np.float32)
    g = log_decay(rng, B, T, H)

    want, want_final = delta_rule_loop(q, k, v, beta, K**-0.5, s0=s0)
    o, final = ref.delta_rule_recurrence(*torch_args(*map(heads_first, (q, k, v, beta)), s0))
    assert_close(o, heads_first(want), what="delta rule o [B, H, T, V]")
    assert_close(final, want_final, what="delta rule final state")

    want, want_final = delta_rule_loop(q, k, v, beta, 0.5, log_alpha=g, s0=s0)
    o, final = ref.naive_recurrent_gated_delta_rule(*torch_args(q, k, v, beta, g), scale=0.5,
                                                    initial_state=torch_args(s0)[0], output_final_state=True)
    assert_close(o, want, what="gated delta rule o")
    assert_close(final, want_final, what="gated delta rule final state")
    o, final = ref.naive_chunk_gated_delta_rule(*torch_args(q, k, v, g, beta), chunk_size=4, scale=0.5,
                                                initial_state=torch_args(s0)[0], output_final_state=True)
    assert_close(o, want, what="chunked gated delta rule o")
    assert_close(final, want_final, what="chunked gated delta rule final state")


# --------------------------------------------------------------------------------------------
# mlstm_kernels (layout [B, NH, S, D], gates [B, NH, S])


def mlstm_loop(q, k, v, i, f, scale, eps=1e-6, c0=None, n0=None, m0=0.0):
    """The stabilised mLSTM recurrence in float64, from the xLSTM paper's equations (exponential input
    gate exp(i), forget gate σ(f), max-stabiliser m), with mlstm_kernels' normaliser and eps."""
    q, k, v, i, f = (np.asarray(a, np.float64) for a in (q, k, v, i, f))
    b, nh, s, dk = q.shape
    c = np.zeros((b, nh, dk, v.shape[-1])) if c0 is None else np.array(c0, np.float64)
    n = np.zeros((b, nh, dk)) if n0 is None else np.array(n0, np.float64)
    m = np.broadcast_to(np.asarray(m0, np.float64), (b, nh))
    outputs = []
    for t in range(s):
        log_f = -np.logaddexp(0.0, -f[:, :, t])
        m_new = np.maximum(log_f + m, i[:, :, t])
        keep, write = np.exp(log_f + m - m_new), np.exp(i[:, :, t] - m_new)
        c = keep[..., None, None] * c + write[..., None, None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        n = keep[..., None] * n + write[..., None] * k[:, :, t]
        qs = scale * q[:, :, t]
        denominator = np.maximum(np.abs(np.einsum("bhk,bhk->bh", qs, n)), np.exp(-m_new)) + eps
        outputs.append(np.einsum("bhk,bhkv->bhv", qs, c) / denominator[..., None])
        m = m_new
    return np.stack(outputs, axis=2), (c, n, m)


def mlstm_data(seed, s=8):
    # Input gates around 0 keep the normaliser well conditioned: with large input gates the floor
    # exp(-m) is small and |n·q| can cancel, and any two float32 implementations then differ by ~1e-4.
    rng = np.random.default_rng(seed)
    q, k, v = normal(rng, B, H, s, K), normal(rng, B, H, s, K), normal(rng, B, H, s, V)
    return q, k, v, normal(rng, B, H, s), normal(rng, B, H, s) + 2.0


def jitted(kernel):
    """The kernel jitted with its flags static: the chunkwise kernels are Python loops of small ops,
    which compile faster as one program than op by op."""
    return jax.jit(kernel, static_argnames=("return_last_states", "chunk_size", "qk_scale"))


def test_mlstm_kernels_loader_reads_the_files_without_importing_the_package():
    import sys

    ref = load_mlstm_kernels_reference()
    assert "mlstm_kernels" not in sys.modules and "jax_triton" not in sys.modules
    with pytest.raises(RuntimeError, match="stand-in"):
        sys.modules["_zoo_mlstm_kernels_reference.recurrent.triton_step"].mlstm_recurrent_step__triton_fw()
    assert callable(ref.mlstm_chunkwise)


def test_mlstm_kernels_chunkwise_parallel_and_recurrent_equal_a_float64_loop():
    ref = load_mlstm_kernels_reference()
    q, k, v, i, f = mlstm_data(7)
    want, (c, n, m) = mlstm_loop(q, k, v, i, f, scale=K**-0.5)
    chunkwise = jitted(ref.mlstm_chunkwise)
    h, (c_got, n_got, m_got) = chunkwise(q, k, v, i, f, return_last_states=True, chunk_size=4)
    assert_close(h, want, what="chunkwise h")
    assert_close(c_got, c, what="chunkwise C")
    assert_close(n_got, n, what="chunkwise n")
    assert_close(m_got, m, what="chunkwise m")
    assert_close(jitted(ref.mlstm_chunkwise__native_autograd)(q, k, v, i, f, chunk_size=2), want,
                 what="native_autograd")
    assert_close(ref.mlstm_recurrent_sequence__native_fw(q, k, v, i, f), want, what="recurrent sequence h")
    # The parallel form has no initial state: its stabiliser starts from m_0 = -inf.
    want_parallel, _ = mlstm_loop(q, k, v, i, f, scale=K**-0.5, m0=-np.inf)
    assert_close(ref.mlstm_parallel_fw(q, k, v, i, f)[0], want_parallel, what="parallel h")
    assert_close(ref.mlstm_parallel__native_custbw(q, k, v, i, f), want_parallel, what="parallel custbw h")


def test_mlstm_kernels_initial_states_qk_scale_and_step_equal_a_float64_loop():
    import jax.numpy as jnp

    ref = load_mlstm_kernels_reference()
    q, k, v, i, f = mlstm_data(8)
    rng = np.random.default_rng(9)
    c0, n0, m0 = normal(rng, B, H, K, V), np.abs(normal(rng, B, H, K)), normal(rng, B, H)
    want, (c, n, m) = mlstm_loop(q, k, v, i, f, scale=K**-0.5, c0=c0, n0=n0, m0=m0)
    chunkwise = jitted(ref.mlstm_chunkwise)
    h, (c_got, n_got, m_got) = chunkwise(q, k, v, i, f, matC_initial=c0, vecN_initial=n0,
                                                   scaM_initial=m0, return_last_states=True, chunk_size=4)
    assert_close(h, want, what="chunkwise h from a state")
    assert_close(c_got, c, what="chunkwise C from a state")
    assert_close(m_got, m, what="chunkwise m from a state")
    # qk_scale multiplies q in the numerator and in the normaliser alike.
    assert_close(chunkwise(q, k, v, i, f, qk_scale=0.3, chunk_size=2),
                 mlstm_loop(q, k, v, i, f, scale=0.3)[0], what="chunkwise h with qk_scale")
    # The step, folded by hand (the sequence function cannot take initial states: it calls
    # scaM_initial.axis(), which jax arrays lack).
    state, outputs = (jnp.asarray(c0), jnp.asarray(n0), jnp.asarray(m0)[..., None]), []
    for t in range(q.shape[2]):
        h_t, state = ref.mlstm_recurrent_step__native(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None],
                                                      f[:, :, t, None], *state)
        outputs.append(h_t)
    assert_close(jnp.stack(outputs, axis=2), want, what="stepped h")
    assert_close(state[1], n, what="stepped n")
    assert_close(state[2][..., 0], m, what="stepped m")
