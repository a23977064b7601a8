"""Pieces shared by the segment-level recurrent Transformers (``block_recurrent``, ``rmt``).

These models read a sequence in segments (blocks) of ``L`` tokens and carry a few memory vectors
from one segment to the next. To make ``step`` exact, their state also holds what the current,
unfinished segment needs, plus the position inside it as a float32 ``count`` [B]. The count is
always read with ``floor`` (``read_count``): the exact integer the model stores survives any
perturbation in [0, 1), and its gradient is zero in ``step`` and ``apply`` alike.

``run_segments`` is the one driver of ``apply`` for both models:

* the token path folds the model's own ``step`` over time with ``lax.scan`` (a reset swaps the
  carried state for the fresh one), so it equals ``step`` by construction and handles a state that
  enters partway through a segment and resets anywhere;
* the segment path (``aligned``, the model's own) runs whole segments at once; it is valid only when
  every row enters at a segment start (count 0), which ``lax.cond`` checks at run time, and no
  ``reset`` is given (with a reset array, even an all-False one, the token path is taken, which
  keeps one compiled path for packed sequences).

``mode="sequential"`` always takes the token path; ``mode="chunked"`` (and ``"auto"``) the segment
path when it is valid, else the token path. ``reverse=True`` flips time around either path.

Also here: small Transformer pieces (multi-head attention with an optional mask and per-key
weights, an MLP with its hidden layer exposed) written once for both models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.models._common import dense_init
from zoo.models._matrix_common import check_positive_int, project
from zoo.ops._time import reset_for_reverse

MODES = ("chunked", "sequential")


# --------------------------------------------------------------------------------------------
# Config checks.


def check_heads(model: str, d_model: int, n_heads: int) -> None:
    check_positive_int(model, "d_model", d_model)
    check_positive_int(model, "n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(f"{model}: d_model = {d_model} must be a multiple of n_heads = {n_heads}")


# --------------------------------------------------------------------------------------------
# Transformer pieces.


def attention(q, k, v, *, mask=None, weights=None):
    """Multi-head softmax attention, scores scaled by K^-1/2.

    q [..., Q, H, K], k [..., S, H, K], v [..., S, H, V] -> [..., Q, H, V] in q's dtype.
    ``mask`` [Q, S] (bool, True = visible) and ``weights`` [..., S] (a multiplier of each key's
    exp-score, 0 = an empty slot, as in ``zoo.ops.softmax``) are optional; every query must see at
    least one key of positive weight. Scores and the softmax run in float32 (float64 for float64).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("...qhk,...shk->...hqs", q.astype(acc), k.astype(acc)) / jnp.sqrt(
        jnp.asarray(q.shape[-1], acc))
    seen = jnp.ones(scores.shape, bool)
    if mask is not None:
        seen = seen & mask
    if weights is not None:
        seen = seen & (weights[..., None, None, :] > 0)
    # Invisible keys are left out of the maximum, so they cannot push the others to underflow.
    top = lax.stop_gradient(jnp.max(jnp.where(seen, scores, -jnp.inf), axis=-1, keepdims=True))
    e = jnp.exp(jnp.where(seen, scores - top, -jnp.inf))
    if weights is not None:
        e = e * weights[..., None, None, :].astype(acc)
    probs = e / jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("...hqs,...shv->...qhv", probs, v.astype(acc))
    return out.astype(q.dtype)


def mlp_init(key: jax.Array, d: int, hidden: int) -> dict:
    k_in, k_out = jax.random.split(key)
    return {"w_in": dense_init(k_in, d, hidden), "b_in": jnp.zeros((hidden,), jnp.float32),
            "w_out": dense_init(k_out, hidden, d), "b_out": jnp.zeros((d,), jnp.float32)}


def mlp_hidden(params: dict, x: jax.Array) -> jax.Array:
    """The MLP's hidden layer GeLU(x W_in + b_in) (a gate may read it, as in meliad's MLP)."""
    return jax.nn.gelu(project(x, params["w_in"], params["b_in"]))


def mlp_output(params: dict, hidden: jax.Array) -> jax.Array:
    return project(hidden, params["w_out"], params["b_out"])


# --------------------------------------------------------------------------------------------
# The position inside a segment, and the apply driver.


def read_count(count: jax.Array, size: int) -> jax.Array:
    """The stored float32 count as an int32 in [0, size - 1]: floor, so that any perturbation in
    [0, 1) of the exact integer reads the same, and its gradient is zero."""
    return jnp.clip(jnp.floor(lax.stop_gradient(count)), 0, size - 1).astype(jnp.int32)


def where_rows(flag: jax.Array, new, old):
    """Per batch row: ``new`` where ``flag`` [B] else ``old`` (pytrees of [B, ...] leaves)."""
    def pick(n, o):
        return jnp.where(flag.reshape((-1,) + (1,) * (o.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


def scan_steps(step, params, xs, state, reset, fresh):
    """``step`` folded over time; where ``reset[:, t]`` the carried state becomes ``fresh`` first."""
    flags = jnp.zeros(xs.shape[:2], bool) if reset is None else reset

    def body(carry, inputs):
        x_t, flag = inputs
        return step(params, where_rows(flag, fresh, carry), x_t)

    final, ys = lax.scan(body, state, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(flags, 0, 1)))
    return jnp.swapaxes(ys, 0, 1), final


def run_segments(step, aligned, params, xs, state, reset, mode, reverse, *, fresh, size):
    """``apply`` of a segment model; see the module docstring.

    ``step(params, state, x_t)`` is the model's raw step; ``aligned(params, xs, state)`` runs xs
    [B, T, D] as whole segments from a state at a segment start, with no reset. ``state["count"]``
    [B] is the position inside the current segment of ``size`` tokens.
    """
    if reverse:
        xs = jnp.flip(xs, axis=1)
        reset = reset_for_reverse(reset)

    def tokens(operands):
        return scan_steps(step, params, *operands, fresh)

    def segments(operands):
        return aligned(params, operands[0], operands[1])

    if mode == "sequential" or reset is not None:
        # Packed sequences (a reset array) take the token path: segments then start anywhere.
        ys, final = tokens((xs, state, reset))
    else:
        at_start = jnp.all(read_count(state["count"], size) == 0)
        ys, final = lax.cond(at_start, segments, tokens, (xs, state, reset))
    if reverse:
        ys = jnp.flip(ys, axis=1)
    return ys, final

