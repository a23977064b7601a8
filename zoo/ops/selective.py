"""The selective scan of Mamba (S6), in mamba_ssm's argument names, shapes and layout.

Paper: A. Gu, T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (COLM 2024;
arXiv:2312.00752), Section 3 and Algorithm 2. Per channel d and state index n, with Δ, B, C functions
of the input (zero-order-hold for A, the paper's simplified Euler step for B)::

    Δ_t     = softplus(delta_t + delta_bias)          (softplus and bias optional, as in mamba_ssm)
    h_t     = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t      h_t ∈ R^{D×N} (C^{D×N} for complex A)
    y_t     = C_t h_t + D ⊙ u_t                        (complex A: 2 Re(C_t h_t), as mamba_ssm)
    out_t   = y_t ⊙ SiLU(z_t)                          (when z is given)

Public API (shapes as mamba_ssm's ``selective_scan_ref``; letters B batch, D channels, L time,
N state, G groups of channels sharing B and C)::

    out[, final_state] = selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                        delta_softplus=False, *, initial_state=None, reset=None,
                                        reverse=False, return_final_state=False, mode="auto",
                                        chunk_size=None, implementation=None)
    new_state, out_t   = selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                                dt_softplus=False)          # one step
    out[, final_state] = reference(...)       # selective_scan's arguments, minus mode and chunk_size

    u, delta, z    [B, D, L]        float (bfloat16 allowed; computed in float32)
    A              [D, N]           real, or complex (a complex array or a (real, imag) pair)
    B, C           [B, N, L] or grouped [B, G, N, L] (D % G == 0), or time-invariant [D, N].
                   For complex A: complex [B, (G,) N, L], a (real, imag) pair of those, or mamba_ssm's
                   real layout [B, (G,) N, 2L] with real and imaginary parts interleaved in time.
    D, delta_bias  [D]
    initial_state  [B, D, N]        (complex A: complex or a pair; zeros when None)
    reset          bool [B, L]      True: the state before step t is discarded (replaced by zeros)
    out            [B, D, L]        u's dtype
    final_state    [B, D, N]        float32 (float64 under x64 inputs); in A's form when complex

Modes. Every mode but ``"associative"`` keeps memory O(inputs + (L/K + K) · B·D·N), never the
[B, L, D, N] states (see ``zoo/ops/selective_chunks.py``): the forward pass stores only the state at
every chunk boundary (every K = ``chunk_size`` steps), and the backward pass recomputes each chunk's
states from it and runs the reverse recurrence chunk by chunk (a ``custom_vjp``).

* ``"sequential"``: inside each chunk the diagonal engine's sequential pass, one step at a time
  (the same order of operations as ``selective_state_update`` folded over time). K defaults to 256.
* ``"chunked"``: inside each chunk the diagonal engine's associative scan (O(log K) depth, for
  accelerators). K defaults to 64.
* ``"associative"``: one associative scan over the whole sequence (one chunk of L steps). It holds
  [B, L, D, N]: for short sequences on accelerators only.
* ``"auto"``: ``"chunked"``. On 2 CPU cores (B=1, L=65536, D=512, N=16, fwd+bwd, busy machine) it
  took 28.9 s against 47.5 s for ``"sequential"``: its per-chunk passes are few and large, where the
  sequential pass pays a loop iteration per step. Accelerators are not measured yet (no device here).

Memory, measured with ``experiments/bench/selective_scan_memory.py`` (a fresh process, peak RSS of
the whole process, one forward + backward with respect to every argument at B=1, L=65536, D=512,
N=16, float32, with D, z, delta_bias and softplus as Mamba calls it): ``"chunked"`` 1446 MB,
``"sequential"`` 1465 MB, against 1263 MB for a process that only holds the inputs, the output and
zeros the size of the gradients. All the states would be 2048 MB; the ``"associative"`` mode held
5.1 GB more than ``"sequential"`` already at L=8192.

Implementation. ``implementation="pallas"`` (or None with ``mode="auto"`` on GPU/TPU) runs
``pallas_kernels.selective_scan``: the same algorithm (states saved every ``chunk_size`` steps,
default 64, and recomputed within each tile in the backward pass) as one kernel with the [N, D-tile]
state on chip. Calls it does not cover (complex A, time-invariant or shared B/C, float64, small
groups) run XLA with one warning. On CPU the default stays XLA.

``reverse=True`` runs time backwards, and ``reset`` keeps its meaning (a flag marks where a segment
starts; ``zoo/ops/_time.py``). It flips the [B, D, L] inputs, which costs one copy of each.

What differs from mamba_ssm's ``selective_scan_ref``, and why:

* ``initial_state``, ``reset``, ``reverse`` and ``mode`` are additions (packed sequences, prefill
  from a cached state, bidirectional stacks). ``return_last_state`` is called ``return_final_state``,
  the name the other zoo engines use.
* A bfloat16 ``delta`` is cast to float32 before ``delta_bias`` and softplus, as in the reference;
  the state and every accumulation are float32 (float64 for float64 inputs, so tests can check the
  algorithms in float64).
* Gradients are defined for every floating argument (``custom_vjp``; forward-mode differentiation
  only through ``reference``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo.ops import diagonal
from zoo.ops._dispatch import pallas_mode, use_pallas
from zoo.ops._time import check_reset, reset_before, reset_for_reverse
from zoo.ops.diagonal_pairs import fmap
from zoo.ops.selective_chunks import Static, discretise, gate, readout, scan_in_chunks

MODES = ("sequential", "chunked", "associative")
DEFAULT_CHUNK_SIZE = {"sequential": 256, "chunked": 64}
DEFAULT_PALLAS_CHUNK_SIZE = 64      # time tile of the Pallas kernel (states saved every 64 steps)


# --------------------------------------------------------------------------------------------
# Validation and normalisation at the public boundary.


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x[0] if isinstance(x, tuple) else x))


def _float(who: str, arg: str, x, *, allow_complex: bool = False):
    """x as a jnp array, or as a (real, imag) pair for complex values (when allowed)."""
    if isinstance(x, (tuple, list)):
        if not allow_complex or len(x) != 2:
            raise ValueError(f"{who}: {arg} must be an array{' or a (real, imag) pair' * allow_complex}, "
                             f"got a sequence of {len(x)}")
        re, im = (_float(who, f"{arg}[{i}]", v) for i, v in enumerate(x))
        if re.shape != im.shape:
            raise ValueError(f"{who}: {arg} real part has shape {re.shape} but imaginary part {im.shape}")
        return re, im
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        if not allow_complex:
            raise ValueError(f"{who}: {arg} is complex ({x.dtype}, shape {np.shape(x)}) but A is real")
        x = jnp.asarray(x)
        return jnp.real(x), jnp.imag(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{who}: {arg} has dtype {x.dtype} (shape {np.shape(x)}); a float dtype is needed")
    return jnp.asarray(x)


def _optional_vector(who: str, arg: str, x, d: int, acc):
    if x is None:
        return None
    x = _float(who, arg, x)
    if x.shape != (d,):
        raise ValueError(f"{who}: {arg} must have shape [D] = {(d,)}, got {x.shape}")
    return x.astype(acc)


def _check_decay(who: str, A, d: int | None):
    """(A as array or pair, N, is_complex)."""
    A = _float(who, "A", A, allow_complex=True)
    shape = _shape(A)
    if len(shape) != 2 or (d is not None and shape[0] != d):
        raise ValueError(f"{who}: A must have shape [D, N] with D = {d}, got {shape}")
    return A, shape[1], isinstance(A, tuple)


def _input_matrix(who: str, arg: str, x, batch: int, d: int, n: int, time: int | None, is_complex: bool, acc):
    """B or C as [Bb, G, N, Lb] (pairs when complex); ``time=None`` for one step ([B, N] / [B, G, N])."""
    x = _float(who, arg, x, allow_complex=is_complex)
    shape = given = _shape(x)
    step_form = time is None
    length = 1 if step_form else time
    interleaved = is_complex and not isinstance(x, tuple) and not step_form and len(shape) >= 3
    if interleaved:
        # mamba_ssm's real layout for complex B/C: (real, imag) interleaved along time, [.., 2L].
        if shape[-1] != 2 * length:
            raise ValueError(f"{who}: {arg} is real with shape {shape}; with complex A it must be "
                             f"[B, (G,) N, 2L] with last axis 2L = {2 * length} (mamba_ssm's layout), "
                             f"or complex [B, (G,) N, L]")
        pairs = x.reshape(*shape[:-1], length, 2)
        x = (pairs[..., 0], pairs[..., 1])
        shape = _shape(x)
    if step_form:
        x = fmap(lambda v: v[..., None], x)
        shape = (*shape, 1)
    time_letters = "" if step_form else ", L"
    expected = (f"[B, N{time_letters}] = {(batch, n, *(() if step_form else (length,)))}, "
                f"[B, G, N{time_letters}] with D % G == 0 (D = {d})"
                + ("" if step_form else f", or [D, N] = {(d, n)}"))
    if len(shape) == 2 and not step_form and shape == (d, n):
        x = fmap(lambda v: v[None, :, :, None], x)           # time-invariant: G = D, shared over B, L
    elif len(shape) == 3 and shape == (batch, n, length):
        x = fmap(lambda v: v[:, None], x)
    elif not (len(shape) == 4 and shape[0] == batch and shape[2:] == (n, length) and shape[1] > 0
              and d % shape[1] == 0):
        raise ValueError(f"{who}: {arg} has shape {given}; expected {expected}")
    if is_complex and not isinstance(x, tuple):
        x = (x, jnp.zeros_like(x))
    return fmap(lambda v: v.astype(acc), x)


def _check_state(who: str, arg: str, x, shape, is_complex: bool, acc):
    if x is None:
        zeros = jnp.zeros(shape, acc)
        return (zeros, zeros) if is_complex else zeros
    x = _float(who, arg, x, allow_complex=is_complex)
    if _shape(x) != tuple(shape):
        raise ValueError(f"{who}: {arg} must have shape [B, D, N] = {tuple(shape)}, got {_shape(x)}")
    if is_complex and not isinstance(x, tuple):
        x = (x, jnp.zeros_like(x))
    return fmap(lambda v: v.astype(acc), x)


def _accumulation_dtype(*dtypes):
    return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes))


class _Problem(NamedTuple):
    u: Any
    delta: Any
    z: Any
    A: Any            # array, or (real, imag) pair
    Bm: Any           # [Bb, G, N, Lb]
    Cm: Any
    skip: Any
    bias: Any
    h0: Any           # [B, D, N]
    reset: Any        # bool [B, L] or None
    complex_dtype: Any  # dtype of a complex final state, or None (real, or A given as a pair)


def _prepare(who, u, delta, A, B, C, D, z, delta_bias, initial_state, reset) -> _Problem:
    u = _float(who, "u", u)
    if u.ndim != 3:
        raise ValueError(f"{who}: u must have shape [B, D, L], got {u.shape}")
    batch, d, time = u.shape
    if time == 0:
        raise ValueError(f"{who}: u has shape {u.shape} with L = 0 steps; at least one step is needed")
    delta = _float(who, "delta", delta)
    if delta.shape != u.shape:
        raise ValueError(f"{who}: delta has shape {delta.shape} but u has {u.shape}; both are [B, D, L]")
    if z is not None:
        z = _float(who, "z", z)
        if z.shape != u.shape:
            raise ValueError(f"{who}: z has shape {z.shape} but u has {u.shape}; both are [B, D, L]")
    given_a = A
    A, n, is_complex = _check_decay(who, A, d)
    acc = _accumulation_dtype(u.dtype, delta.dtype, _shape_dtype(A))
    A = fmap(lambda v: v.astype(acc), A)
    Bm = _input_matrix(who, "B", B, batch, d, n, time, is_complex, acc)
    Cm = _input_matrix(who, "C", C, batch, d, n, time, is_complex, acc)
    skip = _optional_vector(who, "D", D, d, acc)
    bias = _optional_vector(who, "delta_bias", delta_bias, d, acc)
    h0 = _check_state(who, "initial_state", initial_state, (batch, d, n), is_complex, acc)
    reset = check_reset(who, reset, batch, time, "[B, L]")
    complex_dtype = None
    if is_complex and not isinstance(given_a, (tuple, list)):
        complex_dtype = jnp.result_type(acc, jnp.complex64)
    return _Problem(u, delta, z, A, Bm, Cm, skip, bias, h0, reset, complex_dtype)


def _shape_dtype(A):
    return (A[0] if isinstance(A, tuple) else A).dtype


def _state_form(h, complex_dtype):
    if complex_dtype is None:
        return h
    return (h[0] + 1j * h[1]).astype(complex_dtype)


def _flip_time(p: _Problem) -> _Problem:
    """The problem with time reversed; reset flags moved so that they still mark segment starts."""
    flip = lambda x, axis: None if x is None else fmap(
        lambda v: v if v.shape[axis] == 1 else jnp.flip(v, axis), x)
    return p._replace(u=flip(p.u, 2), delta=flip(p.delta, 2), z=flip(p.z, 2), Bm=flip(p.Bm, 3),
                      Cm=flip(p.Cm, 3), reset=reset_for_reverse(p.reset))


def _auto_mode() -> str:
    return "chunked"


def _resolve_mode(who: str, mode: str, chunk_size, time: int) -> tuple[str, int]:
    """(the diagonal engine's mode inside a chunk, steps per chunk)."""
    if mode != "auto" and mode not in MODES:
        raise ValueError(f"{who}: mode={mode!r} is not supported; choose one of {('auto', *MODES)}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
            raise ValueError(f"{who}: chunk_size must be a positive int, got {chunk_size!r}")
        if mode == "associative":
            raise ValueError(f"{who}: chunk_size={chunk_size} does not apply to mode='associative' (one "
                             f"scan over all L steps); use mode='chunked'")
    if mode == "auto":
        mode = _auto_mode()
    if mode == "associative":
        return "associative", time
    chunk = int(chunk_size) if chunk_size is not None else DEFAULT_CHUNK_SIZE[mode]
    return ("sequential" if mode == "sequential" else "associative"), chunk


# --------------------------------------------------------------------------------------------
# The public functions.


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                   initial_state=None, reset=None, reverse: bool = False, return_final_state: bool = False,
                   mode: str = "auto", chunk_size: int | None = None, implementation=None):
    """Mamba's selective scan. Returns ``out`` [B, D, L], or ``(out, final_state)``.

    See the module docstring for shapes, modes, complex A and what differs from mamba_ssm.
    ``implementation`` ("xla", "pallas" or a list tried in turn; None: Pallas on GPU/TPU when
    ``mode="auto"``) picks ``pallas_kernels.selective_scan`` for the calls it covers (real float32 A,
    float32/bfloat16 u, delta, z, B and C given per batch row and step, ``chunk_size`` None or a power
    of two >= 8, groups of more than 64 channels when G > 1); anything else runs XLA, with one warning
    when Pallas was asked for.
    """
    who = "selective_scan"
    mode, implementation = pallas_mode(who, mode, implementation)
    p = _prepare(who, u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    inner, chunk = _resolve_mode(who, mode, chunk_size, p.u.shape[2])
    if reverse:
        p = _flip_time(p)
    if use_pallas(who, implementation, mode, _pallas_unsupported(p, chunk_size)):
        from pallas_kernels.selective_scan import selective_scan as kernel  # Pallas loads only when asked for

        out, final = kernel(p.u, p.delta, p.A, p.Bm, p.Cm, p.skip, p.z, p.bias, bool(delta_softplus),
                            initial_state=p.h0, reset=p.reset,
                            chunk_size=DEFAULT_PALLAS_CHUNK_SIZE if chunk_size is None else int(chunk_size))
        if reverse:
            out = jnp.flip(out, 2)
        return (out, final) if return_final_state else out
    static = Static(softplus=bool(delta_softplus), inner=inner, chunk=chunk, out_dtype=p.u.dtype)
    out, final = scan_in_chunks(static, p.u, p.delta, p.z, p.A, p.Bm, p.Cm, p.skip, p.bias, p.h0, p.reset)
    if reverse:
        out = jnp.flip(out, 2)
    final = _state_form(final, p.complex_dtype)
    return (out, final) if return_final_state else out


def _pallas_unsupported(p: _Problem, chunk_size) -> str | None:
    """Why pallas_kernels.selective_scan cannot run this (normalised) call, or None when it can."""
    if isinstance(p.A, tuple):
        return "complex A"
    if _shape_dtype(p.A) != jnp.float32 or any(x is not None and x.dtype not in (jnp.float32, jnp.bfloat16)
                                                for x in (p.u, p.delta, p.z)):
        return "inputs other than float32 or bfloat16"
    batch, d, time = p.u.shape
    if any(m.shape[0] != batch or m.shape[3] != time for m in (p.Bm, p.Cm)):
        return "B or C shared over the batch or over time (time-invariant [D, N])"
    groups = p.Bm.shape[1]
    if groups > 1 and d // groups <= 64:
        return "grouped B/C with 64 or fewer channels per group (the TPU kernel's 128-lane tiles)"
    if chunk_size is not None and (chunk_size < 8 or chunk_size & (chunk_size - 1)):
        return "chunk sizes other than powers of two >= 8"
    return None


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False):
    """One step of the selective scan, like mamba_ssm's ``selective_state_update_ref``.

    ``state`` [B, D, N] (complex A: complex or a (real, imag) pair), ``x``, ``dt``, ``z`` [B, D],
    ``A`` [D, N], ``B``, ``C`` [B, N] or [B, G, N] (complex or pairs for complex A), ``D``,
    ``dt_bias`` [D]. Returns ``(new_state, out)``: the state float32 in the form it was given,
    ``out`` [B, D] in x's dtype. Unlike mamba_ssm, which updates ``state`` in place and returns only
    ``out``, the new state is returned.
    """
    who = "selective_state_update"
    x = _float(who, "x", x)
    if x.ndim != 2:
        raise ValueError(f"{who}: x must have shape [B, D], got {x.shape}")
    batch, d = x.shape
    dt = _float(who, "dt", dt)
    if dt.shape != x.shape:
        raise ValueError(f"{who}: dt has shape {dt.shape} but x has {x.shape}; both are [B, D]")
    if z is not None:
        z = _float(who, "z", z)
        if z.shape != x.shape:
            raise ValueError(f"{who}: z has shape {z.shape} but x has {x.shape}; both are [B, D]")
    A, n, is_complex = _check_decay(who, A, d)
    acc = _accumulation_dtype(x.dtype, dt.dtype, _shape_dtype(A))
    A = fmap(lambda v: v.astype(acc), A)
    Bm = _input_matrix(who, "B", B, batch, d, n, None, is_complex, acc)
    Cm = _input_matrix(who, "C", C, batch, d, n, None, is_complex, acc)
    skip = _optional_vector(who, "D", D, d, acc)
    bias = _optional_vector(who, "dt_bias", dt_bias, d, acc)
    as_pair = isinstance(state, (tuple, list))
    h = _check_state(who, "state", state, (batch, d, n), is_complex, acc)

    decay, drive = discretise(dt[:, :, None], x[:, :, None], A, Bm, bool(dt_softplus), bias)
    h = diagonal.step(fmap(lambda v: v[:, 0], decay), fmap(lambda v: v[:, 0], drive), h)
    y = gate(readout(fmap(lambda v: v[:, None], h), Cm), x[:, :, None], None if z is None else z[:, :, None],
             skip)[:, :, 0]
    if is_complex and not as_pair:
        h = (h[0] + 1j * h[1]).astype(jnp.result_type(acc, jnp.complex64))
    return h, y.astype(x.dtype)


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
              initial_state=None, reset=None, reverse: bool = False, return_final_state: bool = False):
    """A plain loop over time in complex arithmetic where A is complex: the check for every mode.

    Float64 inputs (under x64) are computed in float64 / complex128.
    """
    p = _prepare("selective_scan.reference", u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    acc = _shape_dtype(p.A)
    as_complex = lambda x: x if not isinstance(x, tuple) else x[0] + 1j * x[1]
    a_mat, h = as_complex(p.A), as_complex(p.h0)
    d = p.u.shape[1]
    per_channel = lambda m, t: jnp.repeat(m[..., min(t, m.shape[-1] - 1)], d // m.shape[1], axis=1)
    b_mat, c_mat = as_complex(p.Bm), as_complex(p.Cm)
    dt = p.delta.astype(acc)
    if p.bias is not None:
        dt = dt + p.bias[:, None]
    if delta_softplus:
        dt = jnp.logaddexp(dt, 0.0)
    time = p.u.shape[2]
    outputs = [None] * time
    for t in (range(time - 1, -1, -1) if reverse else range(time)):
        flag = reset_before(p.reset, t, time, reverse)
        if flag is not None:
            h = jnp.where(flag[:, None, None], jnp.zeros_like(h), h)
        u_t = p.u[:, :, t].astype(acc)
        h = jnp.exp(dt[:, :, t, None] * a_mat) * h + (dt[:, :, t] * u_t)[:, :, None] * per_channel(b_mat, t)
        y = jnp.einsum("bdn,bdn->bd", h, per_channel(c_mat, t))
        y = 2 * jnp.real(y) if jnp.iscomplexobj(y) else y
        if p.skip is not None:
            y = y + p.skip * u_t
        if p.z is not None:
            y = y * jax.nn.silu(p.z[:, :, t].astype(acc))
        outputs[t] = y
    out = jnp.stack(outputs, axis=2).astype(p.u.dtype)
    if jnp.iscomplexobj(h) and p.complex_dtype is None:
        h = (jnp.real(h), jnp.imag(h))
    return (out, h) if return_final_state else out
