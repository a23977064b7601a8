"""ttt_linear and ttt_mlp against a float64 loop of TTT's mini-batch gradient descent written from the
paper and ttt-lm-jax's ``process_mini_batch`` (W_t = W_b − c_p Σ_{j ≤ t} η_j ∇ℓ_j(W_b) inside a
mini-batch, the gradients by jax.grad of the inner loss written here; no zoo.ops), with resets; and
config checks. The model runs in float32, the loop in float64 from the same weights and inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

pytestmark = pytest.mark.usefixtures("quick_compile")

B, T, D_IN = 2, 10, 7
RESET = np.zeros((B, T), bool)
RESET[1, 6] = True


def _ln(x, scale, bias, eps):
    mu = jnp.mean(x)
    return (x - mu) / jnp.sqrt(jnp.mean((x - mu) ** 2) + eps) * scale + bias


def _inner(weights, z, norm, eps):
    """f(W, z) = z + LN(f_res(W, z)) for one head."""
    if "w" in weights:
        res = z @ weights["w"] + weights["b"]
    else:
        res = jax.nn.gelu(z @ weights["w1"] + weights["b1"]) @ weights["w2"] + weights["b2"]
    return z + _ln(res, norm["scale"], norm["bias"], eps)


def _inner_grad(w, k, v, norm, eps):
    """∇_W ½‖f(W, k) − v‖² for one head."""
    return jax.grad(lambda w_: 0.5 * jnp.sum((_inner(w_, k, norm, eps) - v) ** 2))(w)


def _axpy(a, x, y):
    """The pytree a·x + y."""
    return jax.tree.map(lambda u, w: a * u + w, x, y)


def ttt_loop(p, c, xs, reset):
    """The layer token by token in float64. p: params as float64 arrays."""
    heads, d, size = c.n_heads, c.d_model // c.n_heads, c.mini_batch_size
    scale = np.maximum(1.0 / np.arange(1, size + 1) + np.asarray(p["token_idx_offset"]), 0.0)
    head = lambda tree, h: jax.tree.map(lambda a: a[h], tree)  # noqa: E731
    w0 = [head(p["inner"], h) for h in range(heads)]
    out = np.zeros((B, T, c.d_model))
    for b in range(B):
        current, place = list(w0), 0
        for t in range(T):
            if reset is not None and reset[b, t]:
                current, place = list(w0), 0
            if place == 0:
                start = list(current)
                summed = [jax.tree.map(jnp.zeros_like, w) for w in start]
            x = xs[b, t]
            q, k, v = (np.reshape(x @ p[f"w_{n}"], (heads, d)) for n in "qkv")
            eta = c.ttt_base_lr / (1 + np.exp(-(x @ p["w_lr"] + p["b_lr"]))) / d
            z = []
            for h in range(heads):
                norm = head(p["inner_norm"], h)
                g = _inner_grad(start[h], k[h], v[h], norm, c.norm_eps)
                summed[h] = _axpy(eta[h], g, summed[h])
                current[h] = _axpy(-scale[place], summed[h], start[h])
                z.append(_inner(current[h], q[h], norm, c.norm_eps))
            place = (place + 1) % size
            post = p["post_norm"]
            y = np.asarray(_ln(jnp.concatenate(z), post["scale"], post["bias"], c.norm_eps))
            if c.use_gate:
                y = np.asarray(jax.nn.gelu(x @ p["w_g"])) * y
            out[b, t] = y @ p["w_o"]
    return out


def _params(rec):
    """Init, then give the zero-initialised pieces values so that every term is exercised."""
    params = rec.init(jax.random.key(0), D_IN)
    rng = np.random.default_rng(1)
    tweak = lambda a, s: a + s * jnp.asarray(rng.normal(size=a.shape), jnp.float32)  # noqa: E731
    params = dict(params)
    params["w_lr"] = tweak(params["w_lr"], 1.0)
    params["b_lr"] = tweak(params["b_lr"], 0.5)
    params["token_idx_offset"] = tweak(params["token_idx_offset"], 0.1)
    params["inner"] = jax.tree.map(lambda a: tweak(a, 0.2), params["inner"])
    params["inner_norm"] = jax.tree.map(lambda a: tweak(a, 0.1), params["inner_norm"])
    params["post_norm"] = jax.tree.map(lambda a: tweak(a, 0.1), params["post_norm"])
    return params


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_apply_matches_a_float64_loop_of_mini_batch_gd(name):
    rec = zoo.get(name)
    config = zoo.list_models()[name].config()
    params = _params(rec)
    xs = jax.random.normal(jax.random.key(2), (B, T, D_IN), jnp.float32)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        x64 = np.asarray(xs, np.float64)
        want = ttt_loop(p64, config, x64, None)
        want_reset = ttt_loop(p64, config, x64, RESET)
    scale = float(np.max(np.abs(want)))
    got, _ = rec.apply(params, xs, mode="chunked")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale, err_msg="chunked")
    for mode in ("chunked", "sequential"):
        got, _ = rec.apply(params, xs, reset=RESET, mode=mode)
        np.testing.assert_allclose(np.asarray(got), want_reset, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{mode} with resets")


@pytest.mark.parametrize("bad", [{"d_model": 15}, {"n_heads": 0}, {"mini_batch_size": 0},
                                 {"mini_batch_size": 2.5}, {"ttt_base_lr": -1.0}, {"use_gate": "yes"},
                                 {"norm_eps": 0.0}])
def test_bad_config_raises_value_error_naming_the_field(bad):
    (field,) = bad
    with pytest.raises(ValueError, match=field.split("_")[0] if field == "d_model" else field):
        zoo.get("ttt_linear", **bad)


def test_mlp_ratio_is_checked():
    with pytest.raises(ValueError, match="mlp_ratio"):
        zoo.get("ttt_mlp", mlp_ratio=0)
