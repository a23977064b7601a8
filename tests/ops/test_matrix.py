"""zoo.ops.matrix, the gated outer-product memory engine: modes, reference, numerics and bad input.

Chain of trust:

* the numpy loops below are written here from the equations (float64, one step at a time) and share
  no code with the engine; ``test_reference_*`` ties ``matrix.reference`` to them, including the
  mLSTM written *without* the stabiliser (C and n with exp(ĩ) directly), which pins down what the
  stabilised state and its eps term mean;
* under ``jax.enable_x64`` every mode ("sequential", "chunked" with chunks that do and do not divide
  T, "parallel") equals the reference to 1e-10 in values and in JAX gradients with respect to every
  input (q, k, v, log_decay, log_input_gate, each part of initial_state), with random initial states,
  packed segments (a reset at t = 0 and a segment of length 1) and reverse=True;
* resets equal running each segment on its own from a fresh state (m = 0 when stabilised);
* float32 within 1e-5 (relative to the largest magnitude), bfloat16 within 1e-2 of float32;
* long sequences (T = 2048, float32) with gates near 0 (log decays -30, -1e4, -inf) against the closed
  form they reduce to, and the mLSTM with input gates whose exp overflows float32 and with exponential
  forget gates above 1, against float64 numpy loops.

Compile time dominates (XLA needs 1-3 s per mode for a value-and-gradient program), so compiled
functions are cached (``_modes_fn``, ``_float64_results``) and shared between tests, the module
compiles with XLA's optimisation passes off (``quick_compile``: the tests check arithmetic, and
this halves compile time), and the default run checks the gradients of two of the four mode
variants (sequential, and chunked with padding) in every case forwards and in the mLSTM case
backwards, the values of the other two in some cases (``_default_plan``); ``-m slow`` checks the
gradients of every variant in every case in both directions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import matrix
from zoo.ops.matrix import MatrixState

pytestmark = pytest.mark.usefixtures("quick_compile")   # tests/conftest.py

B, T, H, K, V = 2, 12, 2, 3, 4
SCALE = K ** -0.5
EPS = 1e-6
# (mode, chunk_size): chunks of 5 do not divide T = 12 (the last one is padded), chunks of 4 do, and
# the parallel mode is one chunk of T.
MODE_VARIANTS = (("sequential", None), ("chunked", 5), ("chunked", 4), ("parallel", None))
MODE_IDS = ("sequential", "chunked5", "chunked4", "parallel")
# What a run checks of each variant: "grads" (values and gradients), "values", or None (skipped).
ALL_GRADS = ("grads",) * 4
ALL_VALUES = ("values",) * 4


def _reset(batch=B, time=T):
    """Packed segments. Row 0: a reset at t = 0 (the initial state is dropped), a segment of length 1
    ([4, 5)), flags on chunk starts of both chunk sizes (4, 5, 10); row 1: one flag inside a chunk (7),
    so its first segment starts from the initial state."""
    reset = np.zeros((batch, time), bool)
    reset[0, [0, 4, 5, 10]] = True
    reset[1, 7] = True
    return reset


# Each case is a configuration of the engine; ``_case_inputs`` draws its random inputs.
CASES = {
    "no_decay": {},
    "scalar_decay": {"decay": "scalar"},
    "per_key_decay": {"decay": "per_key"},
    "complex_per_key_decay": {"decay": "complex"},
    "exclusive": {"decay": "scalar", "exclusive": True},
    "exclusive_per_key": {"decay": "per_key", "exclusive": True},
    "sum_normalizer": {"decay": "scalar", "normalizer": "sum"},
    "mlstm_sigmoid_forget": {"decay": "sigmoid", "input_gate": True, "normalizer": "max_abs"},
    "mlstm_exp_forget": {"decay": "exp", "input_gate": True, "normalizer": "max_abs"},
}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _case_inputs(spec, seed=0, batch=B, time=T):
    """Random float64 (complex128) inputs for the configuration ``spec``: a dict of the differentiable
    arguments (None where unused) and the static keywords."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)
    q, k, v = normal(batch, time, H, K), normal(batch, time, H, K), normal(batch, time, H, V)
    S0 = normal(batch, H, K, V)
    decay = spec.get("decay")
    log_decay = None
    if decay == "scalar":
        log_decay = _log_sigmoid(normal(batch, time, H) + 2.0)          # decays 0.5 .. 0.98
    elif decay == "per_key":
        log_decay = _log_sigmoid(normal(batch, time, H, K) + 2.0)
    elif decay == "complex":                                             # GateLoop: |a| < 1 and a phase
        log_decay = _log_sigmoid(normal(batch, time, H, K) + 2.0) + 1j * normal(batch, time, H, K)
        q, k = q + 1j * normal(batch, time, H, K), k + 1j * normal(batch, time, H, K)
        S0 = S0 + 1j * normal(batch, H, K, V)
    elif decay == "sigmoid":                                             # xLSTM's log σ(f)
        log_decay = _log_sigmoid(normal(batch, time, H) + 1.0)
    elif decay == "exp":                                                 # exponential forget gate: log f = f
        log_decay = 0.3 * normal(batch, time, H)
    log_input_gate = normal(batch, time, H) if spec.get("input_gate") else None
    normalizer = spec.get("normalizer")
    if normalizer == "sum":         # positive features keep nᵀq away from 0
        q, k = np.exp(0.5 * q), np.exp(0.5 * k)
        initial = MatrixState(S0, np.exp(normal(batch, H, K)), None)
    elif normalizer == "max_abs":
        initial = MatrixState(S0, normal(batch, H, K), 0.5 * normal(batch, H) if log_input_gate is not None
                              else None)
    else:
        initial = S0
    inputs = {"q": q, "k": k, "v": v, "log_decay": log_decay, "log_input_gate": log_input_gate,
              "initial_state": initial}
    return inputs, {"normalizer": normalizer, "exclusive": bool(spec.get("exclusive", False))}


def _as_jax(tree, real_dtype=None):
    """numpy leaves -> jax arrays (float64 under x64, or cast to ``real_dtype`` / its complex kind)."""
    def cast(x):
        if real_dtype is None:
            return jnp.asarray(x)
        dtype = jnp.complex64 if np.iscomplexobj(x) else real_dtype
        return jnp.asarray(x, dtype)

    return jax.tree.map(cast, tree)


def _call(fn, inputs, **kwargs):
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"],
              log_input_gate=inputs["log_input_gate"], initial_state=inputs["initial_state"], **kwargs)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)

    def draw(x):
        w = rng.standard_normal(np.shape(x))
        return w + 1j * rng.standard_normal(np.shape(x)) if np.iscomplexobj(x) else w

    return jax.tree.map(draw, tree)


def _loss(fn, **kwargs):
    """A random linear read-out of o and of every part of the final state (so every output gets a
    cotangent); ``consts`` carries the read-out weights and the reset flags."""
    def loss(inputs, consts):
        out = _call(fn, inputs, reset=consts["reset"], **kwargs)
        parts = zip(jax.tree.leaves(out), jax.tree.leaves(consts["weights"]), strict=True)
        return sum(jnp.real(jnp.sum(x * w)) for x, w in parts), out

    return loss


@functools.cache
def _modes_fn(normalizer, exclusive, reverse, plan):
    """One jitted function running the mode variants (one compile for all): per variant (out, grads),
    (out, None) or None, as ``plan`` asks."""
    def run(inputs, consts):
        results = []
        for (mode, chunk), what in zip(MODE_VARIANTS, plan, strict=True):
            loss = _loss(matrix.apply, normalizer=normalizer, exclusive=exclusive, reverse=reverse, mode=mode,
                         chunk_size=chunk)
            if what == "grads":
                (_, out), g = jax.value_and_grad(loss, has_aux=True)(inputs, consts)
                results.append((out, g))
            elif what == "values":
                results.append((loss(inputs, consts)[1], None))
            else:
                results.append(None)
        return results

    return jax.jit(run)


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _static(case):
    return {"normalizer": CASES[case].get("normalizer"), "exclusive": CASES[case].get("exclusive", False)}


# The default run checks the gradients of the sequential mode and of the padded chunked mode (chunks of
# 5 in T = 12) in every case, and the values of the other two variants (the same chunked code with
# no padding) in these cases; ``-m slow`` checks the gradients of every variant in every case.
EVERY_VARIANT_BY_DEFAULT = {("per_key_decay", False), ("exclusive", False), ("mlstm_sigmoid_forget", False),
                            ("mlstm_exp_forget", False), ("mlstm_sigmoid_forget", True)}


def _default_plan(case, reverse):
    if (case, reverse) in EVERY_VARIANT_BY_DEFAULT:
        return ("grads", "grads", "values", "values")
    return ("grads", "grads", None, None)


@functools.cache
def _float64_results(case, reverse, plan=None):
    """(inputs, reference (out, grads), [per mode variant (out, grads), (out, None) or None]) for
    CASES[case] with an initial state and the reset flags, in float64; cached because several tests
    read them. ``plan`` defaults to ``_default_plan``."""
    plan = _default_plan(case, reverse) if plan is None else plan
    with jax.enable_x64(True):
        inputs, static = _case_inputs(CASES[case], seed=1)
        inputs = _as_jax(inputs)
        reset = _reset()
        out = _call(matrix.reference, inputs, reset=reset, reverse=reverse, **static)
        consts = {"weights": _as_jax(_random_like(_to_numpy(out), seed=2)), "reset": jnp.asarray(reset)}
        loss = _loss(matrix.reference, reverse=reverse, **static)
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(inputs, consts)
        want = _to_numpy((out, grads))
        modes = _modes_fn(static["normalizer"], static["exclusive"], reverse, plan)
        got = _to_numpy(modes(inputs, consts))
        return _to_numpy(inputs), want, got


def _assert_close(got, want, rtol, what=""):
    """Elementwise within rtol, and within rtol of the largest magnitude of ``want``."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def _assert_trees_close(got, want, rtol, what=""):
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert got_def == want_def, f"{what}: structure {got_def} != {want_def}"
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        _assert_close(g, w, rtol, f"{what}{jax.tree_util.keystr(path)}")


# --------------------------------------------------------------------------------------------
# Independent float64 loops, written from the equations.


def _numpy_loop(q, k, v, log_decay, *, S0, n0=None, reset=None, reverse=False, exclusive=False,
                sum_eps=None):
    """S_t = Diag(exp g_t) S_{t-1} + k_t v_tᵀ and o_t = Sᵀ (s q_t), S = S_t (or S_{t-1} if exclusive);
    with ``sum_eps`` also n_t = Diag(exp g_t) n_{t-1} + k_t and o_t / (nᵀ (s q_t) + eps). Running
    backwards, the state carried from t + 1 into t is dropped when t + 1 starts a segment."""
    batch, time, heads, dk = q.shape
    g = np.zeros((batch, time, heads, 1)) if log_decay is None else log_decay
    g = g[..., None] if g.ndim == 3 else g
    S = np.array(S0, dtype=np.result_type(q, k, v, g, S0))
    n = np.zeros((batch, heads, dk), S.dtype) if n0 is None else np.array(n0, S.dtype)
    o = np.zeros(v.shape, S.dtype)
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        if reset is not None:
            if reverse:
                drop = reset[:, t + 1] if t + 1 < time else np.zeros(batch, bool)
            else:
                drop = reset[:, t]
            S[drop], n[drop] = 0, 0
        S_read, n_read = S, n
        alpha = np.exp(g[:, t])                                                    # [B, H, K or 1]
        S = alpha[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        n = alpha * n + k[:, t]
        if not exclusive:
            S_read, n_read = S, n
        sq = SCALE * q[:, t]
        o[:, t] = np.einsum("bhk,bhkv->bhv", sq, S_read)
        if sum_eps is not None:
            o[:, t] /= np.einsum("bhk,bhk->bh", sq, n_read)[..., None] + sum_eps
    return o, S, n


def _numpy_mlstm_unstabilised(q, k, v, log_f, log_i, *, C0, n0, m0, reset=None, eps=EPS):
    """xLSTM's mLSTM with the true (unscaled) C and n: C_t = f C + exp(ĩ) k vᵀ, n_t = f n + exp(ĩ) k,
    m_t = max(log f + m_{t-1}, ĩ) kept only for the eps term, h = Cᵀq / (max(|nᵀq|, 1) + eps·exp(m)).
    The initial state (C̃0, ñ0, m0) is the scaled one: C = exp(m0) C̃0. A reset restarts from C = n = 0,
    m = 0. Returns h and the final (C, n, m)."""
    C = np.exp(m0)[..., None, None] * C0
    n = np.exp(m0)[..., None] * n0
    m = np.array(m0, np.float64)
    h = np.zeros(v.shape)
    for t in range(q.shape[1]):
        if reset is not None:
            C[reset[:, t]], n[reset[:, t]], m[reset[:, t]] = 0, 0, 0
        f, i = np.exp(log_f[:, t]), np.exp(log_i[:, t])                          # [B, H]
        C = f[..., None, None] * C + i[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f[..., None] * n + i[..., None] * k[:, t]
        m = np.maximum(log_f[:, t] + m, log_i[:, t])
        sq = SCALE * q[:, t]
        den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", sq, n)), 1.0) + eps * np.exp(m)
        h[:, t] = np.einsum("bhk,bhkv->bhv", sq, C) / den[..., None]
    return h, (C, n, m)


def _numpy_mlstm_stabilised(q, k, v, log_f, log_i, *, eps=EPS):
    """The same cell as the xLSTM paper writes it for computation (from a zero state, m0 = 0):
    m_t = max(log f_t + m_{t-1}, ĩ_t), i' = exp(ĩ - m_t), f' = exp(log f + m_{t-1} - m_t),
    C̃_t = f' C̃ + i' k vᵀ, ñ_t = f' ñ + i' k, h = C̃ᵀq / (max(|ñᵀq|, exp(-m_t)) + eps)."""
    batch, time, heads, dk = q.shape
    C, n = np.zeros((batch, heads, dk, v.shape[-1])), np.zeros((batch, heads, dk))
    m = np.zeros((batch, heads))
    h = np.zeros(v.shape)
    for t in range(time):
        m_new = np.maximum(log_f[:, t] + m, log_i[:, t])
        f, i = np.exp(log_f[:, t] + m - m_new), np.exp(log_i[:, t] - m_new)
        C = f[..., None, None] * C + i[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f[..., None] * n + i[..., None] * k[:, t]
        m = m_new
        sq = SCALE * q[:, t]
        den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", sq, n)), np.exp(-m)) + eps
        h[:, t] = np.einsum("bhk,bhkv->bhv", sq, C) / den[..., None]
    return h, (C, n, m)


def test_reference_matches_numpy_loop_per_key_decay_sum_normalizer_with_reset():
    with jax.enable_x64(True):
        inputs, static = _case_inputs({"decay": "per_key", "normalizer": "sum"}, seed=3)
        reset = _reset()
        o, state = _call(matrix.reference, _as_jax(inputs), reset=reset, eps=1e-3, **static)
    S0, n0, _ = inputs["initial_state"]
    want_o, want_S, want_n = _numpy_loop(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"], S0=S0,
                                         n0=n0, reset=reset, sum_eps=1e-3)
    _assert_trees_close((o, state.S, state.n), (want_o, want_S, want_n), rtol=1e-12)
    assert state.m is None


def test_reference_matches_numpy_loop_exclusive_readout_reversed_with_reset():
    with jax.enable_x64(True):
        inputs, static = _case_inputs(CASES["exclusive"], seed=4)
        reset = _reset()
        o, S = _call(matrix.reference, _as_jax(inputs), reset=reset, reverse=True, **static)
    want_o, want_S, _ = _numpy_loop(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"],
                                    S0=inputs["initial_state"], reset=reset, reverse=True, exclusive=True)
    _assert_trees_close((o, S), (want_o, want_S), rtol=1e-12)


def test_reference_stabilised_mlstm_matches_the_unstabilised_cell():
    """The max-stabiliser only rescales: h = C q / (max(|n q|, 1) + eps exp(m)) with the true C, n, and
    the returned state is (C exp(-m), n exp(-m), m). eps = 1e-2 makes the eps·exp(m) term visible."""
    with jax.enable_x64(True):
        inputs, static = _case_inputs(CASES["mlstm_sigmoid_forget"], seed=5)
        inputs["log_input_gate"] = 0.5 * inputs["log_input_gate"]   # small gates: exp(ĩ) needs no rescue
        reset = _reset()
        o, state = _call(matrix.reference, _as_jax(inputs), reset=reset, eps=1e-2, **static)
    C0, n0, m0 = inputs["initial_state"]
    want_h, (C, n, m) = _numpy_mlstm_unstabilised(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"],
                                                  inputs["log_input_gate"], C0=C0, n0=n0, m0=m0, reset=reset,
                                                  eps=1e-2)
    scaled = np.exp(-m)
    _assert_trees_close((o, state.S, state.n, state.m),
                        (want_h, C * scaled[..., None, None], n * scaled[..., None], m), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Every mode against the float64 reference, values and gradients.


def _check_modes_against_reference(case, reverse, plan=None):
    inputs, (want_out, want_grads), got = _float64_results(case, reverse, plan)
    given = {name for name, x in inputs.items() if x is not None}
    assert {name for name, x in want_grads.items() if x is not None} == given
    for mode_id, result in zip(MODE_IDS, got, strict=True):
        if result is None:
            continue
        out, grads = result
        _assert_trees_close(out, want_out, rtol=1e-10, what=f"{mode_id} output ")
        if grads is not None:
            _assert_trees_close(grads, want_grads, rtol=1e-10, what=f"{mode_id} d/d")


DEFAULT_GRID = [(case, False) for case in CASES] + [("mlstm_sigmoid_forget", True)]


def _grid_id(case_reverse):
    case, reverse = case_reverse
    return f"{case}-{'reverse' if reverse else 'forward'}"


@pytest.mark.parametrize("case_reverse", DEFAULT_GRID, ids=_grid_id)
def test_every_mode_matches_float64_reference_values_and_gradients(case_reverse):
    """Values and gradients (w.r.t. every input) of the sequential and the padded chunked variant, and
    of the others as ``_default_plan`` says. Initial state and resets in every case."""
    _check_modes_against_reference(*case_reverse)


@pytest.mark.slow
@pytest.mark.parametrize("case_reverse", [(c, r) for r in (False, True) for c in CASES], ids=_grid_id)
def test_every_mode_matches_float64_reference_gradients_in_both_directions(case_reverse):
    _check_modes_against_reference(*case_reverse, ALL_GRADS)


def _segments(reset_row, reverse):
    """[(lo, hi, gets_initial_state)] of one row: segments start at the flags; forwards the first
    segment starts from the initial state unless flagged at t = 0, backwards the last one does."""
    time = len(reset_row)
    starts = sorted({0, *np.flatnonzero(reset_row).tolist()})
    bounds = list(zip(starts, [*starts[1:], time], strict=True))
    return [(lo, hi, (hi == time) if reverse else (lo == 0 and not reset_row[0])) for lo, hi in bounds]


SEGMENT_GRID = [("per_key_decay", False), ("exclusive", False), ("sum_normalizer", False),
                ("mlstm_sigmoid_forget", False), ("mlstm_sigmoid_forget", True)]


@pytest.mark.parametrize("case_reverse", SEGMENT_GRID, ids=_grid_id)
def test_reset_equals_running_each_segment_separately(case_reverse):
    """Each segment run alone (the reference, no reset) from the initial state or a fresh one (S = 0,
    n = 0, m = 0) gives the same outputs as every mode run over the packed rows with ``reset``; the
    final state is the one of the segment that ends the run."""
    case, reverse = case_reverse
    inputs, _, got = _float64_results(case, reverse)
    reset = _reset()
    with jax.enable_x64(True):
        for b in range(B):
            row = jax.tree.map(lambda x, b=b: x[b:b + 1], inputs)
            pieces = []
            for lo, hi, from_initial in _segments(reset[b], reverse):
                piece = {name: None if x is None or name == "initial_state" else x[:, lo:hi]
                         for name, x in row.items()}
                piece["initial_state"] = row["initial_state"] if from_initial else None
                o, state = _call(matrix.reference, _as_jax(piece), reverse=reverse, **_static(case))
                pieces.append((lo, hi, _to_numpy(o), _to_numpy(state)))
            final = pieces[0][3] if reverse else pieces[-1][3]
            for mode_id, result in zip(MODE_IDS, got, strict=True):
                if result is None:
                    continue
                (o_mode, state_mode), _ = result
                for lo, hi, o, _ in pieces:
                    _assert_close(o_mode[b:b + 1, lo:hi], o, 1e-10, f"{mode_id} row {b} steps {lo}:{hi}")
                _assert_trees_close(jax.tree.map(lambda x, b=b: x[b:b + 1], state_mode), final, 1e-10,
                                    f"{mode_id} row {b} final state ")


# --------------------------------------------------------------------------------------------
# float32, bfloat16.


def _run_float32_modes(case, inputs):
    """Every mode variant, values only; the weights are unused (no gradients) but the read-out needs a
    tree of the output's structure."""
    static = _static(case)
    fn = _modes_fn(static["normalizer"], static["exclusive"], False, ALL_VALUES)
    _, (want, _), _ = _float64_results(case, False)
    consts = {"weights": _as_jax(_random_like(want, 0), jnp.float32), "reset": jnp.asarray(_reset())}
    return [out for out, _ in fn(inputs, consts)]


@pytest.mark.parametrize("case", ["per_key_decay", "mlstm_exp_forget"])
def test_float32_modes_are_within_1e5_of_the_float64_reference(case):
    inputs64, (want, _), _ = _float64_results(case, False)
    outs = _run_float32_modes(case, _as_jax(inputs64, jnp.float32))
    for mode_id, out in zip(MODE_IDS, outs, strict=True):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out)), mode_id
        _assert_trees_close(_to_numpy(out), want, rtol=1e-5, what=f"{mode_id} ")


@pytest.mark.parametrize("case", ["mlstm_exp_forget"])
def test_bfloat16_inputs_are_within_a_percent_of_float32_and_the_state_is_float32(case):
    inputs64, _, _ = _float64_results(case, False)
    outs32 = _run_float32_modes(case, _as_jax(inputs64, jnp.float32))
    inputs16 = _as_jax(inputs64, jnp.bfloat16)
    inputs16["initial_state"] = _as_jax(inputs64["initial_state"], jnp.float32)   # states are float32
    outs16 = _run_float32_modes(case, inputs16)
    for mode_id, (o32, s32), (o16, s16) in zip(MODE_IDS, outs32, outs16, strict=True):
        assert o16.dtype == jnp.bfloat16, mode_id
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16)), mode_id
        _assert_close(np.asarray(o16, np.float32), o32, 1e-2, f"{mode_id} output")
        _assert_trees_close(_to_numpy(s16), _to_numpy(s32), 1e-2, f"{mode_id} state ")


# --------------------------------------------------------------------------------------------
# Long sequences, gates near 0 and huge gates (float32, T = 2048).

LONG = 2048


@functools.cache
def _long_fn(mode, stabilised, chunk_size=None):
    """jit(value_and_grad) of a read-out of o and the final state (T = LONG, float32)."""
    def loss(inputs, weights):
        out = matrix.apply(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"],
                           log_input_gate=inputs.get("log_input_gate"),
                           initial_state=inputs.get("initial_state"),
                           normalizer="max_abs" if stabilised else None, mode=mode, chunk_size=chunk_size)
        parts = zip(jax.tree.leaves(out), jax.tree.leaves(weights), strict=True)
        return sum(jnp.sum(x * w) for x, w in parts), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mode", ["sequential", "chunked"])
@pytest.mark.parametrize("decay_shape", ["scalar", "per_key"])
def test_gates_near_zero_forget_exactly_over_long_sequences(decay_shape, mode):
    """Log decays of -30, -1e4 and exactly -inf (a hard forget: exp(-inf) = 0 multiplies the state),
    mixed at random over T = 2048 steps: every earlier contribution is below float32 resolution
    (e^-30 ≈ 1e-13), so o_t = s (q_t·k_t) v_t and the final state is k_T v_Tᵀ: closed forms for
    the outputs and for every gradient (d/dg = 0 up to e^-30, the initial state is forgotten)."""
    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((2, B, LONG, H, K))
    v = rng.standard_normal((B, LONG, H, V))
    gate_shape = (B, LONG, H) if decay_shape == "scalar" else (B, LONG, H, K)
    g = rng.choice(np.array([-30.0, -1e4, -np.inf]), size=gate_shape)
    S0 = rng.standard_normal((B, H, K, V))
    w_o, w_S = rng.standard_normal((B, LONG, H, V)), rng.standard_normal((B, H, K, V))
    inputs = _as_jax({"q": q, "k": k, "v": v, "log_decay": g, "initial_state": S0}, jnp.float32)
    # 256 chunks of 8 for a decay per key (its default 16 doubles the compile time), 32 of 64 for scalar.
    chunk = 8 if mode == "chunked" and decay_shape == "per_key" else None
    (_, (o, S)), grads = _long_fn(mode, False, chunk)(inputs, _as_jax((w_o, w_S), jnp.float32))

    qk = SCALE * np.einsum("bthk,bthk->bth", q, k)
    vw = np.einsum("bthv,bthv->bth", v, w_o)
    want = {"o": qk[..., None] * v, "S": k[:, -1, :, :, None] * v[:, -1, :, None, :],
            "q": SCALE * k * vw[..., None], "k": SCALE * q * vw[..., None], "v": qk[..., None] * w_o}
    want["k"][:, -1] += np.einsum("bhkv,bhv->bhk", w_S, v[:, -1])
    want["v"][:, -1] += np.einsum("bhkv,bhk->bhv", w_S, k[:, -1])
    assert _finite((o, S, grads))
    for name, got in (("o", o), ("S", S), ("q", grads["q"]), ("k", grads["k"]), ("v", grads["v"])):
        _assert_close(got, want[name], 1e-5, name)
    scale = float(np.max(np.abs(want["q"])))
    np.testing.assert_allclose(grads["log_decay"], 0.0, atol=1e-6 * scale)
    np.testing.assert_allclose(grads["initial_state"], 0.0, atol=1e-6 * scale)


def _mlstm_inputs(seed, log_i, log_f):
    """Positive q and k, so that nᵀq has no cancellation: the comparisons then measure the stabiliser,
    not the conditioning of h = Cᵀq / nᵀq (which, with random-sign features, amplifies float32
    rounding by 1e3 where nᵀq passes near 0)."""
    rng = np.random.default_rng(seed)
    q, k = np.exp(0.5 * rng.standard_normal((2, B, LONG, H, K)))
    v = rng.standard_normal((B, LONG, H, V))
    weights = (rng.standard_normal((B, LONG, H, V)), MatrixState(*(rng.standard_normal(s) for s in
                                                                   ((B, H, K, V), (B, H, K), (B, H)))))
    return {"q": q, "k": k, "v": v, "log_decay": log_f, "log_input_gate": log_i}, weights


@pytest.mark.parametrize("mode", ["sequential", "chunked"])
def test_mlstm_with_input_gates_whose_exp_overflows_float32(mode):
    """ĩ in [80, 100] (exp(ĩ) up to 2.7e43, float32 ends at 3.4e38) over T = 2048 in float32: finite
    outputs, final state and gradients, equal to the unstabilised cell in float64 (where exp(100) is
    an ordinary number): h = C q / (max(|n q|, 1) + eps exp(m)), state (C e^-m, n e^-m, m)."""
    rng = np.random.default_rng(7)
    log_i = rng.uniform(80.0, 100.0, (B, LONG, H))
    log_f = _log_sigmoid(rng.standard_normal((B, LONG, H)) + 3.0)
    inputs, weights = _mlstm_inputs(8, log_i, log_f)
    args = (_as_jax(inputs, jnp.float32), _as_jax(weights, jnp.float32))
    (_, (o, state)), grads = _long_fn(mode, True)(*args)
    assert _finite((o, state, grads))
    f64 = {name: np.asarray(np.asarray(x, np.float32), np.float64) for name, x in inputs.items()}
    zeros = np.zeros((B, H))
    want_h, (C, n, m) = _numpy_mlstm_unstabilised(f64["q"], f64["k"], f64["v"], f64["log_decay"],
                                                  f64["log_input_gate"], C0=np.zeros((B, H, K, V)),
                                                  n0=np.zeros((B, H, K)), m0=zeros)
    _assert_close(o, want_h, 1e-5, "h")
    _assert_close(state.m, m, 1e-6, "m")
    _assert_close(state.S, C * np.exp(-m)[..., None, None], 1e-5, "C")
    _assert_close(state.n, n * np.exp(-m)[..., None], 1e-5, "n")
    if mode == "chunked":
        _, seq_grads = _long_fn("sequential", True)(*args)
        _assert_trees_close(_to_numpy(grads), _to_numpy(seq_grads), 1e-4, "d/d")


@pytest.mark.parametrize("mode", ["sequential", "chunked"])
def test_mlstm_exponential_forget_gate_above_one_over_long_sequences(mode):
    """log f ≈ +0.5 per step (an exponential forget gate that amplifies): the true state grows like
    e^1000 over T = 2048, beyond float64; the stabilised state stays finite and equals the paper's
    stabilised cell computed in float64 here. Gradients finite, and equal in both modes.

    The state (C̃, ñ) is exp(-m) times the true one with m ≈ 1000, where a float32 m is only good to
    its spacing (6e-5): a different rounding of m (the chunked form sums a chunk's log gates before
    adding them to m) rescales C̃ and ñ together by up to that much, which h = C̃q / ñq cancels. So
    h is held to 1e-5 and C̃, ñ to 1e-5 plus twice the spacing of m."""
    rng = np.random.default_rng(9)
    log_f = 0.5 + 0.1 * rng.standard_normal((B, LONG, H))
    log_i = rng.standard_normal((B, LONG, H))
    inputs, weights = _mlstm_inputs(10, log_i, log_f)
    args = (_as_jax(inputs, jnp.float32), _as_jax(weights, jnp.float32))
    (_, (o, state)), grads = _long_fn(mode, True)(*args)
    assert _finite((o, state, grads))
    f64 = {name: np.asarray(np.asarray(x, np.float32), np.float64) for name, x in inputs.items()}
    want_h, (C, n, m) = _numpy_mlstm_stabilised(f64["q"], f64["k"], f64["v"], f64["log_decay"],
                                                f64["log_input_gate"])
    assert float(np.min(m)) > 900.0
    _assert_close(o, want_h, 1e-5, "h")
    _assert_close(state.m, m, 1e-6, "m")
    state_rtol = 1e-5 + 2 * float(np.spacing(np.float32(np.max(m))))
    _assert_close(state.S, C, state_rtol, "C")
    _assert_close(state.n, n, state_rtol, "n")
    if mode == "chunked":
        _, seq_grads = _long_fn("sequential", True)(*args)
        _assert_trees_close(_to_numpy(grads), _to_numpy(seq_grads), 1e-4, "d/d")


@pytest.mark.parametrize("mode", ["chunked", "parallel"])
def test_mlstm_hard_forget_gate_minus_inf_matches_the_sequential_mode(mode):
    """A forget gate exp(-inf) = 0 (``forget_gate="exp"`` with f = -inf: forget everything) is handled
    by the non-stabilised engine in every mode and by the stabilised sequential mode; the stabilised
    chunked form must give the same finite result."""
    rng = np.random.default_rng(11)
    log_f = np.where(rng.random((B, T, H)) < 0.3, -np.inf, _log_sigmoid(rng.standard_normal((B, T, H)) + 2))
    inputs = {"q": rng.standard_normal((B, T, H, K)), "k": rng.standard_normal((B, T, H, K)),
              "v": rng.standard_normal((B, T, H, V)), "log_decay": log_f,
              "log_input_gate": rng.standard_normal((B, T, H))}
    inputs = _as_jax(inputs, jnp.float32)
    run = lambda m: _call(matrix.apply, dict(inputs, initial_state=None), normalizer="max_abs", mode=m)
    want = _to_numpy(run("sequential"))
    assert _finite(want)
    _assert_trees_close(_to_numpy(run(mode)), want, 1e-5, f"{mode} ")


# --------------------------------------------------------------------------------------------
# step, jit, vmap.


@pytest.mark.parametrize("case", list(CASES))
def test_step_folded_over_time_equals_apply(case):
    """The one-token ``step`` folded over T (a reset emulated by passing a fresh zero state, m = 0)
    equals ``apply`` (chunked, the default mode) with ``reset``, forward, in float64."""
    inputs, _, got = _float64_results(case, False)
    want = got[MODE_IDS.index("chunked5")][0]
    static = _static(case)
    reset = _reset()
    with jax.enable_x64(True):
        state = _as_jax(inputs["initial_state"])
        fresh = jax.tree.map(jnp.zeros_like, state)
        outs = []
        for t in range(T):
            state = jax.tree.map(lambda f, s, t=t: jnp.where(
                jnp.reshape(reset[:, t], (B,) + (1,) * (s.ndim - 1)), f, s), fresh, state)
            at_t = lambda x, t=t: None if x is None else jnp.asarray(x[:, t])
            state, o_t = matrix.step(state, at_t(inputs["q"]), at_t(inputs["k"]), at_t(inputs["v"]),
                                     at_t(inputs["log_decay"]),
                                     log_input_gate_t=at_t(inputs["log_input_gate"]), **static)
            outs.append(o_t)
        got = (jnp.stack(outs, axis=1), state)
    _assert_trees_close(_to_numpy(got), want, 1e-10)


def test_jit_and_vmap_over_an_extra_leading_axis():
    inputs64, _, _ = _float64_results("scalar_decay", False)
    inputs = _as_jax(inputs64, jnp.float32)
    reset = _reset()
    kwargs = {"mode": "chunked", "chunk_size": 5}
    eager = _call(matrix.apply, inputs, reset=reset, **kwargs)
    jitted = jax.jit(lambda x: _call(matrix.apply, x, reset=reset, **kwargs))(inputs)
    _assert_trees_close(_to_numpy(jitted), _to_numpy(eager), 1e-6)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), inputs)
    resets = jnp.stack([reset, ~reset])
    vmapped = jax.vmap(lambda x, r: _call(matrix.apply, x, reset=r, **kwargs))(stacked, resets)
    for e in range(2):
        one = _call(matrix.apply, jax.tree.map(lambda x, e=e: x[e], stacked), reset=resets[e], **kwargs)
        _assert_trees_close(_to_numpy(jax.tree.map(lambda x, e=e: x[e], vmapped)), _to_numpy(one), 1e-5,
                            f"element {e} ")


# --------------------------------------------------------------------------------------------
# Malformed input.


def test_malformed_inputs_raise_errors_naming_the_argument_and_shapes():
    rng = np.random.default_rng(12)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = f32(B, T, H, K), f32(B, T, H, K), f32(B, T, H, V)
    g, g_key, i = f32(B, T, H), f32(B, T, H, K), f32(B, T, H)
    S0 = f32(B, H, K, V)
    apply = matrix.apply
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, K\], got \(2, 12, 2\)"):
        apply(q[..., 0], k[..., 0], v)
    with pytest.raises(ValueError, match=r"k must have shape .*\(2, 12, 2, 3\), got \(2, 12, 2, 2\)"):
        apply(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"k must have shape .*got \(2, 12, 1, 3\)"):
        apply(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match=r"v must have shape .*got \(2, 11, 2, 4\)"):
        apply(q, k, v[:, :11])
    with pytest.raises(ValueError, match=r"v must have shape .*got \(2, 12, 1, 4\)"):
        apply(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match=r"v must have shape .*got \(2, 12, 2\)"):
        apply(q, k, v[..., 0])
    with pytest.raises(ValueError, match=r"T = 0"):
        apply(q[:, :0], k[:, :0], v[:, :0])
    for bad in (g[..., 0], g_key[..., :2], f32(B, T, 1), f32(B, T, H, K, 1)):
        with pytest.raises(ValueError, match=r"log_decay must have shape .*\(2, 12, 2\).*\(2, 12, 2, 3\)"):
            apply(q, k, v, bad)
    with pytest.raises(ValueError, match="q has dtype int32"):
        apply(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match="log_decay has dtype int32"):
        apply(q, k, v, g.astype(jnp.int32))
    with pytest.raises(ValueError, match="log_input_gate has dtype complex64"):
        apply(q, k, v, g, log_input_gate=i.astype(jnp.complex64), normalizer="max_abs")
    with pytest.raises(TypeError, match="q must be an array"):
        apply(np.zeros((B, T, H, K)).tolist(), k, v)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            apply(q, k, v, g, chunk_size=bad)
    for mode in ("sequential", "parallel"):
        with pytest.raises(ValueError, match=f"chunk_size=4 is given but mode='{mode}' has no chunks"):
            apply(q, k, v, g, mode=mode, chunk_size=4)
    with pytest.raises(ValueError, match="mode='fast' is not supported"):
        apply(q, k, v, g, mode="fast")
    with pytest.raises(ValueError, match="normalizer='l2' is not one of"):
        apply(q, k, v, g, normalizer="l2")
    with pytest.raises(ValueError, match=r"log_input_gate needs one decay per head.*\(2, 12, 2, 3\)"):
        apply(q, k, v, g_key, log_input_gate=i, normalizer="max_abs")
    with pytest.raises(ValueError, match=r"log_input_gate must have shape .*\(2, 12, 2\), got \(2, 12\)"):
        apply(q, k, v, g, log_input_gate=i[..., 0], normalizer="max_abs")
    with pytest.raises(ValueError, match="exclusive=True .* not offered with log_input_gate"):
        apply(q, k, v, g, log_input_gate=i, normalizer="max_abs", exclusive=True)
    with pytest.raises(ValueError, match="works with real inputs only"):
        apply(q.astype(jnp.complex64), k, v, g, log_input_gate=i, normalizer="max_abs")
    with pytest.raises(ValueError, match=r"initial_state S must .*\(2, 2, 3, 4\), got \(2, 2, 4, 3\)"):
        apply(q, k, v, g, initial_state=jnp.swapaxes(S0, -1, -2))
    with pytest.raises(ValueError, match=r"initial_state S must have shape .*got \(2, 3, 4\)"):
        apply(q, k, v, g, initial_state=MatrixState(S0[:, 0]), normalizer="sum")
    with pytest.raises(TypeError, match="initial_state must be an array .* or a MatrixState, got a tuple"):
        apply(q, k, v, g, initial_state=(S0, None, None), normalizer="sum")
    with pytest.raises(ValueError, match=r"initial_state.n must have shape .*\(2, 2, 3\), got \(2, 2, 4\)"):
        apply(q, k, v, g, initial_state=MatrixState(S0, f32(B, H, V)), normalizer="sum")
    with pytest.raises(ValueError, match="initial_state.n is given but normalizer=None"):
        apply(q, k, v, g, initial_state=MatrixState(S0, f32(B, H, K)))
    with pytest.raises(ValueError, match=r"initial_state.m must have shape .*\(2, 2\), got \(2, 2, 1\)"):
        apply(q, k, v, g, log_input_gate=i, normalizer="max_abs", initial_state=MatrixState(S0, None,
                                                                                             f32(B, H, 1)))
    with pytest.raises(ValueError, match="initial_state.m is given but there is no log_input_gate"):
        apply(q, k, v, g, normalizer="max_abs", initial_state=MatrixState(S0, None, f32(B, H)))
    with pytest.raises(ValueError, match=r"reset must have shape .*\(2, 12\), got \(2, 11\)"):
        apply(q, k, v, g, reset=np.zeros((B, T - 1), bool))
    with pytest.raises(ValueError, match=r"matrix.reference: k must have shape"):
        matrix.reference(q, k[..., :2], v)
    # step: no time axis
    with pytest.raises(ValueError, match=r"matrix.step: q must have shape \[B, H, K\], got \(2, 12, 2, 3\)"):
        matrix.step(S0, q, k, v)
    with pytest.raises(ValueError, match=r"matrix.step: initial_state S must have shape"):
        matrix.step(S0[..., :2], q[:, 0], k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="matrix.step: exclusive=True is not offered"):
        matrix.step(None, q[:, 0], k[:, 0], v[:, 0], g[:, 0], log_input_gate_t=i[:, 0], normalizer="max_abs",
                    exclusive=True)
