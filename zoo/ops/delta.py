"""The delta-rule engine: a [K, V] memory per head written by error correction, optionally decayed.

Per batch row and head, with a float32 state S (whatever the input dtype)::

    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ       α_t = exp(g_t), β_t in (0, 1)
    o_t = S_tᵀ q_t · scale

i.e. the state first decays, then the value it predicts for k_t, (α_t S_{t-1})ᵀ k_t, is moved a
fraction β_t of the way towards v_t (one step of online regression on ||Sᵀk - v||²/2 with learning
rate β_t when ||k|| = 1). With g = None (α = 1) it is the delta rule of DeltaNet (I. Schlag et al.,
"Linear Transformers Are Secretly Fast Weight Programmers", ICML 2021; S. Yang et al., "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length", NeurIPS 2024); with a log decay g it
is the gated delta rule (S. Yang, J. Kautz, A. Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule", ICLR 2025). Longhorn (zoo/models/longhorn.py) runs the diagonal approximation of
this rule that its authors' code computes, on the ``diagonal`` engine.

Shapes (FLA's layout)::

    q, k           [B, T, H, K]        v [B, T, H, V]
    beta           [B, T, H]           the writing strength, in (0, 1) (not checked: values are traced)
    log_decay      None or [B, T, H]   g = log α <= 0 (positive g is accepted but may overflow the
                                       chunked form's exp; the decays are meant to be <= 1)
    initial_state  [B, H, K, V] or None (zeros); final states are float32 (float64 under x64)
    reset          bool [B, T]: True drops the state before step t (a zero state, packed sequences)
    o              [B, T, H, V] in v's dtype

Public API::

    o, final_state = apply(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, reset=None,
                           reverse=False, mode="auto", chunk_size=None, implementation=None)
    new_state, o_t = step(state, q_t, k_t, v_t, beta_t, log_decay_t=None, *, scale=None)
    o, final_state = reference(...)      # a plain Python loop, float64 under x64

``scale`` multiplies q (default K^-1/2). ``reverse=True`` runs from the last step to the first
(resets keep their meaning: a flag at t starts a segment at t).

Modes (all equal ``reference`` in values and, by autodiff, in gradients):

* ``"chunked"`` (``"auto"``): the WY / UT form of ``zoo/ops/delta_chunks.py``: per chunk of C steps
  (default 64) one unit-triangular solve and matmuls, then a scan over the T / C chunks.
* ``"sequential"``: a scan over time carrying the [K, V] state per head.

``implementation`` ("xla", "pallas" or a list tried in turn; None: Pallas on GPU/TPU when
``mode="auto"``, XLA otherwise) picks ``pallas_kernels.chunked_delta`` (the same WY / UT chunked form
with the state on chip) for the calls it covers; anything else runs XLA (``zoo/ops/_dispatch.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from zoo.ops._checks import check_float, check_positive_int, check_qkv, check_shape
from zoo.ops._checks import check_mode as resolve_mode
from zoo.ops._dispatch import pallas_mode, sequence_hook, use_pallas
from zoo.ops._time import check_reset, reset_for_reverse
from zoo.ops.delta_chunks import DEFAULT_CHUNK, Problem, chunked

MODES = ("chunked", "sequential")


# --------------------------------------------------------------------------------------------
# Validation at the public boundary (shapes and dtypes only; nothing is traced here).


def check_mode(who: str, mode: str) -> str:
    return resolve_mode(who, mode, MODES, auto="chunked")


def check_chunk_size(who: str, chunk_size, mode: str) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK
    chunk_size = check_positive_int(who, "chunk_size", chunk_size)
    if mode != "chunked":
        raise ValueError(f"{who}: chunk_size={chunk_size} is given but mode={mode!r} has no chunks")
    return chunk_size


def _validate(who, q, k, v, beta, log_decay, initial_state, *, time_axis=True, suffix=""):
    """Checks every argument; returns (batch, T, H, K, V). ``time_axis=False`` for one-token steps,
    whose arguments are named with ``suffix`` ("_t")."""
    lead = "[B, T, H" if time_axis else "[B, H"
    name = {a: a + suffix for a in ("q", "k", "v", "beta", "log_decay")}
    for arg, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        check_float(who, name[arg], x)
    batch, time, heads, dk, dv, prefix = check_qkv(who, q, k, v, time_axis=time_axis, suffix=suffix)
    check_shape(who, name["beta"], beta, prefix, f"{lead}] (one per head and step)")
    if log_decay is not None:
        check_float(who, name["log_decay"], log_decay)
        check_shape(who, name["log_decay"], log_decay, prefix, f"{lead}] (one decay per head and step)")
    if initial_state is not None:
        arg = "initial_state" if time_axis else "state"
        check_float(who, arg, initial_state)
        check_shape(who, arg, initial_state, (batch, heads, dk, dv), "[B, H, K, V]")
    return batch, time, heads, dk, dv


# --------------------------------------------------------------------------------------------
# The problem every mode solves.


def _accumulation_dtype(*xs):
    dtype = jnp.result_type(*[x.dtype for x in xs if x is not None])
    return jnp.promote_types(jnp.float32, dtype)


def _prepare(q, k, v, beta, log_decay, scale, initial_state, reset, reverse, time_axis=True) -> Problem:
    if not time_axis:
        q, k, v, beta, log_decay = (None if x is None else x[:, None] for x in (q, k, v, beta, log_decay))
    batch, time, heads, dk = q.shape
    acc = _accumulation_dtype(q, k, v, beta, log_decay)
    scale = dk ** -0.5 if scale is None else scale
    q = q.astype(acc) * scale
    k, v, beta = k.astype(acc), v.astype(acc), beta.astype(acc)
    g = None if log_decay is None else log_decay.astype(acc)
    if initial_state is None:
        S0 = jnp.zeros((batch, heads, dk, v.shape[-1]), acc)
    else:
        S0 = initial_state.astype(acc)
    reset = None if reset is None else jnp.asarray(reset).astype(bool)
    if reverse:
        q, k, v, beta, g = (None if x is None else jnp.flip(x, axis=1) for x in (q, k, v, beta, g))
        reset = reset_for_reverse(reset)
    return Problem(q, k, v, beta, g, reset, S0)


def _delta_step(S, q_t, k_t, v_t, beta_t, g_t):
    """One step for all heads: S [B, H, K, V]; q_t, k_t [B, H, K]; v_t [B, H, V]; beta_t, g_t [B, H].
    Decay (g_t None: none), then correct the decayed memory's prediction for k_t towards v_t (FLA's
    recurrent form)."""
    if g_t is not None:
        S = jnp.exp(g_t)[..., None, None] * S
    error = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S)
    S = S + k_t[..., :, None] * (beta_t[..., None] * error)[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)


def _sequential(p: Problem):
    def body(S, xs):
        q_t, k_t, v_t, beta_t, g_t, reset_t = xs
        if reset_t is not None:
            S = jnp.where(reset_t[:, None, None, None], 0, S)
        return _delta_step(S, q_t, k_t, v_t, beta_t, g_t)

    time_major = [None if x is None else jnp.moveaxis(x, 1, 0) for x in (p.q, p.k, p.v, p.beta, p.g, p.reset)]
    S, o = lax.scan(body, p.S0, time_major)
    return jnp.moveaxis(o, 0, 1), S


@functools.partial(jax.jit, static_argnames=("scale", "reverse", "mode", "chunk"))
def _apply(q, k, v, beta, log_decay, initial_state, reset, *, scale, reverse, mode, chunk):
    p = _prepare(q, k, v, beta, log_decay, scale, initial_state, reset, reverse)
    # A sequence shorter than the chunk is one chunk of its own length (no padding to compute).
    o, S = _sequential(p) if mode == "sequential" else chunked(p, min(chunk, q.shape[1]))
    if reverse:
        o = jnp.flip(o, axis=1)
    return o.astype(v.dtype), S


def apply(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, reset=None, reverse: bool = False,
          mode: str = "auto", chunk_size=None, implementation=None):
    """The recurrence over axis 1; returns ``(o, final_state)``. See the module docstring.

    ``implementation`` ("xla", "pallas" or a list tried in turn; None: Pallas on GPU/TPU when
    ``mode="auto"``) picks ``pallas_kernels.chunked_delta`` for the calls it covers (q, k, v all
    float32 or all bfloat16, β, g and the initial state at most float32, chunk sizes that
    are powers of two >= 16); anything else runs XLA, with one warning when Pallas was asked for."""
    who = "delta.apply"
    hook = sequence_hook()
    if hook is not None:        # zoo.parallel.sequence.sharded_time: time split over a mesh axis
        return hook("delta", q, k, v, beta, log_decay, scale=scale, initial_state=initial_state, reset=reset,
                    reverse=reverse, mode=mode, chunk_size=chunk_size, implementation=implementation)
    mode, implementation = pallas_mode(who, mode, implementation)
    requested_mode = mode
    mode = check_mode(who, mode)
    batch, time, *_ = _validate(who, q, k, v, beta, log_decay, initial_state)
    chunk = check_chunk_size(who, chunk_size, mode)
    reset = check_reset(who, reset, batch, time)
    scale = None if scale is None else float(scale)
    unsupported = _pallas_unsupported(q, k, v, beta, log_decay, initial_state, chunk_size)
    if use_pallas(who, implementation, requested_mode, unsupported):
        return _pallas(q, k, v, beta, log_decay, initial_state, reset, scale, bool(reverse),
                       chunk_size or DEFAULT_CHUNK)
    return _apply(q, k, v, beta, log_decay, initial_state, reset, scale=scale, reverse=bool(reverse),
                  mode=mode, chunk=chunk)


def _pallas(q, k, v, beta, log_decay, initial_state, reset, scale, reverse: bool, chunk: int):
    """pallas_kernels.chunked_delta; ``reverse`` runs it forwards over the flipped sequence, with the
    flags moved as ``_prepare`` moves them for the XLA modes."""
    from pallas_kernels.chunked_delta import chunked_delta  # Pallas loads only when asked for

    if reverse:
        q, k, v, beta, log_decay = (None if x is None else jnp.flip(x, axis=1)
                                    for x in (q, k, v, beta, log_decay))
        reset = reset_for_reverse(reset)
    o, S = chunked_delta(q, k, v, beta, log_decay, initial_state, reset=reset, scale=scale, chunk_size=chunk)
    return (jnp.flip(o, axis=1) if reverse else o), S


def _pallas_unsupported(q, k, v, beta, log_decay, initial_state, chunk_size):
    """Why pallas_kernels.chunked_delta cannot run this call, or None when it can."""
    dtypes = {x.dtype for x in (q, k, v)}
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return "chunk sizes other than powers of two >= 16"
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.float32, jnp.bfloat16):
        return "inputs other than all float32 or all bfloat16"
    # The kernel keeps a float32 state: wider β, g or initial states (float64 under x64) stay on XLA.
    if any(x is not None and jnp.finfo(x.dtype).bits > 32 for x in (beta, log_decay, initial_state)):
        return "float64 beta, log_decay or initial_state"
    return None


@functools.partial(jax.jit, static_argnames=("scale",))
def _step(state, q_t, k_t, v_t, beta_t, log_decay_t, *, scale):
    p = _prepare(q_t, k_t, v_t, beta_t, log_decay_t, scale, state, None, False, time_axis=False)
    g_t = None if p.g is None else p.g[:, 0]
    S, o_t = _delta_step(p.S0, p.q[:, 0], p.k[:, 0], p.v[:, 0], p.beta[:, 0], g_t)
    return S, o_t.astype(v_t.dtype)


def step(state, q_t, k_t, v_t, beta_t, log_decay_t=None, *, scale=None):
    """One token: ``(new_state, o_t)``; q_t, k_t [B, H, K], v_t [B, H, V], beta_t and log_decay_t
    [B, H]; ``state`` [B, H, K, V] as ``initial_state`` of ``apply`` (None: zeros)."""
    _validate("delta.step", q_t, k_t, v_t, beta_t, log_decay_t, state, time_axis=False, suffix="_t")
    return _step(state, q_t, k_t, v_t, beta_t, log_decay_t, scale=None if scale is None else float(scale))


def reference(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, reset=None,
              reverse: bool = False):
    """A plain Python loop over time written from the equation, with the transition matrix
    α_t (I - β_t k_t k_tᵀ) built explicitly (float64 under x64): the check for every mode. It shares
    only argument preparation with the modes."""
    who = "delta.reference"
    batch, time, heads, dk, _ = _validate(who, q, k, v, beta, log_decay, initial_state)
    reset = check_reset(who, reset, batch, time)
    p = _prepare(q, k, v, beta, log_decay, scale, initial_state, reset, reverse)
    eye = jnp.eye(dk, dtype=p.S0.dtype)
    S, outs = p.S0, []
    for t in range(time):
        if p.reset is not None:
            S = jnp.where(p.reset[:, t, None, None, None], jnp.zeros_like(S), S)
        k_t, beta_t = p.k[:, t], p.beta[:, t, :, None, None]
        projection = eye - beta_t * k_t[..., :, None] * k_t[..., None, :]          # I - β k kᵀ
        transition = projection if p.g is None else jnp.exp(p.g[:, t])[..., None, None] * projection
        S = transition @ S + beta_t * k_t[..., :, None] * p.v[:, t, :, None, :]
        outs.append(jnp.einsum("bhk,bhkv->bhv", p.q[:, t], S))
    o = jnp.stack(outs, axis=1)
    if reverse:
        o = jnp.flip(o, axis=1)
    return o.astype(v.dtype), S
