"""Fast-weight (test-time-learning) memories: weights trained by gradient descent as tokens arrive.

Shared by TTT (Y. Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States", 2024) and Titans (A. Behrouz et al., "Titans: Learning to Memorize at Test Time", 2024).
Per head the memory is a pytree of weights ``W`` applied by a pure ``memory_fn(W, x) -> y`` (or
``memory_fn(W, x, consts)`` when per-head constants, learned by the outer loop but not updated at
test time, are given: TTT's LayerNorm). For token t with key k_t, value v_t, query q_t::

    ℓ_t(W) = loss_fn(memory_fn(W, k_t), v_t)          default ½‖memory_fn(W, k_t) − v_t‖²
    G_t    = ∇_W ℓ_t(W_base(t))                        W_base(t): the weights at the start of t's mini-batch
    S_t    = η_t S_{t-1} − θ_t G_t                     momentum η (None: S_t = −θ_t G_t)
    W̃_t    = (1 − α_t) W̃_{t-1} + S_t                   decay α (None: α ≡ 0); W̃ = W_base before a mini-batch
    W_t    = W_base + s_p (W̃_t − W_base)               s = position_scale[p], p = t's place in its mini-batch
    o_t    = memory_fn(W_t, q_t)                       the updated weights are read

and the next mini-batch starts from W_base = W_t of its last token. With ``mini_batch = 1`` the
gradient is taken at W_{t-1} (fully online, Titans with chunk 1); with b > 1 all gradients of a
mini-batch are taken at one point (TTT's mini-batch GD, Titans' chunked training), so they are
computed together. ``position_scale`` (None: all ones) is TTT's token-index scaling of the learning
rate: the read at place p of a mini-batch sees the first p + 1 gradients scaled by s_p (TTT uses
s_p = 1/(p + 1), i.e. the running mean of the gradients).

Shapes: q, k [B, T, H, K], v [B, T, H, V]; lr (θ), momentum (η), decay (α) [B, T, H];
W0 a pytree whose leaves have a leading head axis H; consts likewise; position_scale [mini_batch].

State (``initial_state``): a dict of float leaves, [B, H, ...] for the weights::

    "weights":  W_base, the weights at the start of the current mini-batch
    "delta":    W̃ − W_base, the unscaled displacement accumulated inside the mini-batch (read as 0
                at a mini-batch start, so whatever it holds there is ignored)
    "momentum": S (only when the state is made with ``momentum=True``)
    "position": [B], the place inside the mini-batch as a float32 count, read with floor (exact
                under perturbations in [0, 1), zero gradient)

A complete mini-batch is folded into "weights" at its last token, so a state at a mini-batch start
holds the current weights. A reset restarts the mini-batch grid at the reset token (the fresh state
has position 0).

Modes of ``apply``:

* ``"chunked"`` (and ``"auto"``): ``lax.scan`` over mini-batches; inside one, the per-token gradients
  at W_base are taken together (``vmap`` of ``jax.grad``) and the momentum and decay recurrences are
  solved in closed form with lower-triangular transfer matrices, giving every token's weights at
  once. Valid when every row enters at a mini-batch start and no reset falls in the sequence, which
  is checked at run time (``lax.cond``); otherwise the token path runs.
* ``"sequential"``: ``lax.scan`` of ``step`` over tokens (a reset swaps in the fresh state).

``reference`` is a plain Python token loop written from the equations above (float64-capable), for
tests. Gradients of an outer loss flow through everything (W0, consts, q, k, v, the gates, the
position scale and the entering state) by ordinary autodiff, second order through ``jax.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops._time import check_reset, reset_for_reverse

MODES = ("chunked", "sequential")

Tree = object


# --------------------------------------------------------------------------------------------
# Small pieces.


def squared_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """The default inner loss ½‖pred − target‖²."""
    return 0.5 * jnp.sum(jnp.square(pred - target))


def _call(memory_fn, weights, x, consts):
    return memory_fn(weights, x) if consts is None else memory_fn(weights, x, consts)


def _inner_grad(memory_fn, loss_fn, weights, k, v, consts):
    """∇_W loss_fn(memory_fn(W, k), v) for one head and one token."""
    return jax.grad(lambda w: loss_fn(_call(memory_fn, w, k, consts), v))(weights)


def _tmap(fn, *trees):
    return jax.tree.map(fn, *trees)


def _rows(flag: jax.Array, leaf: jax.Array) -> jax.Array:
    """A per-row (or per-row-head) flag broadcast against ``leaf``."""
    return flag.reshape(flag.shape + (1,) * (leaf.ndim - flag.ndim))


def read_position(position: jax.Array, mini_batch: int) -> jax.Array:
    """The stored float count as int32 in [0, mini_batch − 1]: floor of the stop-gradient value."""
    return jnp.clip(jnp.floor(lax.stop_gradient(position)), 0, mini_batch - 1).astype(jnp.int32)


def transfer_matrix(gate: jax.Array) -> jax.Array:
    """D[i, j] = Π_{l=j+1..i} gate_l for j ≤ i, else 0: the map from inputs to states of
    x_i = gate_i x_{i-1} + u_i. gate [L] -> [L, L]. Products (not log-sums) so that gates may be 0."""
    n = gate.shape[0]
    i, j, m = np.ogrid[:n, :n, :n]
    inside = (m > j) & (m <= i)
    factors = jnp.where(jnp.asarray(inside), gate[None, None, :], jnp.ones((), gate.dtype))
    return jnp.prod(factors, axis=-1) * jnp.asarray(np.tril(np.ones((n, n))), gate.dtype)


def _combine(coeffs: jax.Array, tree) -> Tree:
    """Σ_j coeffs[i, j] tree_j for a pytree with leading axis L -> leading axis coeffs.shape[0]."""
    return _tmap(lambda leaf: jnp.tensordot(coeffs.astype(leaf.dtype), leaf, axes=1), tree)


# --------------------------------------------------------------------------------------------
# State.


def initial_state(W0, batch: int, *, momentum: bool = False) -> dict:
    """The fresh state: W_base = W0 in every row, no displacement, no momentum, position 0.
    Float32 (float64 for a float64 W0)."""
    def rows(leaf):
        leaf = jnp.asarray(leaf)
        leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
        return jnp.broadcast_to(leaf, (batch, *leaf.shape))

    weights = _tmap(rows, W0)
    state = {"weights": weights, "delta": _tmap(jnp.zeros_like, weights),
             "position": jnp.zeros((batch,), jax.tree.leaves(weights)[0].dtype)}
    if momentum:
        state["momentum"] = _tmap(jnp.zeros_like, weights)
    return state


_fresh_state = initial_state


def state_size(W0, *, momentum: bool = False) -> int:
    """Floats per batch row of ``initial_state``."""
    per = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(W0))
    return (3 if momentum else 2) * per + 1


# --------------------------------------------------------------------------------------------
# One token (per batch row, per head) and one mini-batch from its start (per row, per head).


def _token(memory_fn, loss_fn, mini_batch, scale, consts, base, delta, mom, p, q, k, v, lr, eta, alpha):
    """One token for one row and head. ``p`` is the int place in the mini-batch; returns the new
    (base, delta, momentum) and o."""
    first = p == 0
    delta = _tmap(lambda d: jnp.where(first, jnp.zeros_like(d), d), delta)
    grad = _inner_grad(memory_fn, loss_fn, base, k, v, consts)
    if eta is None:
        step = _tmap(lambda g: -lr * g, grad)
    else:
        step = _tmap(lambda s, g: eta * s - lr * g, mom, grad)
    if alpha is None:
        delta = _tmap(jnp.add, delta, step)
    else:
        delta = _tmap(lambda d, w, s: (1 - alpha) * d - alpha * w + s, delta, base, step)
    s_p = scale[p]
    weights = _tmap(lambda w, d: w + s_p * d, base, delta)
    o = _call(memory_fn, weights, q, consts)
    last = p == mini_batch - 1
    base = _tmap(lambda w, w0: jnp.where(last, w, w0), weights, base)
    delta = _tmap(lambda d: jnp.where(last, jnp.zeros_like(d), d), delta)
    return base, delta, (step if eta is not None else None), o


def _mini_batch(memory_fn, loss_fn, scale, consts, base, mom, count, q, k, v, lr, eta, alpha):
    """One mini-batch of L tokens from its start for one row and head, all at once; only the first
    ``count`` (traced, 1 ≤ count ≤ L) are real, the rest padding that the real ones never see.

    Returns o [L, V] and the state after the real tokens: (W_base, W̃ − W_base, S), where a
    complete mini-batch is folded into W_base.
    """
    n = q.shape[0]
    grads = jax.vmap(_inner_grad, in_axes=(None, None, None, 0, 0, None))(
        memory_fn, loss_fn, base, k, v, consts)
    # S_i = P_i S_0 − Σ_j Dη[i, j] θ_j G_j with P_i = Π_{l≤i} η_l.
    if eta is None:
        d_eta, carry_in = jnp.eye(n, dtype=lr.dtype), jnp.zeros((n,), lr.dtype)
    else:
        d_eta, carry_in = transfer_matrix(eta), jnp.cumprod(eta)
    # W̃_i − W_base = Σ_j Dγ[i, j] (S_j − α_j W_base), γ = 1 − α.
    if alpha is None:
        d_gamma, pull = jnp.tril(jnp.ones((n, n), lr.dtype)), jnp.zeros((n,), lr.dtype)
    else:
        d_gamma = transfer_matrix(1 - alpha)
        pull = d_gamma @ alpha
    lead = lambda c, leaf: c.reshape((n,) + (1,) * leaf.ndim)  # noqa: E731
    delta = _combine(-(d_gamma @ (d_eta * lr[None, :])), grads)
    delta = _tmap(lambda d, w: d - lead(pull, w) * w, delta, base)
    last = count - 1
    if eta is not None:
        delta = _tmap(lambda d, m: d + lead(d_gamma @ carry_in, m) * m, delta, mom)
        mom = _tmap(lambda m, g: carry_in[last] * m + jnp.tensordot(-(d_eta[last] * lr), g, axes=1),
                    mom, grads)
    weights = _tmap(lambda w, d: w + lead(scale[:n], w) * d, base, delta)
    o = jax.vmap(lambda w, x: _call(memory_fn, w, x, consts))(weights, q)
    full = count == n
    base = _tmap(lambda w, w0: jnp.where(full, w[last], w0), weights, base)
    delta = _tmap(lambda d: jnp.where(full, jnp.zeros_like(d[last]), d[last]), delta)
    return o, (base, delta, mom)


# --------------------------------------------------------------------------------------------
# Argument checks.


def _check(who, W0, q, k, v, lr, momentum, decay, mini_batch, position_scale, consts):
    if isinstance(mini_batch, bool) or not isinstance(mini_batch, (int, np.integer)) or mini_batch < 1:
        raise ValueError(f"{who}: mini_batch must be a positive int, got {mini_batch!r}")
    if np.ndim(q) != 4 or np.ndim(k) != 4 or np.ndim(v) != 4:
        raise ValueError(f"{who}: q, k must be [B, T, H, K] and v [B, T, H, V], got shapes "
                         f"{np.shape(q)}, {np.shape(k)}, {np.shape(v)}")
    if np.shape(q) != np.shape(k) or np.shape(v)[:3] != np.shape(k)[:3]:
        raise ValueError(f"{who}: q and k must have one shape [B, T, H, K] and v [B, T, H, V], got "
                         f"{np.shape(q)}, {np.shape(k)}, {np.shape(v)}")
    bth = np.shape(q)[:3]
    for name, gate in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if gate is not None and np.shape(gate) != bth:
            raise ValueError(f"{who}: {name} must have shape [B, T, H] = {bth}, got {np.shape(gate)}")
    heads = bth[2]
    for name, tree in (("W0", W0), ("consts", consts)):
        for leaf in jax.tree.leaves(tree):
            if np.ndim(leaf) < 1 or np.shape(leaf)[0] != heads:
                raise ValueError(f"{who}: every leaf of {name} needs a leading head axis H = {heads}, "
                                 f"got a leaf of shape {np.shape(leaf)}")
    if position_scale is not None and np.shape(position_scale) != (mini_batch,):
        raise ValueError(f"{who}: position_scale must have shape [mini_batch] = ({mini_batch},), "
                         f"got {np.shape(position_scale)}")


def _check_state(who, state, W0, batch, momentum):
    want = initial_state(W0, batch, momentum=momentum is not None)
    if jax.tree.structure(state) != jax.tree.structure(want):
        raise ValueError(f"{who}: initial_state has structure {jax.tree.structure(state)}, expected "
                         f"{jax.tree.structure(want)} (momentum given: {momentum is not None})")
    for got, exp in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
        if np.shape(got) != np.shape(exp):
            raise ValueError(f"{who}: initial_state leaf of shape {np.shape(got)} should be {np.shape(exp)}")


# --------------------------------------------------------------------------------------------
# Public entry points.


def step(memory_fn: Callable, state: dict, q_t, k_t, v_t, lr_t, momentum_t=None, decay_t=None, *,
         mini_batch: int, position_scale=None, consts=None, loss_fn: Callable = squared_error):
    """One token: q_t, k_t [B, H, K], v_t [B, H, V], gates [B, H]. Returns (state, o_t [B, H, V]).

    The state's dtype is kept (float32 states stay float32); the arithmetic runs in the promoted
    dtype of the inputs and the state, o_t comes back in q_t's dtype.
    """
    acc = jnp.promote_types(jnp.promote_types(q_t.dtype, jnp.float32), state["position"].dtype)
    scale = jnp.ones((mini_batch,), acc) if position_scale is None else jnp.asarray(position_scale, acc)
    cast = lambda t: None if t is None else _tmap(lambda a: jnp.asarray(a, acc), t)  # noqa: E731
    p = read_position(state["position"], mini_batch)
    mom = state.get("momentum")
    if (momentum_t is None) != (mom is None):
        raise ValueError("fast_weights.step: give momentum_t exactly when the state has a 'momentum' entry")

    def head(base, delta, m, p_, q, k, v, lr, eta, alpha, c):
        return _token(memory_fn, loss_fn, mini_batch, scale, c, base, delta, m, p_, q, k, v, lr, eta, alpha)

    per_head = jax.vmap(head, in_axes=(0, 0, 0, None, 0, 0, 0, 0, 0, 0, 0 if consts is not None else None))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None))
    base, delta, new_mom, o = per_row(cast(state["weights"]), cast(state["delta"]), cast(mom), p,
                                      cast(q_t), cast(k_t), cast(v_t), cast(lr_t), cast(momentum_t),
                                      cast(decay_t), cast(consts))
    dtype = state["position"].dtype
    back = lambda t: _tmap(lambda a: a.astype(dtype), t)  # noqa: E731
    new = {"weights": back(base), "delta": back(delta),
           "position": jnp.where(p == mini_batch - 1, 0, p + 1).astype(dtype)}
    if mom is not None:
        new["momentum"] = back(new_mom)
    return new, o.astype(q_t.dtype)


def _tokens(memory_fn, fresh, state, q, k, v, lr, eta, alpha, reset, kw):
    """The token path: ``step`` folded over time; a reset swaps in the fresh state first."""
    flags = jnp.zeros(q.shape[:2], bool) if reset is None else reset
    t_first = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)  # noqa: E731

    def body(carry, inputs):
        flag, q_t, k_t, v_t, lr_t, eta_t, alpha_t = inputs
        carry = _tmap(lambda f, c: jnp.where(_rows(flag, c), f, c), fresh, carry)
        return step(memory_fn, carry, q_t, k_t, v_t, lr_t, eta_t, alpha_t, **kw)

    final, o = lax.scan(body, state, tuple(t_first(a) for a in (flags, q, k, v, lr, eta, alpha)))
    return jnp.swapaxes(o, 0, 1), final


def _chunks(memory_fn, state, q, k, v, lr, eta, alpha, *, mini_batch, position_scale, consts, loss_fn):
    """The mini-batch path, valid when every row enters at position 0 and nothing resets."""
    batch, time = q.shape[:2]
    acc = jnp.promote_types(jnp.promote_types(q.dtype, jnp.float32), state["position"].dtype)
    scale = jnp.ones((mini_batch,), acc) if position_scale is None else jnp.asarray(position_scale, acc)
    cast = lambda t: None if t is None else _tmap(lambda a: jnp.asarray(a, acc), t)  # noqa: E731
    # [B, T, H, ...] -> [B, H, T, ...]: one (row, head) at a time below.
    heads_first = lambda a: None if a is None else jnp.moveaxis(cast(a), 2, 1)  # noqa: E731
    q, k, v, lr, eta, alpha = (heads_first(a) for a in (q, k, v, lr, eta, alpha))
    base, mom, c = cast(state["weights"]), cast(state.get("momentum")), cast(consts)
    # Pad time to whole mini-batches (repeating the last token keeps the padding finite); the
    # real tokens of the last mini-batch never see it, and its state is read after the real ones.
    n_batches, rest = -(-time // mini_batch), time % mini_batch
    pad = n_batches * mini_batch - time
    counts = jnp.full((n_batches,), mini_batch, jnp.int32).at[-1].set(rest or mini_batch)

    def batches(a):
        if a is None:
            return None
        a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1), mode="edge")
        return a.reshape((n_batches, mini_batch) + a.shape[1:])

    def one_row_head(base, mom, q, k, v, lr, eta, alpha, c):
        def body(carry, xs):
            w, _, m = carry
            o, carry = _mini_batch(memory_fn, loss_fn, scale, c, w, m, *xs)
            return carry, o

        xs = (counts,) + tuple(batches(a) for a in (q, k, v, lr, eta, alpha))
        (base, delta, mom), o = lax.scan(body, (base, _tmap(jnp.zeros_like, base), mom), xs)
        return o.reshape((-1,) + o.shape[2:])[:time], base, delta, mom

    per_head = jax.vmap(one_row_head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0 if consts is not None else None))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, None))
    o, base, delta, mom = per_row(base, mom, q, k, v, lr, eta, alpha, c)
    dtype = state["position"].dtype
    back = lambda t: _tmap(lambda a: a.astype(dtype), t)  # noqa: E731
    final = {"weights": back(base), "delta": back(delta),
             "position": jnp.full((batch,), rest, dtype)}
    if mom is not None:
        final["momentum"] = back(mom)
    return jnp.moveaxis(o, 1, 2), final


def apply_aligned(memory_fn: Callable, state: dict, q, k, v, lr, momentum=None, decay=None, *,
                  mini_batch: int, position_scale=None, consts=None, loss_fn: Callable = squared_error):
    """The chunked path alone, for callers that already know every row of ``state`` is at a
    mini-batch start (position 0) and nothing resets (as Titans' MAC segments are): no ``lax.cond``,
    so the token path is not compiled. Arguments as ``apply``; returns (o, final_state)."""
    return _chunks(memory_fn, state, q, k, v, lr, momentum, decay, mini_batch=mini_batch,
                   position_scale=position_scale, consts=consts, loss_fn=loss_fn)


def apply(memory_fn: Callable, W0, q, k, v, *, lr, momentum=None, decay=None, mini_batch: int,
          position_scale=None, consts=None, loss_fn: Callable = squared_error, initial_state=None,
          reset=None, reverse: bool = False, mode: str = "auto"):
    """The memory over a whole sequence. Returns (o [B, T, H, V] in q's dtype, final_state).

    ``initial_state`` (None: fresh from W0) must have a "momentum" entry exactly when ``momentum`` is
    given. ``reset`` [B, T] restarts from the fresh state (W0, position 0) at the flagged tokens;
    ``reverse=True`` runs time backwards (a flag still marks where a segment starts). The state
    keeps its dtype (float32, or float64 when made so); see the module docstring for the modes.
    """
    who = "fast_weights.apply"
    _check(who, W0, q, k, v, lr, momentum, decay, mini_batch, position_scale, consts)
    if mode not in ("auto", *MODES):
        raise ValueError(f"{who}: mode={mode!r} is not supported; choose one of {('auto', *MODES)}")
    batch, time = q.shape[:2]
    reset = check_reset(who, reset, batch, time)
    came_fresh = initial_state is None
    if came_fresh:
        # float64 inputs keep a float64 state (for float64 checks); otherwise states are float32.
        state_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    else:
        _check_state(who, initial_state, W0, batch, momentum)
        state_dtype = initial_state["position"].dtype
    fresh = _tmap(lambda a: a.astype(state_dtype), _fresh_state(W0, batch, momentum=momentum is not None))
    if came_fresh:
        initial_state = fresh
    if reverse:
        flip = lambda a: None if a is None else jnp.flip(a, axis=1)  # noqa: E731
        q, k, v, lr, momentum, decay = (flip(a) for a in (q, k, v, lr, momentum, decay))
        reset = reset_for_reverse(reset)
    kw = {"mini_batch": mini_batch, "position_scale": position_scale, "consts": consts, "loss_fn": loss_fn}
    args = (q, k, v, lr, momentum, decay)

    def tokens(operands):
        return _tokens(memory_fn, fresh, operands[0], *args, operands[1], kw)

    def chunks(operands):
        return _chunks(memory_fn, operands[0], *args, **kw)

    if mode == "sequential":
        o, final = tokens((initial_state, reset))
    elif came_fresh and reset is None:
        o, final = chunks((initial_state, reset))
    else:
        aligned = jnp.all(read_position(initial_state["position"], mini_batch) == 0)
        if reset is not None:
            aligned = aligned & ~jnp.any(reset)
        o, final = lax.cond(aligned, chunks, tokens, (initial_state, reset))
    if reverse:
        o = jnp.flip(o, axis=1)
    return o, final


def _lin(a, x, b, y):
    """The pytree a·x + b·y."""
    return _tmap(lambda u, w: a * u + b * w, x, y)


def reference(memory_fn: Callable, W0, q, k, v, *, lr, momentum=None, decay=None, mini_batch: int,
              position_scale=None, consts=None, loss_fn: Callable = squared_error, initial_state=None,
              reset=None):
    """A plain Python loop over rows, tokens and heads, written from the equations with the
    un-scaled weights W̃ carried explicitly (float64 when the inputs are). For tests."""
    batch, time, heads = q.shape[:3]
    scale = np.ones(mini_batch) if position_scale is None else position_scale

    def head(tree, h):
        return None if tree is None else _tmap(lambda a: a[h], tree)

    def stack(trees):
        return _tmap(lambda *a: jnp.stack(a), *trees)

    def fresh_row():
        w0 = [head(W0, h) for h in range(heads)]
        return w0, list(w0), [_tmap(jnp.zeros_like, w) for w in w0], 0

    def entering_row(row):
        base = [head(row["weights"], h) for h in range(heads)]
        pos = int(np.floor(np.asarray(row["position"])))
        virtual = [_lin(1.0, w, 1.0, head(row["delta"], h)) if pos else w for h, w in enumerate(base)]
        mom = ([head(row["momentum"], h) for h in range(heads)] if "momentum" in row
               else [_tmap(jnp.zeros_like, w) for w in base])
        return base, virtual, mom, pos

    outputs, finals = [], []
    for b in range(batch):
        if initial_state is None:
            base, virtual, mom, pos = fresh_row()
        else:
            base, virtual, mom, pos = entering_row(_tmap(lambda a, b=b: a[b], initial_state))
        row_out = []
        for t in range(time):
            if reset is not None and bool(reset[b, t]):
                base, virtual, mom, pos = fresh_row()
            outs = []
            for h in range(heads):
                c = head(consts, h)
                if pos == 0:
                    virtual[h] = base[h]
                grad = _inner_grad(memory_fn, loss_fn, base[h], k[b, t, h], v[b, t, h], c)
                eta = 0.0 if momentum is None else momentum[b, t, h]
                mom[h] = _lin(eta, mom[h], -lr[b, t, h], grad)
                keep = 1.0 if decay is None else 1.0 - decay[b, t, h]
                virtual[h] = _lin(keep, virtual[h], 1.0, mom[h])
                weights = _lin(1.0 - scale[pos], base[h], scale[pos], virtual[h])
                outs.append(_call(memory_fn, weights, q[b, t, h], c))
                if pos == mini_batch - 1:
                    base[h] = weights
            row_out.append(jnp.stack(outs))
            pos = (pos + 1) % mini_batch
        outputs.append(jnp.stack(row_out))
        inside = float(pos > 0)
        final = {"weights": stack(base), "position": jnp.asarray(float(pos)),
                 "delta": stack([_lin(inside, w, -inside, w0) for w, w0 in zip(virtual, base, strict=True)])}
        if momentum is not None:
            final["momentum"] = stack(mom)
        finals.append(final)
    return jnp.stack(outputs), stack(finals)
