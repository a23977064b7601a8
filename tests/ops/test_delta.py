"""zoo.ops.delta (the delta-rule engine) and its front ends zoo.ops.delta_ops: modes, numerics, bad input.

Chain of trust:

* ``_numpy_loop`` below is written here from the equation, one step at a time in float64, and shares no
  code with the engine; ``test_reference_matches_numpy_loop`` ties ``delta.reference`` to it (initial
  state, resets, reverse, decays);
* under ``jax.enable_x64`` every mode ("sequential", "chunked" with chunks of 5 that leave the last one
  padded in T = 12, chunks of 4 that divide it, and the default, one chunk of T when T < 64) equals
  the reference to 1e-10 in values and in JAX gradients with respect to q, k, v, β, g and the initial
  state, with packed segments (resets at t = 0, on chunk starts, inside chunks, a segment of one step)
  forwards and reversed, gated and plain (the default run: every mode gated forwards, chunks of 5 in
  the other cases; ``-m slow``: every mode in every case);
* float32 within 1e-5 of the float64 reference; bfloat16 inputs keep a float32 state and agree with
  float32 within bfloat16's rounding; folding ``step`` equals ``apply``;
* β near 0 and near 1 (1e-6, 1 - 1e-6) and decays near 0 (g = -30, -1e4) at T = 200 in float32 stay
  finite (values and gradients) and match the float64 numpy loop;
* (``refs`` marker) FLA's naive torch references (fla-core 0.6.0): ``naive_recurrent_gated_delta_rule``,
  ``naive_chunk_gated_delta_rule``, ``delta_rule_recurrence`` and ``delta_rule_chunkwise``, with and
  without ``use_qk_l2norm_in_kernel`` (against torch's own ``F.normalize``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import delta
from zoo.ops.delta_ops import delta_rule, gated_delta_rule

pytestmark = pytest.mark.usefixtures("quick_compile")   # tests/conftest.py

B, T, H, K, V = 2, 12, 2, 3, 4
MODE_VARIANTS = (("sequential", None), ("chunked", 5), ("chunked", 4), ("chunked", None))
MODE_IDS = ("sequential", "chunked5", "chunked4", "chunked_default")


def _reset(batch=B, time=T):
    """Row 0: a reset at t = 0 (the initial state is dropped), a segment of one step ([4, 5)), flags on
    chunk starts (4, 5, 10); row 1: one flag inside a chunk (7), after steps from the initial state."""
    reset = np.zeros((batch, time), bool)
    reset[0, [0, 4, 5, 10]] = True
    reset[1, 7] = True
    return reset


def _data(seed, time=T, batch=B, normalise_keys=True):
    """float64 numpy inputs: unit keys (the delta rule's usual regime), β = σ(z), g = log σ(z + 1)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((batch, time, H, K))
    if normalise_keys:
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return {"q": rng.standard_normal((batch, time, H, K)), "k": k,
            "v": rng.standard_normal((batch, time, H, V)),
            "beta": 1.0 / (1.0 + np.exp(-rng.standard_normal((batch, time, H)))),
            "g": -np.logaddexp(0.0, -(rng.standard_normal((batch, time, H)) + 1.0)),
            "S0": rng.standard_normal((batch, H, K, V))}


def _numpy_loop(q, k, v, beta, g, S0, reset=None, reverse=False, scale=K ** -0.5):
    """S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t · scale, per batch row and head,
    float64. ``reset[b, t]`` starts a segment at t: each segment runs from a zero state, except the
    one the run enters first (the first forwards unless reset[b, 0], the last backwards), which
    starts from S0. ``reverse`` runs each segment from its last step to its first."""
    batch, time, heads, dk = q.shape
    o = np.zeros(v.shape)
    S_final = np.zeros(S0.shape)
    for b in range(batch):
        # Segments as sets of steps, independent of the direction.
        starts = [0] + [t for t in range(1, time) if reset is not None and reset[b, t]]
        bounds = list(zip(starts, starts[1:] + [time], strict=True))
        first_has_state = reset is None or not reset[b, 0]
        for h in range(heads):
            order = bounds[::-1] if reverse else bounds
            S = None
            for index, (lo, hi) in enumerate(order):
                carries_initial = index == 0 and (reverse or first_has_state)
                S = S0[b, h].copy() if carries_initial else np.zeros((dk, v.shape[-1]))
                steps = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
                for t in steps:
                    kt = k[b, t, h]
                    transition = np.exp(g[b, t, h]) * (np.eye(dk) - beta[b, t, h] * np.outer(kt, kt))
                    S = transition @ S + beta[b, t, h] * np.outer(kt, v[b, t, h])
                    o[b, t, h] = scale * S.T @ q[b, t, h]
            S_final[b, h] = S
    return o, S_final


def _jax(d, names=("q", "k", "v", "beta", "g")):
    return [jnp.asarray(d[n]) for n in names]


# --------------------------------------------------------------------------------------------
# The reference against the numpy loop.


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_matches_numpy_loop(reverse):
    d = _data(0)
    reset = _reset()
    want_o, want_S = _numpy_loop(d["q"], d["k"], d["v"], d["beta"], d["g"], d["S0"], reset, reverse)
    with jax.enable_x64(True):
        o, S = delta.reference(*_jax(d), initial_state=jnp.asarray(d["S0"]), reset=reset, reverse=reverse)
        np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(S), want_S, rtol=1e-12, atol=1e-12)


def test_reference_without_decay_is_the_plain_delta_rule():
    d = _data(1)
    want_o, want_S = _numpy_loop(d["q"], d["k"], d["v"], d["beta"], np.zeros_like(d["g"]), d["S0"])
    with jax.enable_x64(True):
        o, S = delta.reference(*_jax(d, ("q", "k", "v", "beta")), initial_state=jnp.asarray(d["S0"]))
        np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(S), want_S, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Every mode against the float64 reference, values and gradients.


def _loss(fn, q, k, v, beta, g, S0, reset, reverse, **kwargs):
    """A scalar that weighs every output and every entry of the final state differently."""
    o, S = fn(q, k, v, beta, g, initial_state=S0, reset=reset, reverse=reverse, **kwargs)
    weights_o = jnp.sin(jnp.arange(o.size, dtype=o.dtype)).reshape(o.shape)
    weights_S = jnp.cos(jnp.arange(S.size, dtype=S.dtype)).reshape(S.shape)
    return jnp.sum(o * weights_o) + jnp.sum(S * weights_S), (o, S)


@functools.cache
def _float64_results(reverse, gated, mode_ids):
    """(reference (o, S, grads), {mode id: (o, S, grads)}) in float64 for the modes ``mode_ids``."""
    d = _data(2)
    reset = jnp.asarray(_reset())
    with jax.enable_x64(True):
        args = [*_jax(d), jnp.asarray(d["S0"])]
        if not gated:
            args[4] = None

        def run(fn, **kwargs):
            loss = functools.partial(_loss, fn, reset=reset, reverse=reverse, **kwargs)
            argnums = (0, 1, 2, 3, 5) if not gated else (0, 1, 2, 3, 4, 5)
            grads, (o, S) = jax.grad(loss, argnums=argnums, has_aux=True)(*args)
            return jax.tree.map(np.asarray, (o, S, grads))

        want = run(delta.reference)
        got = {mode_id: run(delta.apply, mode=mode, chunk_size=chunk)
               for mode_id, (mode, chunk) in zip(MODE_IDS, MODE_VARIANTS, strict=True) if mode_id in mode_ids}
    return want, got


# Compiling a value-and-gradient program per mode is the cost (XLA, ~5-10 s each on a loaded machine),
# so the default run checks every mode in the gated forward case and the padded chunked mode (chunks of
# 5) in the others; ``-m slow`` checks every mode in every case.
DEFAULT_CASES = [(False, True, MODE_IDS), (True, True, ("chunked5",)), (False, False, ("chunked5",)),
                 (True, False, ("sequential", "chunked5"))]
SLOW_CASES = [pytest.param(reverse, gated, MODE_IDS, marks=pytest.mark.slow)
              for reverse, gated in ((True, True), (False, False), (True, False))]


def _case_id(reverse, gated, mode_ids):
    return f"{'reverse' if reverse else 'forward'}-{'gated' if gated else 'plain'}-{'+'.join(mode_ids)}"


CASE_IDS = [_case_id(*c) for c in DEFAULT_CASES] + [_case_id(*c.values) for c in SLOW_CASES]


@pytest.mark.parametrize("reverse,gated,mode_ids", DEFAULT_CASES + SLOW_CASES, ids=CASE_IDS)
def test_every_mode_matches_float64_reference_values_and_gradients(reverse, gated, mode_ids):
    (want_o, want_S, want_grads), got = _float64_results(reverse, gated, mode_ids)
    assert set(got) == set(mode_ids)
    for mode_id, (o, S, grads) in got.items():
        np.testing.assert_allclose(o, want_o, rtol=1e-10, atol=1e-10, err_msg=f"{mode_id} o")
        np.testing.assert_allclose(S, want_S, rtol=1e-10, atol=1e-10, err_msg=f"{mode_id} final state")
        for i, (grad, want) in enumerate(zip(grads, want_grads, strict=True)):
            np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-10, err_msg=f"{mode_id} grad {i}")


def _assert_close(got, want, rtol, what=""):
    """Elementwise within rtol of the largest magnitude of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: not finite"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.max(np.abs(want))), err_msg=what)


def test_float32_modes_match_float64_loop():
    d = _data(3, time=40)
    want_o, want_S = _numpy_loop(d["q"], d["k"], d["v"], d["beta"], d["g"], d["S0"])
    args = [jnp.asarray(x, jnp.float32) for x in _jax(d)]
    for mode, chunk in (("sequential", None), ("chunked", 16)):
        o, S = delta.apply(*args, initial_state=jnp.asarray(d["S0"], jnp.float32), mode=mode,
                           chunk_size=chunk)
        assert o.dtype == jnp.float32 and S.dtype == jnp.float32
        _assert_close(o, want_o, 1e-5, f"{mode} o")
        _assert_close(S, want_S, 1e-5, f"{mode} S")


def test_step_fold_equals_apply():
    d = _data(4)
    args = [jnp.asarray(x, jnp.float32) for x in _jax(d)]
    state = jnp.asarray(d["S0"], jnp.float32)
    outs = []
    for t in range(T):
        state, o_t = delta.step(state, *(x[:, t] for x in args))
        outs.append(o_t)
    o, S = delta.apply(*args, initial_state=jnp.asarray(d["S0"], jnp.float32), chunk_size=5)
    _assert_close(jnp.stack(outs, axis=1), o, 1e-5, "o")
    _assert_close(state, S, 1e-5, "final state")
    # From no state (zeros), without a decay.
    state, o_0 = delta.step(None, *(x[:, 0] for x in args[:4]))
    want_o, want_S = _numpy_loop(*(np.asarray(x[:, :1], np.float64) for x in args[:4]),
                                 np.zeros((B, 1, H)), np.zeros((B, H, K, V)))
    _assert_close(o_0, want_o[:, 0], 1e-5, "first step o")
    _assert_close(state, want_S, 1e-5, "first step state")


# --------------------------------------------------------------------------------------------
# Numerics: extreme β and decays near 0, bfloat16.


@pytest.mark.parametrize("beta_value,g_value", [(1e-6, -1e4), (1 - 1e-6, -30.0), (1 - 1e-6, -1e4)],
                         ids=["beta0-g1e4", "beta1-g30", "beta1-g1e4"])
def test_extreme_beta_and_decays_are_finite_and_correct_in_float32(beta_value, g_value):
    """Half the steps get the extreme β and g (the others ordinary ones), at T = 200 with the default
    chunks (64, the last one padded): values and the float64 loop agree to 1e-5, and every gradient
    is finite."""
    d = _data(5, time=200, batch=1)
    rng = np.random.default_rng(6)
    extreme = rng.random(d["beta"].shape) < 0.5
    d["beta"] = np.where(extreme, beta_value, d["beta"])
    d["g"] = np.where(rng.random(d["g"].shape) < 0.5, g_value, d["g"])
    want_o, want_S = _numpy_loop(d["q"], d["k"], d["v"], d["beta"], d["g"], d["S0"])
    args = [jnp.asarray(x, jnp.float32) for x in (*_jax(d), d["S0"])]

    def loss(q, k, v, beta, g, S0):
        o, S = delta.apply(q, k, v, beta, g, initial_state=S0, mode="chunked")
        return jnp.sum(o) + jnp.sum(S), (o, S)

    grads, (o, S) = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(*args)
    _assert_close(o, want_o, 1e-5, "o")
    _assert_close(S, want_S, 1e-5, "S")
    for i, grad in enumerate(grads):
        assert np.all(np.isfinite(np.asarray(grad))), f"gradient {i} is not finite"


def test_bfloat16_inputs_keep_a_float32_state():
    d = _data(7, time=20)
    args16 = [jnp.asarray(x, jnp.bfloat16) for x in _jax(d)]
    args32 = [x.astype(jnp.float32) for x in args16]           # the same rounded inputs
    o16, S16 = delta.apply(*args16, initial_state=jnp.asarray(d["S0"], jnp.float32), chunk_size=8)
    o32, S32 = delta.apply(*args32, initial_state=jnp.asarray(d["S0"], jnp.float32), chunk_size=8)
    assert o16.dtype == jnp.bfloat16 and S16.dtype == jnp.float32
    _assert_close(S16, S32, 1e-6, "state (computed in float32 from the same inputs)")
    _assert_close(o16.astype(jnp.float32), o32, 1e-2, "o (rounded to bfloat16)")


# --------------------------------------------------------------------------------------------
# FLA's naive references.


@pytest.fixture(scope="module")
def fla():
    from tests.refs.fla_reference import load_fla_reference

    return load_fla_reference()


def _torch(*arrays):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32))) for a in arrays]


def _heads_first(x):
    return np.swapaxes(np.asarray(x), 1, 2)


def _each_mode(op, *args, **kwargs):
    for mode, chunk in (("sequential", None), ("chunked", 5), ("chunked", None)):
        yield f"{mode}{chunk or ''}", op(*args, mode=mode, chunk_size=chunk, **kwargs)


@pytest.mark.refs
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
def test_gated_delta_rule_matches_fla_naive_recurrent_and_chunk(fla, l2norm):
    import torch

    d = _data(8, normalise_keys=False)
    q, k = d["q"], d["k"]
    tq, tk, tv, tbeta, tg, tS0 = _torch(q, k, d["v"], d["beta"], d["g"], d["S0"])
    if l2norm:
        tq, tk = torch.nn.functional.normalize(tq, dim=-1), torch.nn.functional.normalize(tk, dim=-1)
    else:   # unit keys keep the unnormalised delta rule stable
        tk = torch.nn.functional.normalize(tk, dim=-1)
        k = tk.numpy()
    o_rec, S_rec = fla.naive_recurrent_gated_delta_rule(tq, tk, tv, tbeta, tg, initial_state=tS0,
                                                        output_final_state=True)
    o_chk, S_chk = fla.naive_chunk_gated_delta_rule(tq, tk, tv, tg, tbeta, chunk_size=4, initial_state=tS0,
                                                    output_final_state=True)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, d["v"], d["g"], d["beta"])]
    S0 = jnp.asarray(d["S0"], jnp.float32)
    for mode_id, (o, S) in _each_mode(gated_delta_rule, *args, initial_state=S0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=l2norm):
        for name, (o_ref, S_ref) in (("recurrent", (o_rec, S_rec)), ("chunk", (o_chk, S_chk))):
            _assert_close(o, o_ref.numpy(), 1e-5, f"{mode_id} o vs {name}")
            _assert_close(S, S_ref.numpy(), 1e-5, f"{mode_id} state vs {name}")


@pytest.mark.refs
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
def test_delta_rule_matches_fla_delta_rule_recurrence_and_chunkwise(fla, l2norm):
    """``delta_rule_recurrence`` (layout [B, H, T, K], scale K^-1/2, with an initial state) and
    ``delta_rule_chunkwise`` (no initial state; T a multiple of its chunk)."""
    import torch

    d = _data(9, normalise_keys=False)
    q, k = d["q"], d["k"]
    tq, tk, tv, tbeta = _torch(*(_heads_first(x) for x in (q, k, d["v"], d["beta"])))
    tS0 = _torch(d["S0"])[0]
    if l2norm:
        tq, tk = torch.nn.functional.normalize(tq, dim=-1), torch.nn.functional.normalize(tk, dim=-1)
    else:
        tk = torch.nn.functional.normalize(tk, dim=-1)
        k = _heads_first(tk.numpy())
    o_rec, S_rec = fla.delta_rule_recurrence(tq, tk, tv, tbeta, initial_state=tS0)
    o_chk, S_chk = fla.delta_rule_chunkwise(tq, tk, tv, tbeta, chunk_size=4)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, d["v"], d["beta"])]
    for mode_id, (o, S) in _each_mode(delta_rule, *args, initial_state=jnp.asarray(d["S0"], jnp.float32),
                                      output_final_state=True, use_qk_l2norm_in_kernel=l2norm):
        _assert_close(o, _heads_first(o_rec.numpy()), 1e-5, f"{mode_id} o vs recurrence")
        _assert_close(S, S_rec.numpy(), 1e-5, f"{mode_id} state vs recurrence")
    for mode_id, (o, S) in _each_mode(delta_rule, *args, output_final_state=True,
                                      use_qk_l2norm_in_kernel=l2norm):
        _assert_close(o, _heads_first(o_chk.numpy()), 1e-5, f"{mode_id} o vs chunkwise")
        _assert_close(S, S_chk.numpy(), 1e-5, f"{mode_id} state vs chunkwise")


def test_front_ends_return_no_state_unless_asked_and_normalise_q_and_k():
    d = _data(10, normalise_keys=False)
    q, k, v, beta, g = (jnp.asarray(x, jnp.float32) for x in _jax(d))
    o, state = gated_delta_rule(q, k, v, g, beta)
    assert state is None
    o_l2, _ = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    unit = [x / np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, -1, keepdims=True) + 1e-6) for x in (q, k)]
    want_o, _ = _numpy_loop(*unit, d["v"], d["beta"], d["g"], np.zeros((B, H, K, V)))
    _assert_close(o_l2, want_o, 1e-5, "o with l2-normalised q and k")


# --------------------------------------------------------------------------------------------
# Bad input.


def _good():
    d = _data(11)
    arrays = [jnp.asarray(x, jnp.float32) for x in _jax(d)]
    return dict(zip(("q", "k", "v", "beta", "log_decay"), arrays, strict=True))


@pytest.mark.parametrize("change,match", [
    ({"k": jnp.zeros((B, T, H, K + 1))}, r"k must have shape \[B, T, H, K\]"),
    ({"v": jnp.zeros((B, T - 1, H, V))}, r"v must have shape \[B, T, H, V\]"),
    ({"beta": jnp.zeros((B, T, H, 1))}, r"beta must have shape \[B, T, H\]"),
    ({"log_decay": jnp.zeros((B, T, H, K))}, r"log_decay must have shape \[B, T, H\]"),
    ({"q": jnp.zeros((B, T, H))}, r"q must have shape \[B, T, H, K\]"),
    ({"beta": jnp.zeros((B, T, H), jnp.int32)}, r"beta has dtype int32"),
    ({"initial_state": jnp.zeros((B, H, V, K))}, r"initial_state must have shape \[B, H, K, V\]"),
    ({"reset": np.zeros((B, T + 1), bool)}, r"reset must have shape \[B, T\]"),
    ({"mode": "parallel"}, r"mode='parallel' is not supported"),
    ({"chunk_size": 0}, r"chunk_size must be a positive int"),
    ({"mode": "sequential", "chunk_size": 8}, r"mode='sequential' has no chunks"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, match):
    kwargs = {**_good(), **change}
    q, k, v, beta = (kwargs.pop(n) for n in ("q", "k", "v", "beta"))
    with pytest.raises(ValueError, match=match):
        delta.apply(q, k, v, beta, **kwargs)


def test_bad_step_and_front_end_input():
    good = _good()
    q_t, k_t, v_t, beta_t = (good[n][:, 0] for n in ("q", "k", "v", "beta"))
    with pytest.raises(ValueError, match=r"beta_t must have shape \[B, H\]"):
        delta.step(None, q_t, k_t, v_t, beta_t[:, :1])
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V\]"):
        delta.step(jnp.zeros((B, H, K)), q_t, k_t, v_t, beta_t)
    with pytest.raises(TypeError, match=r"k must be an array"):
        delta_rule(good["q"], [[1.0]], good["v"], good["beta"], use_qk_l2norm_in_kernel=True)
    with pytest.raises(ValueError, match=r"log_decay must have shape"):
        gated_delta_rule(good["q"], good["k"], good["v"], good["beta"][..., None], good["beta"])
