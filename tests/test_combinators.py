"""What the combinators compute: stack, residual and bidirectional against hand-written versions.

The contracts (step fold, reset, jit, vmap, dtypes, errors) are checked for combinators by
test_harness.py; here each combinator is compared with the same computation written out by hand,
in float64 numpy where the combinator adds math of its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D = 2, 7, 5


def _random(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(got, want, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol,
                               atol=rtol * float(np.max(np.abs(want))))


# --------------------------------------------------------------------------------------------
# bidirectional


def _flip(x):
    return jnp.flip(x, axis=1)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional_equals_forward_run_and_manually_reversed_run(merge):
    forward = zoo.get("elman", d_model=6)
    backward = zoo.get("elman", d_model=6, activation="relu")
    rec = zoo.bidirectional(forward, backward, merge=merge)
    params = rec.init(jax.random.key(0), D)
    xs = _random(1, (B, T, D))
    s0 = (_random(2, (B, 6)), _random(3, (B, 6)))
    ys, (s_f, s_b) = rec.apply(params, xs, state=s0)
    ys_f, want_f = forward.apply(params["forward"], xs, state=s0[0])
    # The backward half is an ordinary forward run over the time-reversed sequence, flipped back.
    ys_b, want_b = backward.apply(params["backward"], _flip(xs), state=s0[1])
    ys_b = _flip(ys_b)
    want = ys_f + ys_b if merge == "sum" else jnp.concatenate([ys_f, ys_b], axis=-1)
    assert ys.shape == (B, T, 6 if merge == "sum" else 12)
    _close(ys, want)
    _close(s_f, want_f)
    _close(s_b, want_b)     # the backward half's final state is its state after reading x_0


def test_bidirectional_default_backward_has_its_own_params():
    rec = zoo.bidirectional(zoo.get("elman", d_model=4))
    params = rec.init(jax.random.key(0), D)
    assert not np.allclose(params["forward"]["w_in"], params["backward"]["w_in"])
    assert rec.causal is False
    with pytest.raises(TypeError, match="backward half reads the future"):
        rec.step(params, rec.initial_state(params, B), _random(1, (B, D)))


def test_bidirectional_sum_of_unequal_widths_raises():
    rec = zoo.bidirectional(zoo.get("elman", d_model=4), zoo.get("elman", d_model=3), merge="sum")
    with pytest.raises(ValueError, match="equal widths"):
        rec.init(jax.random.key(0), D)
    with pytest.raises(ValueError, match="merge"):
        zoo.bidirectional(zoo.get("elman"), merge="max")


def test_bidirectional_reverse_swaps_the_directions():
    base = zoo.get("elman", d_model=4)
    rec = zoo.bidirectional(base)
    params = rec.init(jax.random.key(3), D)
    xs = _random(4, (B, T, D))
    ys, _ = rec.apply(params, xs, reverse=True)
    ys_f_rev = _flip(base.apply(params["forward"], _flip(xs))[0])
    ys_b_fwd = base.apply(params["backward"], xs)[0]
    _close(ys, jnp.concatenate([ys_f_rev, ys_b_fwd], axis=-1))


# --------------------------------------------------------------------------------------------
# residual


def _np_norm(x, params):
    x = np.asarray(x, np.float64)
    if "bias" in params:
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * params["scale"] + params["bias"]
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * params["scale"]


def _np_gelu(x):
    # tanh approximation, which is jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_mlp(p, x):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    if "w_gate" in p:
        gate = x @ p["w_gate"]
        return (gate / (1 + np.exp(-gate)) * (x @ p["w_up"])) @ p["w_down"]
    return _np_gelu(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]


@pytest.mark.parametrize("norm,mlp,d_mixer", [("rms", "swiglu", D), ("layer", "gelu", 8), ("rms", "gelu", 3)])
def test_residual_equals_hand_written_pre_norm_block(norm, mlp, d_mixer):
    mixer = zoo.get("elman", d_model=d_mixer)
    rec = zoo.residual(mixer, mlp_ratio=2, norm=norm, mlp=mlp)
    params = rec.init(jax.random.key(0), D)
    # Non-trivial norm parameters so that scale and bias are exercised.
    params["mixer_norm"] = jax.tree.map(lambda a: a + 0.3 * _random(9, a.shape), params["mixer_norm"])
    params["mlp_norm"] = jax.tree.map(lambda a: a - 0.2 * _random(8, a.shape), params["mlp_norm"])
    xs, s0 = _random(1, (B, T, D)), _random(2, (B, d_mixer))
    ys, final = rec.apply(params, xs, state=s0)

    x = np.asarray(xs, np.float64)
    normed = _np_norm(x, jax.tree.map(np.asarray, params["mixer_norm"]))
    mixed, want_final = mixer.apply(params["mixer"], jnp.asarray(normed, jnp.float32), state=s0)
    mixed = np.asarray(mixed, np.float64)
    assert ("out_proj" in params) == (d_mixer != D)
    if d_mixer != D:
        mixed = mixed @ np.asarray(params["out_proj"], np.float64)
    h = x + mixed
    want = h + _np_mlp(params["mlp"], _np_norm(h, jax.tree.map(np.asarray, params["mlp_norm"])))
    _close(ys, want)
    _close(final, want_final)


def test_residual_without_mlp_is_input_plus_mixer_of_normed_input():
    mixer = zoo.get("elman", d_model=D)
    rec = zoo.residual(mixer, mlp_ratio=0)
    params = rec.init(jax.random.key(0), D)
    assert set(params) == {"mixer_norm", "mixer"}
    xs = _random(1, (B, T, D))
    normed = _np_norm(xs, jax.tree.map(np.asarray, params["mixer_norm"]))
    mixed = mixer.apply(params["mixer"], jnp.asarray(normed, jnp.float32))[0]
    want = np.asarray(xs, np.float64) + np.asarray(mixed, np.float64)
    _close(rec.apply(params, xs)[0], want)


def test_swiglu_hidden_width_keeps_the_gelu_parameter_count():
    def n_mlp(mlp):
        params = zoo.residual(zoo.get("elman", d_model=12), mlp_ratio=4, mlp=mlp).init(jax.random.key(0), 12)
        return sum(a.size for k, a in params["mlp"].items() if k.startswith("w_"))

    assert n_mlp("swiglu") == n_mlp("gelu") == 2 * 4 * 12 * 12


def test_residual_rejects_bad_options():
    with pytest.raises(ValueError, match="norm"):
        zoo.residual(zoo.get("elman"), norm="batch")
    with pytest.raises(ValueError, match="mlp"):
        zoo.residual(zoo.get("elman"), mlp="relu")
    with pytest.raises(TypeError, match="Recurrence"):
        zoo.residual("elman")


# --------------------------------------------------------------------------------------------
# stack


def test_stack_feeds_each_layer_the_outputs_of_the_one_below():
    layers = [zoo.get("elman", d_model=6), zoo.get("elman", d_model=3, activation="relu"),
              zoo.residual(zoo.get("elman", d_model=4))]
    rec = zoo.stack(*layers)
    params = rec.init(jax.random.key(0), D)
    assert isinstance(params, tuple) and len(params) == 3
    xs = _random(1, (B, T, D))
    reset = jax.random.bernoulli(jax.random.key(5), 0.3, (B, T))
    s0 = (_random(2, (B, 6)), _random(3, (B, 3)), _random(4, (B, 4)))
    ys, final = rec.apply(params, xs, state=s0, reset=reset)
    h, want_final = xs, []
    for layer, p, s in zip(layers, params, s0, strict=True):
        h, s = layer.apply(p, h, state=s, reset=reset)
        want_final.append(s)
    assert ys.shape == (B, T, 3)
    _close(ys, h)
    for got, want in zip(final, want_final, strict=True):
        _close(got, want)


def test_stack_sends_a_named_mode_only_to_layers_that_have_it():
    calls = []

    def spy(rec, tag):
        def apply(params, xs, state=None, reset=None, mode="auto", reverse=False):
            calls.append((tag, mode))
            return rec.apply(params, xs, state=state, reset=reset, mode=mode, reverse=reverse)

        return rec._replace(apply=apply, modes=rec.modes + ((tag,) if tag == "b" else ()))

    rec = zoo.stack(spy(zoo.get("elman", d_model=4), "a"), spy(zoo.get("elman", d_model=4), "b"))
    assert rec.modes == (*zoo.get("elman").modes, "b")
    params = rec.init(jax.random.key(0), D)
    calls.clear()
    with pytest.raises(ValueError, match="mode"):      # "b" reaches elman's own apply, which has no such mode
        rec.apply(params, _random(1, (B, T, D)), mode="b")
    assert calls == [("a", "auto"), ("b", "b")]
    calls.clear()
    rec.apply(params, _random(1, (B, T, D)), mode="sequential")
    assert calls == [("a", "sequential"), ("b", "sequential")]


def test_stack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        zoo.stack()
    with pytest.raises(TypeError, match="argument 1"):
        zoo.stack(zoo.get("elman"), "lstm")
    rec = zoo.stack(zoo.get("elman", d_model=4), zoo.get("elman", d_model=4))
    params = rec.init(jax.random.key(0), D)
    with pytest.raises(ValueError, match="state"):
        rec.apply(params, _random(1, (B, T, D)), state=(jnp.zeros((B, 4)),))
