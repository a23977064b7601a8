"""zoo.ops.fast_weights: both modes of ``apply`` and the ``step`` fold against ``reference`` (a plain
float64 token loop that carries the un-scaled weights explicitly), with momentum and decay gates,
mini_batch 1 and > 1, TTT's position scale, resets, a state entering mid-mini-batch, and gradients;
and the no-LayerNorm linear memory with mini_batch = 1 against the delta rule written in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import fast_weights as fw

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, H, K = 2, 7, 2, 3


def layer_normed_linear(weights, x, consts):
    """TTT-Linear's f: x + LN(x W + b), LN scale per channel."""
    z = x @ weights["w"] + weights["b"]
    z = z - jnp.mean(z)
    return x + z / jnp.sqrt(jnp.mean(z * z) + 1e-6) * consts["scale"]


def data(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.normal(size=s))  # noqa: E731
    gate = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, size=(B, T, H)))  # noqa: E731
    return {
        "W0": {"w": 0.3 * normal(H, K, K), "b": 0.1 * normal(H, K)},
        "consts": {"scale": 1 + 0.1 * normal(H, K)},
        "q": normal(B, T, H, K), "k": normal(B, T, H, K), "v": normal(B, T, H, K),
        "lr": gate(0.1, 0.9), "momentum": gate(0.2, 0.9), "decay": gate(0.0, 0.3),
        "position_scale": jnp.asarray(rng.uniform(0.3, 1.0, size=3)),
    }


RESET = np.zeros((B, T), bool)
RESET[1, 3] = True

CASES = {  # mini_batch, with momentum and decay, with a position scale
    "online-momentum-decay": (1, True, False),
    "minibatch3-scaled": (3, False, True),
    "minibatch3-momentum-decay-scaled": (3, True, True),
}


def kwargs(d, mini_batch, gates, scaled, lo=0, hi=T):
    cut = lambda a: a[:, lo:hi]  # noqa: E731
    return {"lr": cut(d["lr"]), "momentum": cut(d["momentum"]) if gates else None,
            "decay": cut(d["decay"]) if gates else None, "mini_batch": mini_batch,
            "position_scale": d["position_scale"] if scaled else None, "consts": d["consts"]}


def qkv(d, lo=0, hi=T):
    return d["q"][:, lo:hi], d["k"][:, lo:hi], d["v"][:, lo:hi]


def assert_close(got, want, what, rtol=1e-10):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(np.max(np.abs(np.asarray(w)))) + 1e-30
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_modes_and_step_fold_equal_the_float64_loop_with_resets(case):
    mini_batch, gates, scaled = CASES[case]
    with jax.enable_x64(True):
        d = data()
        kw = kwargs(d, mini_batch, gates, scaled)
        want_o, want_state = fw.reference(layer_normed_linear, d["W0"], *qkv(d), **kw)
        for mode in fw.MODES:
            o, state = fw.apply(layer_normed_linear, d["W0"], *qkv(d), mode=mode, **kw)
            assert_close(o, want_o, f"{mode} outputs")
            assert_close(state, want_state, f"{mode} final state")
        want_o, want_state = fw.reference(layer_normed_linear, d["W0"], *qkv(d), reset=RESET, **kw)
        o, state = fw.apply(layer_normed_linear, d["W0"], *qkv(d), reset=RESET, **kw)
        assert_close(o, want_o, "outputs with resets")
        assert_close(state, want_state, "final state with resets")
        # One step from the loop's state after 5 tokens (mid-mini-batch for b = 3) continues the loop.
        _, mid = fw.reference(layer_normed_linear, d["W0"], *qkv(d, 0, 5),
                              **kwargs(d, mini_batch, gates, scaled, 0, 5))
        want_o6, want_state6 = fw.reference(layer_normed_linear, d["W0"], *qkv(d, 0, 6),
                                            **kwargs(d, mini_batch, gates, scaled, 0, 6))
        at = lambda a: None if a is None else a[:, 5]  # noqa: E731
        state6, o_t = fw.step(layer_normed_linear, mid, *(at(a) for a in qkv(d)), at(kw["lr"]),
                              at(kw["momentum"]), at(kw["decay"]), mini_batch=mini_batch,
                              position_scale=kw["position_scale"], consts=d["consts"])
        assert_close(o_t, want_o6[:, 5], "step from a mid-sequence state")
        assert_close(state6, want_state6, "state after that step")


@pytest.mark.parametrize("case", ["minibatch3-momentum-decay-scaled"])
def test_state_entering_mid_mini_batch_continues_the_loop(case):
    """T = 7 cut at 4 with mini-batches of 3: the second piece enters at place 1 of a mini-batch."""
    mini_batch, gates, scaled = CASES[case]
    with jax.enable_x64(True):
        d = data(1)
        want_o, want_state = fw.reference(layer_normed_linear, d["W0"], *qkv(d),
                                          **kwargs(d, mini_batch, gates, scaled))
        o1, s1 = fw.apply(layer_normed_linear, d["W0"], *qkv(d, 0, 4),
                          **kwargs(d, mini_batch, gates, scaled, 0, 4))
        assert float(s1["position"][0]) == 1.0
        o2, s2 = fw.apply(layer_normed_linear, d["W0"], *qkv(d, 4, T), initial_state=s1,
                          **kwargs(d, mini_batch, gates, scaled, 4, T))
        assert_close(jnp.concatenate([o1, o2], axis=1), want_o, "outputs")
        assert_close(s2, want_state, "final state")


def test_gradients_of_both_modes_equal_the_loop_gradients():
    mini_batch, gates, scaled = CASES["minibatch3-momentum-decay-scaled"]
    with jax.enable_x64(True):
        d = {key: (a[:, :5] if key in ("q", "k", "v", "lr", "momentum", "decay") else a)
             for key, a in data(2).items()}
        weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, 5, H, K)))

        def loss(run, W0, q, lr, momentum, scale, consts):
            kw = kwargs({**d, "lr": lr, "momentum": momentum, "position_scale": scale, "consts": consts},
                        mini_batch, gates, scaled)
            o, state = run(layer_normed_linear, W0, q, d["k"], d["v"], **kw)
            return jnp.sum(o * weights) + jnp.sum(state["momentum"]["w"] ** 2)

        args = (d["W0"], d["q"], d["lr"], d["momentum"], d["position_scale"], d["consts"])
        argnums = tuple(range(1, 7))
        want = jax.grad(loss, argnums)(fw.reference, *args)      # the loop: eager (cheaper than jitted)
        for mode in fw.MODES:
            run = lambda *a, mode=mode, **k: fw.apply(*a, mode=mode, **k)  # noqa: E731
            got = jax.jit(jax.grad(loss, argnums), static_argnums=0)(run, *args)    # one compile each
            assert_close(got, want, f"{mode} gradients", rtol=1e-9)


def test_linear_memory_without_norm_online_is_the_delta_rule():
    """f(S, k) = S k with S [V, K] and mini_batch 1: S_t = S_{t-1}(I − η k kᵀ) + η v kᵀ, o_t = S_t q_t."""
    with jax.enable_x64(True):
        d = data(4)
        s0 = 0.3 * jnp.asarray(np.random.default_rng(5).normal(size=(H, K, K)))
        o, state = fw.apply(lambda s, x: s @ x, s0, *qkv(d), lr=d["lr"], mini_batch=1, reset=RESET)
        want = np.zeros((B, T, H, K))
        q, k, v, eta = (np.asarray(a) for a in (*qkv(d), d["lr"]))
        for b in range(B):
            s = np.array(s0)
            for t in range(T):
                if RESET[b, t]:
                    s = np.array(s0)
                for h in range(H):
                    kk = k[b, t, h]
                    lr = eta[b, t, h]
                    s[h] = s[h] @ (np.eye(K) - lr * np.outer(kk, kk)) + lr * np.outer(v[b, t, h], kk)
                    want[b, t, h] = s[h] @ q[b, t, h]
        assert_close(o, want, "delta-rule outputs")
        assert_close(state["weights"][1], s, "delta-rule final state")


def test_bad_arguments_raise_errors_naming_them():
    d = data()
    f = layer_normed_linear
    with pytest.raises(ValueError, match="mini_batch"):
        fw.apply(f, d["W0"], *qkv(d), lr=d["lr"], mini_batch=0, consts=d["consts"])
    with pytest.raises(ValueError, match="lr must have shape"):
        fw.apply(f, d["W0"], *qkv(d), lr=d["lr"][:, :3], mini_batch=2, consts=d["consts"])
    with pytest.raises(ValueError, match="q and k"):
        fw.apply(f, d["W0"], d["q"], d["k"][:, :3], d["v"], lr=d["lr"], mini_batch=2, consts=d["consts"])
    with pytest.raises(ValueError, match="head axis"):
        fw.apply(f, {"w": d["W0"]["w"][:1], "b": d["W0"]["b"]}, *qkv(d), lr=d["lr"], mini_batch=2,
                 consts=d["consts"])
    with pytest.raises(ValueError, match="position_scale"):
        fw.apply(f, d["W0"], *qkv(d), lr=d["lr"], mini_batch=2, position_scale=jnp.ones(3),
                 consts=d["consts"])
    with pytest.raises(ValueError, match="initial_state"):
        fw.apply(f, d["W0"], *qkv(d), lr=d["lr"], momentum=d["momentum"], mini_batch=2, consts=d["consts"],
                 initial_state=fw.initial_state(d["W0"], B))
    with pytest.raises(ValueError, match="mode"):
        fw.apply(f, d["W0"], *qkv(d), lr=d["lr"], mini_batch=2, consts=d["consts"], mode="parallel")
