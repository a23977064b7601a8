"""The diagonal engine: the element-wise linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t``.

Shapes (letters as in DESIGN.md; ``...`` is any number of feature axes, e.g. [H, N] or [D])::

    a              [B, T, ...]  decay; may instead be [...] (time-invariant, e.g. LRU's λ) or any
                                shape of b's rank with size-1 axes, broadcast against b
    b              [B, T, ...]  input
    initial_state  [B, ...]     float32 (zeros when None)
    reset          [B, T] bool  True: the state before step t is discarded (replaced by zeros)
    h              [B, T, ...]  in b's dtype;  final_state [B, ...] float32

Public API::

    h, final_state = apply(a, b, *, initial_state=None, reset=None, reverse=False, mode="auto",
                           chunk_size=None, implementation=None)
    h, final_state = apply_log(log_a, b=None, *, log_b=None, initial_state=None, reset=None,
                               reverse=False, mode="auto")
    h_new          = step(a_t, b_t, h)                   # one step; a_t, b_t, h are [B, ...]
    h, final_state = reference(a, b, *, initial_state=None, reset=None, reverse=False)

Modes of ``apply`` (one algorithm each, all equal to ``reference`` in values and gradients). Every
mode's gradient is a ``custom_vjp`` built on one identity: the adjoint of the recurrence is the same
recurrence run the other way on the cotangents, ``g_t = dh_t + a_{t+1} g_{t+1}``, and then
``da_t = g_t h_{t-1}``, ``db_t = g_t``, ``d initial_state = a_first g_first``. So each backward pass
is its own mode's forward pass plus one element-wise product, and only ``h`` is kept for it.

* ``"sequential"``: one pass over time that reads the batch-major layout in place (no transposes)
  and writes each step into a preallocated output. See ``zoo/ops/diagonal_sequential.py``.
* ``"associative"``: ``lax.associative_scan`` over time with the pair combine
  ``(a₁, b₁) ∘ (a₂, b₂) = (a₂ a₁, a₂ b₁ + b₂)``: O(log T) depth, for accelerators.
* ``"chunked"``: two levels. Inside each chunk of ``chunk_size`` steps (default 64) an associative
  scan from a zero state gives the cumulative decay ``A`` and the local state ``H``; a scan over
  the chunks carries the state across chunk boundaries; then ``h = H + A ⊙ h_in``. Only products
  of decays appear, never a division by a cumulative decay, so a decay near (or exactly) zero
  cannot underflow into ``0/0``. T not a multiple of ``chunk_size`` is padded with identity steps
  (a = 1, b = 0), which leave the values, the final state and the gradients unchanged.
* ``"auto"``: ``"sequential"`` on CPU, ``"associative"`` on GPU/TPU (``"chunked"`` when a
  ``chunk_size`` is given). Measured with ``experiments/bench/diagonal.py`` on 2 CPU cores (B=8,
  T=4096, D=256 float32, median of 7, load average 1.1-1.4), forward / forward+backward:
  sequential 16.8 / 54.5 ms (6.0 GB/s forward), associative 78 / 182 ms, chunked 86 / 208 ms,
  ``lax.scan`` behind the transposes the [B, T, D] layout needs 38.5 / 88.7 ms, and one XLA
  element-wise pass over the same bytes (no recurrence) 10.2 ms. The parallel forms move several
  times the data of one pass, which pays only where many cores would otherwise idle.
  The GPU/TPU choice is not measured yet (no device here). ``implementation=`` (below) runs the
  Pallas kernel ``pallas_kernels.diagonal_scan`` instead, by default on GPU/TPU when ``mode="auto"``.

``reverse=True`` runs time backwards; ``reset`` keeps its meaning (a flag marks where a segment
starts), following ``zoo/ops/_time.py``: running backwards, the carry from ``t + 1`` into ``t`` is
dropped when ``t + 1`` starts a segment.

Complex recurrences (LRU, S5): ``a``, ``b`` and ``initial_state`` may be complex arrays (``h`` is
returned complex) or ``(real, imag)`` tuples of real arrays (``h`` and ``final_state`` are returned
as tuples). If any of them is complex, the others are promoted (a real ``a`` is a real decay).
Internally everything is a real pair, so no kernel ever sees a complex dtype.

Log space (minGRU / minLSTM, "Were RNNs All We Needed?"): ``apply_log`` takes the decay as
``log_a`` and ``b`` either signed and linear or as ``log_b`` (the paper's form, b > 0), so a model
writes its gates once in the stable log form (``log_a = -softplus(k)``) whatever the mode:

* ``"associative"`` is the paper's log-space parallel scan, written as an associative scan with the
  combine ``(la₁, lb₁) ∘ (la₂, lb₂) = (la₁ + la₂, logaddexp(la₂ + lb₁, lb₂))``. A signed ``b`` (and
  state) is split as ``b = b⁺ - b⁻`` and the two non-negative parts are scanned side by side with
  the same ``log_a``; ``h = exp(log h⁺) - exp(log h⁻)``. This replaces the paper's
  ``logcumsumexp(log b - cumsum(log a))``, which loses all precision once ``|cumsum(log a)|`` is
  large (a decay near 0 over a long sequence). Its gradient is a ``custom_vjp`` whose backward pass
  is the same log-space scan run the other way on the signed cotangents, so exact zeros
  (``log_a = -inf``, ``b = 0``, a zero part of the state) give finite values and the right
  gradients, never ``0 · inf``.
* ``"sequential"`` exponentiates once and runs the linear sequential pass. In sequential order the
  linear form is already stable (no cumulative product, no division), and it is about 30x faster
  on CPU than a log-space step loop, whose exp/log per element per step dominate. Near a = 1 the
  two forms lose the same float32 precision per step (``log a`` below ulp(log h) is lost in
  ``log a + log h`` just as ``1 - a`` below 6e-8 is lost in ``a``).

Differentiation: every mode has a ``custom_vjp`` (reverse mode: ``jax.grad``, ``jax.vjp``); forward
mode (``jax.jvp``, ``jax.jacfwd``) is not supported through ``apply`` and ``apply_log``, only
through ``reference``.

Dtypes: the state and all accumulation are float32 whatever the input dtype (bfloat16 inputs give
bfloat16 ``h``); only float64 inputs (with x64 enabled) are accumulated in float64, so that tests
can check the algorithms in float64.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops._dispatch import pallas_mode, sequence_hook, use_pallas
from zoo.ops._time import check_reset, reset_for_reverse
from zoo.ops.diagonal_pairs import Field, add, conj, fmap, mul, real_part, shift_from_previous, zero_where
from zoo.ops.diagonal_sequential import scan_batch_major

MODES = ("sequential", "associative", "chunked")
LOG_MODES = ("sequential", "associative")
DEFAULT_CHUNK_SIZE = 64


# --------------------------------------------------------------------------------------------
# The pair combine: composition of affine maps.


def _combine(earlier, later):
    """Compose two affine maps h -> a h + b: apply ``earlier`` first, then ``later``."""
    (a1, b1), (a2, b2) = earlier, later
    return mul(a2, a1), add(mul(a2, b1), b2)


# --------------------------------------------------------------------------------------------
# Validation and normalisation at the public boundary.


class _Form(NamedTuple):
    kind: str            # "real", "complex" or "pair"
    out_dtype: Any       # dtype of h (real dtype for pairs, complex dtype for complex)


def _float_part(who: str, arg: str, x):
    """x as (value, kind) where value is a real array or a (real, imag) pair of real arrays."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{who}: {arg} given as a tuple must be (real, imag), got {len(x)} items")
        re, im = (_float_part(who, f"{arg}[{i}]", v)[0] for i, v in enumerate(x))
        if isinstance(re, tuple) or isinstance(im, tuple):
            raise ValueError(f"{who}: {arg} = (real, imag) must hold real arrays")
        if re.shape != im.shape:
            raise ValueError(f"{who}: {arg} real part has shape {re.shape} but imaginary part {im.shape}")
        return (re, im), "pair"
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = x.dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.asarray(x)
        return (jnp.real(x), jnp.imag(x)), "complex"
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{who}: {arg} has dtype {dtype} (shape {np.shape(x)}); a float or complex dtype "
                         f"is needed")
    return jnp.asarray(x), "real"


def _shape(x: Field) -> tuple[int, ...]:
    return tuple(real_part(x).shape)


def _dtype(x: Field):
    return real_part(x).dtype


def _to_pair(x: Field) -> Field:
    return x if isinstance(x, tuple) else (x, jnp.zeros_like(x))


def _astype(x: Field, dtype) -> Field:
    return fmap(lambda v: v.astype(dtype), x)


def _accumulation_dtype(dtype):
    return jnp.promote_types(jnp.float32, dtype)


class _Problem(NamedTuple):
    a: Field          # b's rank; size-1 axes where broadcast; accumulation dtype
    b: Field          # [B, T, ...], accumulation dtype
    h0: Field         # [B, ...], accumulation dtype
    reset: Any        # bool [B, T] or None
    form: _Form


def _check_mode(who: str, mode: str, modes) -> None:
    if mode != "auto" and mode not in modes:
        raise ValueError(f"{who}: mode={mode!r} is not supported; choose one of {('auto', *modes)}")


def _check_decay_shape(who: str, arg: str, a_shape, b_shape):
    """The shape a is reshaped to (b's rank), or ValueError."""
    feat = b_shape[2:]
    if len(a_shape) == len(b_shape) - 2 and tuple(a_shape) == tuple(feat):
        return (1, 1, *feat)                      # time-invariant decay
    if len(a_shape) == len(b_shape) and all(s in (1, t) for s, t in zip(a_shape, b_shape, strict=True)):
        return tuple(a_shape)
    raise ValueError(
        f"{who}: {arg} has shape {tuple(a_shape)} but b has {tuple(b_shape)}; {arg} must be [B, T, ...] "
        f"like b (size-1 axes broadcast) or [...] = {tuple(feat)} for a time-invariant decay"
    )


def _prepare(who: str, a, b, initial_state, reset, *, a_name: str = "a") -> _Problem:
    b, b_kind = _float_part(who, "b", b)
    a, a_kind = _float_part(who, a_name, a)
    b_shape = _shape(b)
    if len(b_shape) < 2:
        raise ValueError(f"{who}: b must have shape [B, T, ...], got {b_shape}")
    if b_shape[1] == 0:
        raise ValueError(f"{who}: b has shape {b_shape} with T = 0 steps; at least one step is needed")
    a_shape = _check_decay_shape(who, a_name, _shape(a), b_shape)
    a = fmap(lambda v: v.reshape(a_shape), a)
    kinds = [a_kind, b_kind]
    state_shape = (b_shape[0], *b_shape[2:])
    if initial_state is not None:
        initial_state, h_kind = _float_part(who, "initial_state", initial_state)
        if _shape(initial_state) != state_shape:
            raise ValueError(f"{who}: initial_state must have shape [B, ...] = {state_shape} to match b "
                             f"{b_shape}, got {_shape(initial_state)}")
        kinds.append(h_kind)
    reset = check_reset(who, reset, b_shape[0], b_shape[1])

    kind = "pair" if "pair" in kinds else "complex" if "complex" in kinds else "real"
    real_dtype = _dtype(b)
    acc = _accumulation_dtype(real_dtype)
    if kind == "complex":
        out_dtype = jnp.result_type(real_dtype, jnp.complex64)
    else:
        out_dtype = real_dtype
    if kind != "real":
        a, b = _to_pair(a), _to_pair(b)
        if initial_state is not None:
            initial_state = _to_pair(initial_state)
    a, b = _astype(a, acc), _astype(b, acc)
    if initial_state is None:
        zeros = jnp.zeros(state_shape, acc)
        initial_state = (zeros, zeros) if kind != "real" else zeros
    else:
        initial_state = _astype(initial_state, acc)
    return _Problem(a, b, initial_state, reset, _Form(kind, out_dtype))


def _finish(h: Field, final: Field, form: _Form):
    """Cast to the caller's form: h in b's dtype, the final state float32 (float64 under x64 inputs)."""
    if form.kind == "complex":
        h = (h[0] + 1j * h[1]).astype(form.out_dtype)
        final = final[0] + 1j * final[1]
        return h, final
    return _astype(h, form.out_dtype), final


def _check_chunk_size(who: str, chunk_size) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"{who}: chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _auto_mode() -> str:
    return "sequential" if jax.default_backend() == "cpu" else "associative"


# --------------------------------------------------------------------------------------------
# Per-step drop flags and the fold of the initial state (shared by the parallel modes).


def _drop_flags(reset, reverse: bool):
    """bool [B, T] or None: True where step t must not see the state carried into it."""
    if reset is None or not reverse:
        return reset
    return jnp.flip(reset_for_reverse(reset), axis=1)


def _effective_decay(a: Field, drop, shape) -> Field:
    """a broadcast to b's full shape, zeroed where the carried state is dropped."""
    a = fmap(lambda v: jnp.broadcast_to(v, shape), a)
    return a if drop is None else zero_where(drop, a)


def _fold_initial_state(a_eff: Field, b: Field, h0: Field, reverse: bool) -> Field:
    """b with the first processed step's a ⊙ h0 added, so the scans can start from zero."""
    first = -1 if reverse else 0
    a_first = fmap(lambda v: v[:, first], a_eff)
    return fmap(lambda v, c: v.at[:, first].add(c), b, mul(a_first, h0))


def _last_processed(h: Field, reverse: bool) -> Field:
    return fmap(lambda v: v[:, 0] if reverse else v[:, -1], h)


# --------------------------------------------------------------------------------------------
# The parallel modes. Both take the decay already broadcast to b's shape and zeroed where the carried
# state is dropped, so their only difference is how the scan over time is organised.


def _associative(a_eff: Field, b: Field, reverse: bool, axis: int = 1):
    return lax.associative_scan(_combine, (a_eff, b), reverse=reverse, axis=axis)


def _chunked(a_eff: Field, b: Field, reverse: bool, chunk: int) -> Field:
    shape = _shape(b)
    batch, time, feat = shape[0], shape[1], shape[2:]
    pad = (-time) % chunk
    if pad:
        # Identity steps (a = 1, b = 0) leave the state unchanged wherever they are processed.
        widths = [(0, 0), (0, pad)] + [(0, 0)] * len(feat)
        one = (1.0, 0.0) if isinstance(a_eff, tuple) else 1.0
        a_eff = fmap(lambda v, c: jnp.pad(v, widths, constant_values=c), a_eff, one)
        b = fmap(lambda v: jnp.pad(v, widths), b)
    n = (time + pad) // chunk
    split = lambda v: v.reshape(batch, n, chunk, *feat)            # [B, N, C, ...]

    # Inside each chunk, from a zero state: cumulative decay A and local state H.
    a_cum, h_local = _associative(fmap(split, a_eff), fmap(split, b), reverse, axis=2)
    edge = 0 if reverse else chunk - 1
    a_tot = fmap(lambda v: jnp.moveaxis(v[:, :, edge], 1, 0), a_cum)  # [N, B, ...]
    h_tot = fmap(lambda v: jnp.moveaxis(v[:, :, edge], 1, 0), h_local)

    def carry_across(h_in, chunk_summary):
        a_k, h_k = chunk_summary
        return add(mul(a_k, h_in), h_k), h_in

    zeros = fmap(lambda v: jnp.zeros((batch, *feat), v.dtype), b)
    _, h_in = lax.scan(carry_across, zeros, (a_tot, h_tot), reverse=reverse)
    h_in = fmap(lambda v: jnp.moveaxis(v, 0, 1)[:, :, None], h_in)   # [B, N, 1, ...]
    h = add(h_local, mul(a_cum, h_in))
    return fmap(lambda v: v.reshape(batch, n * chunk, *feat)[:, :time], h)


def _parallel_forward(a_eff, b, h0, reverse: bool, mode: str, chunk: int):
    b = _fold_initial_state(a_eff, b, h0, reverse)
    h = _associative(a_eff, b, reverse)[1] if mode == "associative" else _chunked(a_eff, b, reverse, chunk)
    return h, _last_processed(h, reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _parallel(a_eff, b, h0, reverse, mode, chunk):
    return _parallel_forward(a_eff, b, h0, reverse, mode, chunk)


def _parallel_fwd(a_eff, b, h0, reverse, mode, chunk):
    h, final = _parallel_forward(a_eff, b, h0, reverse, mode, chunk)
    return (h, final), (a_eff, h0, h)


def _parallel_bwd(reverse, mode, chunk, residuals, cotangents):
    # Autodiff through an associative scan costs 4-9x its forward pass and stores its log-depth
    # intermediates. The adjoint is the same recurrence run the other way on the cotangents,
    # g_t = dh_t + conj(a'_next) g_next, so the backward pass is this mode's forward pass plus one
    # element-wise product, and only h is kept.
    a_eff, h0, h = residuals
    dh, d_final = cotangents
    last = 0 if reverse else -1
    dh = fmap(lambda v, c: v.at[:, last].add(c), dh, d_final)
    zeros = fmap(jnp.zeros_like, h0)
    a_next = conj(shift_from_previous(a_eff, zeros, not reverse))
    g, _ = _parallel_forward(a_next, dh, zeros, not reverse, mode, chunk)
    da = mul(g, conj(shift_from_previous(h, h0, reverse)))
    first = -1 if reverse else 0
    d_h0 = mul(conj(fmap(lambda v: v[:, first], a_eff)), fmap(lambda v: v[:, first], g))
    return da, g, d_h0


_parallel.defvjp(_parallel_fwd, _parallel_bwd)


def _apply_parallel(p: _Problem, reverse: bool, mode: str, chunk: int):
    a_eff = _effective_decay(p.a, _drop_flags(p.reset, reverse), _shape(p.b))
    return _parallel(a_eff, p.b, p.h0, reverse, mode, chunk)


def apply(a, b, *, initial_state=None, reset=None, reverse: bool = False, mode: str = "auto",
          chunk_size: int | None = None, implementation=None):
    """Run ``h_t = a_t ⊙ h_{t-1} + b_t`` over axis 1. Returns ``(h [B, T, ...], final_state [B, ...])``.

    See the module docstring for shapes, modes, complex inputs and dtypes. ``implementation``
    ("xla", "pallas" or a list tried in turn; None: Pallas on GPU/TPU when ``mode="auto"``) picks
    ``pallas_kernels.diagonal_scan`` for real float32/bfloat16 ``a`` and ``b``; complex and
    (real, imag) inputs and other dtypes run XLA, with one warning when Pallas was asked for.
    """
    who = "diagonal.apply"
    hook = sequence_hook()
    if hook is not None:        # zoo.parallel.sequence.sharded_time: time split over a mesh axis
        return hook("diagonal", a, b, initial_state=initial_state, reset=reset, reverse=reverse, mode=mode,
                    chunk_size=chunk_size, implementation=implementation)
    mode, implementation = pallas_mode(who, mode, implementation)
    _check_mode(who, mode, MODES)
    chunk = _check_chunk_size(who, chunk_size)
    if chunk_size is not None and mode not in ("chunked", "auto"):
        raise ValueError(f"{who}: chunk_size={chunk_size} only applies to mode='chunked', got mode={mode!r}")
    p = _prepare(who, a, b, initial_state, reset)
    if use_pallas(who, implementation, mode, _pallas_unsupported(a, b, p.form)):
        from pallas_kernels.diagonal_scan import diagonal_scan  # Pallas loads only when asked for

        # The caller's a and b, not p's float32 copies: bfloat16 stays bfloat16 in device memory.
        a = jnp.reshape(jnp.asarray(a), _shape(p.a))
        h0 = None if initial_state is None else p.h0
        return diagonal_scan(a, jnp.asarray(b), h0, reset=p.reset, reverse=bool(reverse))
    if mode == "auto":
        mode = "chunked" if chunk_size is not None else _auto_mode()
    reverse = bool(reverse)
    if mode == "sequential":
        h, final = scan_batch_major(p.a, p.b, p.h0, _drop_flags(p.reset, reverse), reverse)
    else:
        h, final = _apply_parallel(p, reverse, mode, chunk)
    return _finish(h, final, p.form)


def _pallas_unsupported(a, b, form: _Form) -> str | None:
    """Why pallas_kernels.diagonal_scan cannot run this call, or None when it can."""
    if form.kind != "real":
        return "complex or (real, imag) inputs"
    dtypes = {jnp.asarray(x).dtype for x in (a, b)}
    if not dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}:
        return "dtypes other than float32 and bfloat16"
    return None


def step(a_t, b_t, h):
    """One step ``h ← a_t ⊙ h + b_t``. ``a_t`` [B, ...] or [...], ``b_t`` and ``h`` [B, ...].

    The argument order follows ``apply(a, b, initial_state=h)``. Returns the new state (float32, or
    float64 for float64 inputs), which is also the step's output; complex and (real, imag) inputs
    are returned in the same form as ``apply`` returns ``final_state``.
    """
    who = "diagonal.step"
    b_t, b_kind = _float_part(who, "b_t", b_t)
    a_t, a_kind = _float_part(who, "a_t", a_t)
    h, h_kind = _float_part(who, "h", h)
    shape = _shape(b_t)
    if len(shape) < 1:
        raise ValueError(f"{who}: b_t must have shape [B, ...], got {shape}")
    if _shape(h) != shape:
        raise ValueError(f"{who}: h has shape {_shape(h)} but b_t has {shape}; both are [B, ...]")
    if _shape(a_t) != shape and _shape(a_t) != shape[1:]:
        raise ValueError(f"{who}: a_t has shape {_shape(a_t)} but b_t has {shape}; a_t must be [B, ...] "
                         f"or [...] = {shape[1:]}")
    kinds = (a_kind, b_kind, h_kind)
    kind = "pair" if "pair" in kinds else "complex" if "complex" in kinds else "real"
    acc = _accumulation_dtype(_dtype(b_t))
    if kind != "real":
        a_t, b_t, h = _to_pair(a_t), _to_pair(b_t), _to_pair(h)
    new = add(mul(_astype(a_t, acc), _astype(h, acc)), _astype(b_t, acc))
    if kind == "complex":
        return new[0] + 1j * new[1]
    return new


def reference(a, b, *, initial_state=None, reset=None, reverse: bool = False):
    """A plain Python loop over time: the check for every mode (float64 when the inputs are float64)."""
    p = _prepare("diagonal.reference", a, b, initial_state, reset)
    time = _shape(p.b)[1]
    h = p.h0
    order = range(time - 1, -1, -1) if reverse else range(time)
    outputs = [None] * time
    for t in order:
        if p.reset is not None:
            # Forward: a segment starts at t. Backward: the carry from t + 1 ends its segment.
            if not reverse:
                h = zero_where(p.reset[:, t], h)
            elif t < time - 1:
                h = zero_where(p.reset[:, t + 1], h)
        at_t = lambda v, t=t: v[:, 0] if v.shape[1] == 1 else v[:, t]
        h = add(mul(fmap(at_t, p.a), h), fmap(at_t, p.b))
        outputs[t] = h
    hs = fmap(lambda *vs: jnp.stack(vs, axis=1), *outputs)
    return _finish(hs, h, p.form)


# --------------------------------------------------------------------------------------------
# Log space.


def _log_parts(x):
    """(log x⁺, log x⁻) for signed x, with -inf where a part is zero."""
    pos, neg = x > 0, x < 0
    log_abs = jnp.log(jnp.where(pos | neg, jnp.abs(x), jnp.ones((), x.dtype)))
    minus_inf = jnp.asarray(-jnp.inf, x.dtype)
    return jnp.where(pos, log_abs, minus_inf), jnp.where(neg, log_abs, minus_inf)


def _log_combine(earlier, later):
    (la1, lb1), (la2, lb2) = earlier, later
    return la1 + la2, fmap(lambda u, v: jnp.logaddexp(la2 + u, v), lb1, lb2)


def _log_forward(log_a, b, h0, reverse: bool, b_is_log: bool):
    """Linear ``h`` from a log-space associative scan of the two signed parts (log_a: b's shape)."""
    minus_inf = jnp.full(b.shape, -jnp.inf, b.dtype)
    lb = (b, minus_inf) if b_is_log else _log_parts(b)
    first = -1 if reverse else 0
    fold = lambda v, c: v.at[:, first].set(jnp.logaddexp(log_a[:, first] + c, v[:, first]))
    lb = fmap(fold, lb, _log_parts(h0))
    _, lh = lax.associative_scan(_log_combine, (log_a, lb), reverse=reverse, axis=1)
    h = jnp.exp(lh[0]) - jnp.exp(lh[1])
    return h, _last_processed(h, reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _log_recurrence(log_a, b, h0, reverse, b_is_log):
    return _log_forward(log_a, b, h0, reverse, b_is_log)


def _log_recurrence_fwd(log_a, b, h0, reverse, b_is_log):
    h, final = _log_forward(log_a, b, h0, reverse, b_is_log)
    return (h, final), (log_a, b, h0, h)


def _log_recurrence_bwd(reverse, b_is_log, residuals, cotangents):
    # Differentiating through logaddexp and log would give 0·inf at exact zeros (a part of b or
    # of the state that is 0, a decay of 0). Instead, the adjoint g_t = dh_t + a_next g_next is the
    # same signed recurrence run the other way, computed by the same log-space scan.
    log_a, b, h0, h = residuals
    dh, d_final = cotangents
    last = 0 if reverse else -1
    dh = dh.at[:, last].add(d_final)
    minus_inf = jnp.full(h0.shape, -jnp.inf, log_a.dtype)
    log_a_next = shift_from_previous(log_a, minus_inf, not reverse)
    g, _ = _log_forward(log_a_next, dh, jnp.zeros_like(h0), not reverse, False)
    a = jnp.exp(log_a)
    d_log_a = a * shift_from_previous(h, h0, reverse) * g
    d_b = jnp.exp(b) * g if b_is_log else g
    first = -1 if reverse else 0
    return d_log_a, d_b, a[:, first] * g[:, first]


_log_recurrence.defvjp(_log_recurrence_fwd, _log_recurrence_bwd)


def apply_log(log_a, b=None, *, log_b=None, initial_state=None, reset=None, reverse: bool = False,
              mode: str = "auto"):
    """``h_t = exp(log_a_t) ⊙ h_{t-1} + b_t`` computed in log space. Returns ``(h, final_state)``.

    ``log_a`` [B, T, ...] (or [...], time-invariant) is the log of a decay in [0, 1] (``-inf`` for
    an exact 0). Give exactly one of ``b`` (signed, linear) or ``log_b`` (``log b`` for b > 0).
    ``initial_state`` [B, ...] is linear and may be signed. See the module docstring.
    """
    who = "diagonal.apply_log"
    _check_mode(who, mode, LOG_MODES)
    if (b is None) == (log_b is None):
        raise ValueError(f"{who}: give exactly one of b (signed, linear) or log_b (log of a positive b)")
    given = b if log_b is None else log_b
    p = _prepare(who, log_a, given, initial_state, reset, a_name="log_a")
    if p.form.kind != "real":
        raise ValueError(f"{who}: log space is for real recurrences; use apply for complex ones")
    if mode == "auto":
        mode = _auto_mode()
    reverse = bool(reverse)
    drop = _drop_flags(p.reset, reverse)
    if mode == "sequential":
        # In sequential order the linear recurrence needs no log space: there is no cumulative
        # product to underflow and no division. Exponentiate once and run the linear pass.
        b_lin = jnp.exp(p.b) if log_b is not None else p.b
        h, final = scan_batch_major(jnp.exp(p.a), b_lin, p.h0, drop, reverse)
        return h.astype(p.form.out_dtype), final
    log_a = jnp.broadcast_to(p.a, _shape(p.b))
    if drop is not None:
        mask = drop.reshape(drop.shape + (1,) * (log_a.ndim - 2))
        log_a = jnp.where(mask, jnp.asarray(-jnp.inf, log_a.dtype), log_a)
    h, final = _log_recurrence(log_a, p.b, p.h0, reverse, log_b is not None)
    return h.astype(p.form.out_dtype), final
