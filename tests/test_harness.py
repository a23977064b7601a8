"""The conformance harness: every registered model, and a few combinators, pass every contract.

One set of tests, parametrised over ``zoo.list_models()`` (a new model file joins by existing) and
over a short list of combinator factories. The contracts are DESIGN.md's "Contracts that every
registered model passes":

1. folding ``step`` over time equals ``apply`` in every mode: outputs, final state and gradients
   with respect to params, inputs and the initial state;
2. ``apply`` on two consecutive pieces, carrying the state, equals ``apply`` on the whole;
3. ``reset`` equals running the segments separately, forwards and with ``reverse=True``;
4. ``jit``, ``vmap`` over an extra leading axis, bfloat16 compute with float32 state, T = 1;
5. malformed input raises ValueError/TypeError naming the argument, before any tracing error.

The reference for 1 and 3 is a Python loop of ``step`` in which a reset replaces the carried state
by ``initial_state``: exactly what running each segment on its own computes. Data are random, and
initial states are random and non-zero (``initial_state`` plus uniform(0.1, 0.5), positive so that
normalisers stay positive). B = 2 and T = 9 (odd, so chunked modes must pad).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

# Compiling dominates these small-shape tests: XLA optimisation passes off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN, T_SPLIT = 2, 9, 7, 4
# Row 0 has one segment boundary; row 1 discards the given state at t = 0 and has a length-1 segment.
RESET = np.zeros((B, T), bool)
RESET[0, 4] = True
RESET[1, [0, 6, 7]] = True

# float32: 1e-5 relative to each array's scale. Sequential modes accumulate in the same order as the
# step loop; associative scans and chunked forms reorder the sums, which costs a few ulps per
# combine, still within 1e-5 at T = 9.
RTOL_F32 = 1e-5
# bfloat16 keeps 8 bits of mantissa (2^-8 = 4e-3 per rounding); the state stays float32, so the
# error does not compound over time beyond a few roundings per step.
RTOL_BF16 = 1e-2
# The delta rule's outputs at a random init are small differences of large terms (the erase term
# β k kᵀ S cancels most of what was written), and the per-head RMSNorm that follows rescales them to
# unit size, so bfloat16 rounding of q, k and v (0.4% each) shows up as 1.5-3% after the norm.
RTOL_BF16_BY_MODEL = {"deltanet": 3e-2, "gated_deltanet": 3e-2}


# --------------------------------------------------------------------------------------------
# What is tested: registered models and combinator factories.


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[bool], zoo.Recurrence]   # build(wide): wide=True gives another config
    info: zoo.ModelInfo | None = None           # registry entry (None for combinators)

    def __repr__(self):
        return self.id

    def modes(self) -> tuple[str, ...]:
        """Every mode of a registered model. A combinator only adds wiring, and its parts are tested
        in all their modes as registered models, so it runs in its first mode (and "auto")."""
        modes = self.build(False).modes
        return modes if self.info is not None else modes[:1]


def _wider_config(info: zoo.ModelInfo) -> dict:
    """Another config whose state has other shapes: every width field ``d_*`` doubled (or, when the
    config rejects that, d_model alone)."""
    defaults = info.defaults()
    doubled = {k: 2 * v for k, v in defaults.items()
               if k.startswith("d_") and isinstance(v, int) and not isinstance(v, bool)}
    try:
        info.make_config(**doubled)
        return doubled
    except (ValueError, TypeError):
        return {"d_model": 2 * defaults["d_model"]}


def _registered(name: str, info: zoo.ModelInfo) -> Case:
    def build(wide: bool) -> zoo.Recurrence:
        return zoo.get(name, **_wider_config(info)) if wide else zoo.get(name)

    return Case(name, build, info)


def _combinator_cases(models: dict) -> list[Case]:
    """A stack of two different models, a residual block, a bidirectional pair and a hybrid pattern."""
    preferred = [n for n in ("lstm", "lru", "gru", "mingru", "elman") if n in models]
    first = preferred[0]
    second = preferred[1] if len(preferred) > 1 else first

    def get(name, wide, scale=1):
        config = _wider_config(models[name]) if wide else models[name].defaults()
        return zoo.get(name, **{k: v // scale if k.startswith("d_") else v for k, v in config.items()})

    return [
        Case(f"stack({first},{second})", lambda wide: zoo.stack(get(first, wide), get(second, wide, 2))),
        Case(f"residual({second})", lambda wide: zoo.residual(get(second, wide, 2), mlp_ratio=2)),
        Case("bidirectional(elman)", lambda wide: zoo.bidirectional(get("elman", wide, 2))),
        Case(f"hybrid({first},{second})", lambda wide: zoo.hybrid(
            {"a": get(first, wide, 2), "b": get(second, wide, 2)}, "a,b,a", mlp_ratio=2)),
    ]


MODELS = zoo.list_models()
CASES = [_registered(name, info) for name, info in MODELS.items()] + _combinator_cases(MODELS)
CAUSAL_CASES = [c for c in CASES if c.build(False).causal]


def _mode_params(cases, with_auto=False, secondary_slow=False):
    """(case, mode) for every mode of every case. With ``secondary_slow``, the modes after a model's
    first are marked ``slow``: the default suite still folds ``step`` against every mode with
    gradients (test 1) and with resets (test 3, forwards), while the checks whose code path is the
    same in every mode of nearly every model (two pieces, reverse, bfloat16, T = 1) run in the first
    mode and in "auto", and in all modes under ``-m slow``. This keeps the default suite near its
    time budget as models are added; each engine's own tests cover its modes in full."""
    params = []
    for c in cases:
        for m in (("auto",) if with_auto else ()) + c.modes():
            secondary = secondary_slow and m != "auto" and m != c.modes()[0]
            params.append(pytest.param(c, m, id=f"{c.id}-{m}",
                                       marks=[pytest.mark.slow] if secondary else []))
    return params


def _reset_params(cases):
    """(case, mode, reverse): forwards in every mode, reverse in the first mode (all under -m slow)."""
    params = []
    for forward in _mode_params(cases):
        c, m = forward.values
        params.append(pytest.param(c, m, False, id=f"{c.id}-{m}-forward"))
    for reverse in _mode_params(cases, secondary_slow=True):
        c, m = reverse.values
        params.append(pytest.param(c, m, True, id=f"{c.id}-{m}-reverse", marks=reverse.marks))
    return params


# --------------------------------------------------------------------------------------------
# Set-up shared by the tests of one case (built once per case, jitted functions cached).


def _perturbed(state, key):
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    noisy = [s + jax.random.uniform(k, s.shape, jnp.float32, 0.1, 0.5)
             for s, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def _weighted_sum(ys, final, weights):
    """A scalar that depends on every output and every state entry (random weights)."""
    w_ys, w_state = weights
    total = jnp.sum(ys.astype(jnp.float32) * w_ys)
    pairs = zip(jax.tree.leaves(final), jax.tree.leaves(w_state), strict=True)
    return total + sum(jnp.sum(s * w) for s, w in pairs)


def _where_rows(flag, fresh, carried):
    return jnp.where(flag.reshape((-1,) + (1,) * (carried.ndim - 1)), fresh, carried)


def _fold_step(rec, params, xs, state, reset, reverse):
    """The reference: ``step`` over time; a reset swaps the carried state for ``initial_state``.

    A ``lax.scan`` of ``step`` (compiled once, not once per time step): forwards the flag used at t
    is ``reset[:, t]`` (a segment starts at t); backwards it is ``reset[:, t + 1]`` (the carry from
    t + 1 belongs to the next segment) and the last step never resets.
    """
    fresh = rec.initial_state(params, xs.shape[0])
    flags = jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1) if reverse else reset

    def body(state, inputs):
        x_t, flag = inputs
        state = jax.tree.map(functools.partial(_where_rows, flag), fresh, state)
        return rec.step(params, state, x_t)

    state, ys = jax.lax.scan(body, state, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(flags, 0, 1)),
                             reverse=reverse)
    return jnp.swapaxes(ys, 0, 1), state


class Setup:
    def __init__(self, case: Case):
        self.case = case
        self.rec = case.build(False)
        keys = jax.random.split(jax.random.key(zlib.crc32(case.id.encode())), 6)
        self.params = self.rec.init(keys[0], D_IN)
        self.xs = jax.random.normal(keys[1], (B, T, D_IN), jnp.float32)
        self.s0 = _perturbed(self.rec.initial_state(self.params, B), keys[2])
        self.reset = jnp.asarray(RESET)
        ys_shape = jax.eval_shape(lambda p, x: self.rec.apply(p, x)[0], self.params, self.xs)
        self.d_out = ys_shape.shape[-1]
        w_state = _perturbed(jax.tree.map(jnp.zeros_like, self.s0), keys[3])
        self.weights = (jax.random.normal(keys[4], ys_shape.shape, jnp.float32), w_state)
        self._jitted = {}

    def apply(self, xs, state=None, reset=None, mode="auto", reverse=False):
        """``rec.apply`` jitted once per setup (XLA caches each shape), so tests share compilations."""
        fn = self.jitted("apply", lambda: jax.jit(self.rec.apply, static_argnames=("mode", "reverse")))
        return fn(self.params, xs, state=state, reset=reset, mode=mode, reverse=reverse)

    def jitted(self, key, make):
        if key not in self._jitted:
            self._jitted[key] = make()
        return self._jitted[key]

    def apply_and_grads(self, mode, reverse=False, reset=None):
        """(loss, (ys, final)), (d params, d xs, d initial state) of apply, jitted once per variant."""
        rec = self.rec

        def make():
            def loss(params, xs, s0, reset, weights):
                ys, final = rec.apply(params, xs, state=s0, reset=reset, mode=mode, reverse=reverse)
                return _weighted_sum(ys, final, weights), (ys, final)

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

        fn = self.jitted(("apply", mode, reverse, reset is None), make)
        return fn(self.params, self.xs, self.s0, reset, self.weights)

    def fold_and_grads(self, reverse=False, reset=None):
        """The same for the step loop (reset None means no flags)."""
        rec = self.rec

        def make():
            def loss(params, xs, s0, reset, weights):
                ys, final = _fold_step(rec, params, xs, s0, reset, reverse)
                return _weighted_sum(ys, final, weights), (ys, final)

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

        fn = self.jitted(("fold", reverse), make)
        flags = jnp.zeros((B, T), bool) if reset is None else reset
        return fn(self.params, self.xs, self.s0, flags, self.weights)


@functools.cache
def setup(case: Case) -> Setup:
    return Setup(case)


conftest.cache_clearers.append(setup.cache_clear)


def assert_tree_close(got, want, rtol, what):
    """Elementwise within rtol, and within rtol of each leaf's largest magnitude."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{what} leaf {i}: shape {g.shape} != {w.shape}"
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale + 1e-30, err_msg=f"{what} leaf {i}")


# --------------------------------------------------------------------------------------------
# 1. step fold == apply (outputs, final state, gradients), in every mode.


# "auto" is always one of the named modes (checked below with T = 1, jit and vmap), so its gradients
# would only compile a named mode's program a second time.
@pytest.mark.parametrize("case,mode", _mode_params(CAUSAL_CASES))
def test_step_fold_equals_apply_with_gradients(case, mode):
    s = setup(case)
    (_, (ys, final)), grads = s.apply_and_grads(mode)
    (_, (ys_ref, final_ref)), grads_ref = s.fold_and_grads()
    assert ys.shape == (B, T, s.d_out) and ys.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final)), "states are float32"
    assert_tree_close(ys, ys_ref, RTOL_F32, "outputs")
    assert_tree_close(final, final_ref, RTOL_F32, "final state")
    for name, g, g_ref in zip(("params", "xs", "initial_state"), grads, grads_ref, strict=True):
        assert_tree_close(g, g_ref, RTOL_F32, f"gradient wrt {name}")


# --------------------------------------------------------------------------------------------
# 2. two pieces carrying the state == the whole.


@pytest.mark.parametrize("case,mode", _mode_params(CAUSAL_CASES, secondary_slow=True))
def test_apply_in_two_pieces_carrying_state_equals_apply_whole(case, mode):
    s = setup(case)
    ys_a, mid = s.apply(s.xs[:, :T_SPLIT], state=s.s0, mode=mode)
    ys_b, final = s.apply(s.xs[:, T_SPLIT:], state=mid, mode=mode)
    (_, (ys, final_ref)), _ = s.apply_and_grads(mode)
    assert_tree_close(jnp.concatenate([ys_a, ys_b], axis=1), ys, RTOL_F32, "outputs")
    assert_tree_close(final, final_ref, RTOL_F32, "final state")


# --------------------------------------------------------------------------------------------
# 3. reset == separate segments, both directions.


def _separate_segments(apply, xs, reset, mode, reverse):
    """Outputs of each segment of each row run alone from initial_state (reference for non-causal)."""
    rows = []
    for b in range(xs.shape[0]):
        starts = sorted({0, *np.flatnonzero(np.asarray(reset[b])).tolist()}) + [xs.shape[1]]
        rows.append(jnp.concatenate([apply(xs[b:b + 1, lo:hi], mode=mode, reverse=reverse)[0]
                                     for lo, hi in zip(starts[:-1], starts[1:], strict=True)], axis=1))
    return jnp.concatenate(rows)


@pytest.mark.parametrize("case,mode,reverse", _reset_params(CASES))
def test_reset_equals_running_segments_separately(case, mode, reverse):
    s = setup(case)
    if not s.rec.causal:
        # No step to fold: compare with apply on each segment alone, from the fresh state. Which
        # segment's state is "final" depends on each part's direction, so only outputs are compared
        # here (test_combinators checks bidirectional's final state).
        ys, _ = s.apply(s.xs, reset=s.reset, mode=mode, reverse=reverse)
        assert_tree_close(ys, _separate_segments(s.apply, s.xs, s.reset, mode, reverse),
                          RTOL_F32, "outputs")
        return
    (_, (ys, final)), grads = s.apply_and_grads(mode, reverse=reverse, reset=s.reset)
    (_, (ys_ref, final_ref)), grads_ref = s.fold_and_grads(reverse=reverse, reset=s.reset)
    assert_tree_close(ys, ys_ref, RTOL_F32, "outputs")
    assert_tree_close(final, final_ref, RTOL_F32, "final state")
    for name, g, g_ref in zip(("params", "xs", "initial_state"), grads, grads_ref, strict=True):
        assert_tree_close(g, g_ref, RTOL_F32, f"gradient wrt {name}")


# --------------------------------------------------------------------------------------------
# 4. jit, vmap, bfloat16, T = 1, state size.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jit_equals_eager(case):
    s = setup(case)
    assert_tree_close(s.apply(s.xs, state=s.s0, reset=s.reset),
                      s.rec.apply(s.params, s.xs, state=s.s0, reset=s.reset), RTOL_F32, "apply")
    if s.rec.causal:
        x_t = s.xs[:, 0]
        assert_tree_close(jax.jit(s.rec.step)(s.params, s.s0, x_t), s.rec.step(s.params, s.s0, x_t),
                          RTOL_F32, "step")


def _row(e, a):
    return a[e]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vmap_over_an_extra_leading_axis_equals_a_loop(case):
    s = setup(case)
    rec, extra = s.rec, 3
    keys = jax.random.split(jax.random.key(7), 2)
    xs = jax.random.normal(keys[0], (extra, B, T, D_IN), jnp.float32)
    s0 = jax.vmap(lambda k: _perturbed(rec.initial_state(s.params, B), k))(jax.random.split(keys[1], extra))
    resets = jnp.stack([s.reset, ~s.reset, jnp.roll(s.reset, 1, axis=1)])
    # Jitted: an eager vmap dispatches (and compiles) every batched op on its own, which costs more
    # than compiling the whole vmapped function once.
    got = jax.jit(jax.vmap(lambda x, st, r: rec.apply(s.params, x, state=st, reset=r)))(xs, s0, resets)
    s0_e = [jax.tree.map(functools.partial(_row, e), s0) for e in range(extra)]
    want = [s.apply(xs[e], state=s0_e[e], reset=resets[e]) for e in range(extra)]
    assert_tree_close(got, jax.tree.map(lambda *a: jnp.stack(a), *want), RTOL_F32, "vmapped apply")
    if rec.causal:
        got = jax.jit(jax.vmap(lambda st, x: rec.step(s.params, st, x)))(s0, xs[:, :, 0])
        step = jax.jit(rec.step)
        want = [step(s.params, s0_e[e], xs[e, :, 0]) for e in range(extra)]
        assert_tree_close(got, jax.tree.map(lambda *a: jnp.stack(a), *want), RTOL_F32, "vmapped step")


@pytest.mark.parametrize("case,mode", _mode_params(CASES, secondary_slow=True))
def test_bfloat16_compute_with_float32_state_is_within_a_percent_of_float32(case, mode):
    s = setup(case)
    # Both runs see the same bfloat16-rounded inputs, so the comparison measures the compute dtype
    # alone: rounding the inputs is the caller's choice, and a block whose norm divides by a small
    # head output (RMSNorm in deltanet) can magnify that rounding past a percent by itself.
    xs16 = s.xs.astype(jnp.bfloat16)
    ys, final = s.apply(xs16.astype(jnp.float32), state=s.s0, reset=s.reset, mode=mode)
    ys16, final16 = s.apply(xs16, state=s.s0, reset=s.reset, mode=mode)
    assert ys16.dtype == jnp.bfloat16, "the compute dtype is the input dtype"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final16)), "states stay float32"
    rtol = RTOL_BF16_BY_MODEL.get(case.id, RTOL_BF16)
    assert_tree_close(ys16, ys, rtol, "bfloat16 outputs")
    assert_tree_close(final16, final, rtol, "bfloat16 final state")
    if s.rec.causal:
        state16, y16 = s.rec.step(s.params, s.s0, s.xs[:, 0].astype(jnp.bfloat16))
        assert y16.dtype == jnp.bfloat16
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state16))


@pytest.mark.parametrize("case,mode", _mode_params(CASES, with_auto=True, secondary_slow=True))
def test_single_time_step_sequence_equals_one_step(case, mode):
    s = setup(case)
    ys, final = s.apply(s.xs[:, :1], state=s.s0, mode=mode)
    assert ys.shape == (B, 1, s.d_out)
    if s.rec.causal:
        state, y_t = s.rec.step(s.params, s.s0, s.xs[:, 0])
        assert_tree_close(ys[:, 0], y_t, RTOL_F32, "outputs")
        assert_tree_close(final, state, RTOL_F32, "final state")
    else:
        ys_rev, _ = s.apply(s.xs[:, :1], state=s.s0, mode=mode, reverse=True)
        assert np.all(np.isfinite(np.asarray(ys))) and ys_rev.shape == ys.shape


@pytest.mark.parametrize("case", [c for c in CASES if c.info is not None], ids=str)
def test_state_size_formula_counts_the_floats_of_initial_state(case):
    s = setup(case)
    floats = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(s.rec.initial_state(s.params, 1)))
    assert case.info.state_size() == floats


@pytest.mark.parametrize("case", [c for c in CASES if not c.build(False).causal], ids=str)
def test_non_causal_recurrence_refuses_step(case):
    s = setup(case)
    with pytest.raises(TypeError, match="step"):
        s.rec.step(s.params, s.s0, s.xs[:, 0])


# --------------------------------------------------------------------------------------------
# 5. malformed input: ValueError/TypeError naming the argument and the shapes.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_malformed_inputs_raise_errors_naming_the_argument(case):
    s = setup(case)
    rec, p = s.rec, s.params
    with pytest.raises(ValueError, match=r"xs.*\(2, 7\)"):                 # wrong rank
        rec.apply(p, s.xs[:, 0])
    with pytest.raises(ValueError, match=r"xs.*8"):                        # width mismatch
        rec.apply(p, jnp.concatenate([s.xs, s.xs[..., :1]], axis=-1))
    with pytest.raises(ValueError, match="xs.*int32"):                     # integer dtype
        rec.apply(p, s.xs.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"reset.*\(2, 8\)"):
        rec.apply(p, s.xs, reset=s.reset[:, :-1])
    with pytest.raises(ValueError, match="mode"):
        rec.apply(p, s.xs, mode="no_such_mode")
    if rec.causal:
        with pytest.raises(ValueError, match=r"x_t.*\(2, 9, 7\)"):
            rec.step(p, s.s0, s.xs)
        with pytest.raises(ValueError, match=r"x_t.*8"):
            rec.step(p, s.s0, jnp.concatenate([s.xs[:, 0], s.xs[:, 0, :1]], axis=-1))
        with pytest.raises(ValueError, match="x_t.*int32"):
            rec.step(p, s.s0, s.xs[:, 0].astype(jnp.int32))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_from_another_config_raises(case):
    s = setup(case)
    other = case.build(True)
    other_state = other.initial_state(other.init(jax.random.key(1), D_IN), B)
    with pytest.raises(ValueError, match="state"):
        s.rec.apply(s.params, s.xs, state=other_state)
    with pytest.raises(ValueError, match="state"):                          # another batch size
        s.rec.apply(s.params, s.xs, state=s.rec.initial_state(s.params, B + 1))
    if s.rec.causal:
        with pytest.raises(ValueError, match="state"):
            s.rec.step(s.params, other_state, s.xs[:, 0])


@pytest.mark.parametrize("case", [c for c in CASES if c.info is not None], ids=str)
def test_unknown_config_key_raises_type_error(case):
    with pytest.raises(TypeError, match="no_such_key"):
        zoo.get(case.id, no_such_key=3)


CHUNKED = [c for c in CASES if c.info is not None and "chunk_size" in c.info.defaults()]


@pytest.mark.parametrize("bad", [0, -4, 2.5])
@pytest.mark.parametrize("case", CHUNKED or [pytest.param(None, marks=pytest.mark.skip("no chunk_size"))],
                         ids=str)
def test_chunk_size_that_cannot_work_raises(case, bad):
    with pytest.raises((ValueError, TypeError), match="chunk_size"):
        rec = zoo.get(case.id, chunk_size=bad)
        params = rec.init(jax.random.key(0), D_IN)
        for mode in rec.modes:
            rec.apply(params, jnp.ones((B, T, D_IN)), mode=mode)


# --------------------------------------------------------------------------------------------
# The harness itself: it must fail a recurrence that breaks a contract.


def _elman_with_apply(tag, change):
    def build(wide):
        rec = zoo.get("elman", d_model=8 * (2 if wide else 1))

        def apply(params, xs, state=None, reset=None, mode="auto", reverse=False):
            return change(rec.apply, params, xs, state, reset, mode, reverse)

        return rec._replace(apply=apply)

    return Case(f"broken-elman-{tag}", build)


def _ignore_reset(apply, params, xs, state, reset, mode, reverse):
    return apply(params, xs, state=state, mode=mode, reverse=reverse)


def _detach_state(apply, params, xs, state, reset, mode, reverse):
    state = jax.lax.stop_gradient(state) if state is not None else None
    return apply(params, xs, state=state, reset=reset, mode=mode, reverse=reverse)


def test_harness_fails_a_recurrence_that_ignores_reset():
    with pytest.raises(AssertionError, match="outputs"):
        test_reset_equals_running_segments_separately(_elman_with_apply("reset", _ignore_reset),
                                                      "sequential", True)


def test_harness_fails_a_recurrence_whose_gradient_skips_the_initial_state():
    with pytest.raises(AssertionError, match="gradient wrt initial_state"):
        test_step_fold_equals_apply_with_gradients(_elman_with_apply("grad", _detach_state), "sequential")
