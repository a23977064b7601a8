"""zoo.hybrid against its layers applied one after the other by hand, and its argument checks.

The reference runs each registered mixer on its own (``rec.apply`` / ``rec.step``) and writes the
rest of each pre-norm residual layer out in float64 numpy: RMSNorm, the residual adds and the
SwiGLU MLP. The contracts (step fold, reset, jit, vmap, dtypes, errors) are the harness's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.combinators import hybrid

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D = 2, 7, 6


def _random(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(got, want, rtol=1e-5):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(want))))


def _rms(p, x):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * np.asarray(p["scale"], np.float64)


def _swiglu(p, x):
    w = {k: np.asarray(v, np.float64) for k, v in p.items()}
    gate = x @ w["w_gate"]
    return (gate / (1 + np.exp(-gate)) * (x @ w["w_up"])) @ w["w_down"]


def _mixers():
    # Both keep the residual width D, so no projection sits between mixer and residual add.
    return {"rnn": zoo.get("lstm", d_model=D), "lin": zoo.get("lru", d_model=D, d_state=4)}


def _by_hand_apply(mixers, kinds, params, xs, states, reset):
    """Each layer: x + mixer(rms(x)), then + swiglu(rms(.)), the mixer run through its own apply."""
    x, finals = np.asarray(xs, np.float64), []
    for kind, p, s in zip(kinds, params, states, strict=True):
        normed = jnp.asarray(_rms(p["mixer_norm"], x), jnp.float32)
        y, final = mixers[kind].apply(p["mixer"], normed, state=s, reset=reset)
        x = x + np.asarray(y, np.float64)
        x = x + _swiglu(p["mlp"], _rms(p["mlp_norm"], x))
        finals.append(final)
    return x, tuple(finals)


def _by_hand_step(mixers, kinds, params, states, x_t):
    x, new = np.asarray(x_t, np.float64), []
    for kind, p, s in zip(kinds, params, states, strict=True):
        s, y = mixers[kind].step(p["mixer"], s, jnp.asarray(_rms(p["mixer_norm"], x), jnp.float32))
        x = x + np.asarray(y, np.float64)
        x = x + _swiglu(p["mlp"], _rms(p["mlp_norm"], x))
        new.append(s)
    return tuple(new), x


def _perturbed(state, seed):
    leaves, tree = jax.tree.flatten(state)
    noisy = [leaf + 0.3 * _random(seed + i, leaf.shape) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(tree, noisy)


def test_hybrid_equals_its_residual_layers_applied_one_after_another_by_hand():
    mixers, kinds = _mixers(), ("rnn", "lin", "rnn")
    rec = hybrid(mixers, "rnn,lin,rnn", mlp_ratio=2)
    params = rec.init(jax.random.key(0), D)
    xs = _random(1, (B, T, D))
    s0 = _perturbed(rec.initial_state(params, B), 10)
    reset = np.zeros((B, T), bool)
    reset[1, 3] = True
    ys, final = rec.apply(params, xs, state=s0, reset=jnp.asarray(reset))
    want, want_final = _by_hand_apply(mixers, kinds, params, xs, s0, jnp.asarray(reset))
    assert ys.shape == (B, T, D)
    _close(ys, want)
    assert len(final) == 3
    for got, ref in zip(jax.tree.leaves(final), jax.tree.leaves(want_final), strict=True):
        _close(got, ref)
    state, y_t = rec.step(params, s0, xs[:, 0])
    want_state, want_y = _by_hand_step(mixers, kinds, params, s0, xs[:, 0])
    _close(y_t, want_y)
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
        _close(got, ref)


def test_every_layer_has_its_own_params_and_state_even_where_a_mixer_repeats():
    mixers = _mixers()
    rec = hybrid(mixers, "rnn,lin", repeat=2)
    params = rec.init(jax.random.key(0), D)
    assert len(params) == 4
    assert not np.allclose(params[0]["mixer"]["w_in"], params[2]["mixer"]["w_in"])
    state = rec.initial_state(params, B)
    for layer_state, kind in zip(state, ("rnn", "lin", "rnn", "lin"), strict=True):
        want = mixers[kind].initial_state(params[0 if kind == "rnn" else 1]["mixer"], B)
        assert jax.tree.structure(layer_state) == jax.tree.structure(want)
    assert rec.modes == ("sequential", "newton", "associative", "chunked")   # the union, lstm's first
    assert rec.name == "hybrid(rnn,lin)x2" and rec.causal


def test_the_list_form_and_every_pattern_spelling_build_the_same_layers():
    mixers = _mixers()
    xs = _random(2, (B, T, D))
    variants = [hybrid(mixers, "rnn,lin", repeat=2), hybrid(mixers, " rnn , lin ", repeat=2),
                hybrid(mixers, ("rnn", "lin", "rnn", "lin")),
                hybrid([mixers["rnn"], mixers["lin"]], repeat=2)]
    outputs = [rec.apply(rec.init(jax.random.key(5), D), xs)[0] for rec in variants]
    for ys in outputs[1:]:
        np.testing.assert_array_equal(ys, outputs[0])


def test_a_non_causal_mixer_makes_the_hybrid_non_causal():
    # bidirectional(elman of width 4) concatenates to width 8: residual projects it back to D.
    rec = hybrid([zoo.bidirectional(zoo.get("elman", d_model=4))])
    params = rec.init(jax.random.key(0), D)
    assert not rec.causal and params[0]["out_proj"].shape == (8, D)
    assert rec.apply(params, _random(3, (B, T, D)))[0].shape == (B, T, D)
    with pytest.raises(TypeError, match="step"):
        rec.step(params, rec.initial_state(params, B), _random(4, (B, D)))


@pytest.mark.parametrize("call, error, match", [
    (lambda m: hybrid(m), ValueError, "pattern is needed"),
    (lambda m: hybrid(m, "rnn,attn"), ValueError, r"pattern=.*\['attn'\]"),
    (lambda m: hybrid(m, ""), ValueError, "pattern=''"),
    (lambda m: hybrid(m, "rnn,,lin"), ValueError, "pattern='rnn,,lin'.*empty"),
    (lambda m: hybrid(m, 3), ValueError, "pattern must be"),
    (lambda m: hybrid(m, ["rnn", 1]), ValueError, "pattern=.*non-str"),
    (lambda m: hybrid(m, []), ValueError, "pattern=\\[\\]"),
    (lambda m: hybrid(list(m.values()), "rnn,lin"), ValueError, "pattern=.*dict"),
    (lambda m: hybrid({}, "rnn"), ValueError, "mixers is an empty dict"),
    (lambda m: hybrid([]), ValueError, "mixers is empty"),
    (lambda m: hybrid({"rnn": "lstm"}, "rnn"), TypeError, r"mixers\['rnn'\] is a str"),
    (lambda m: hybrid([m["rnn"], 3]), TypeError, r"mixers\[1\] is a int"),
    (lambda m: hybrid("lstm"), TypeError, "mixers must be"),
    (lambda m: hybrid(m, "rnn", repeat=0), ValueError, "repeat.*0"),
    (lambda m: hybrid(m, "rnn", repeat=1.5), ValueError, "repeat.*1.5"),
    (lambda m: hybrid(m, "rnn", repeat=True), ValueError, "repeat.*True"),
    (lambda m: hybrid(m, "rnn", mlp_ratio=-1), ValueError, "mlp_ratio"),
    (lambda m: hybrid(m, "rnn", norm="batch"), ValueError, "norm='batch'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_errors_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(_mixers())
