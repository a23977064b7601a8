"""Newton mode of the nonlinear engine: a whole trajectory h_1..h_T solved in parallel over time.

Papers: Y. H. Lim, Q. Zhu, J. Selfridge and M. F. Kasim, "Parallelizing non-linear sequential models
over the sequence length" (DEER, ICLR 2024); X. Gonzalez, A. Warrington, J. T. H. Smith and
S. W. Linderman, "Towards Scalable and Stable Parallelization of Nonlinear RNNs" (quasi-DEER and
ELK, NeurIPS 2024); F. Danieli et al., "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for
Large Language Models" (2025), whose cells with diagonal and block-diagonal recurrences make the
Jacobian cheap.

The trajectory is the root of F(h)_t = h_t - f(h_{t-1}, x_t). Newton linearises f around the current
iterate h̄ and solves the linear recurrence

    h_t = J_t h_{t-1} + (f(h̄_{t-1}, x_t) - J_t h̄_{t-1}),     J_t = ∂f/∂h (h̄_{t-1}, x_t)

with a parallel scan: the ``diagonal`` engine when J_t is diagonal, an associative scan over
[n, n] blocks otherwise. A reset at t replaces h_{t-1} by the fresh state, which is a constant, so
J_t = 0 there. Whatever the Jacobian used (exact, or only its diagonal: quasi-DEER), the first k
states are exact after k iterations, so at most T iterations reach the sequential result; with the
exact Jacobian convergence near the solution is quadratic and a few iterations usually suffice.

**Jacobian structure.** The cell declares how ∂h_t/∂h_{t-1} is laid out, as ``Blocks``: two linear
maps between the state pytree and a [..., K, n] array such that output block k depends only on input
block k. ``"dense"`` is one block of the whole state (n = state size), ``"diagonal"`` is one block per
float (n = 1: ParaGRU, minimal cells), and a cell with head-wise recurrences (sLSTM) or a few coupled
floats per unit (ParaLSTM's (c, h) pairs) declares K blocks of its own size. The block Jacobian
costs n forward-mode products of the cell, all steps at once, and the solve costs n³ per step per
block (n = 1: one multiply-add).

**Gradients** are implicit (``jax.custom_vjp``), never backpropagation through the iterations: at
the solution the adjoint of the fixed point is one more linear recurrence, run backwards with the
transposed Jacobians, ``u_t = dh_t + J_{t+1}ᵀ u_{t+1} + (∂y_{t+1}/∂h_t)ᵀ dy_{t+1}``; then a single
vector-Jacobian product of the cell over all steps gives the parameter, input, initial-state and
reset-state gradients. With ``jacobian="diagonal"`` the backward pass still uses the exact Jacobian
in the declared structure, so the gradient is the sequential scan's. Being a ``custom_vjp``, the
mode supports reverse-mode differentiation, not ``jax.jvp``.

**Stability.** ``damping`` < 1 takes that fraction of each Newton step; ``backtrack`` halves a step
(up to that many times) while the residual does not decrease, and a step that produces a non-finite
residual is never taken: the iteration stops there and reports that it did not converge. This is a
line search on the residual, a cheaper stand-in for ELK's trust region (a Kalman smoother per
iteration), which is not implemented. Non-convergence within ``max_iters`` is reported in the
diagnostics and, by default, as a ``NewtonWarning`` at run time (also under ``jit``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.ops import diagonal

JACOBIANS = ("full", "diagonal")
LINEAR_MODES = ("auto", "sequential", "associative")


class NewtonWarning(RuntimeWarning):
    """Newton's iteration stopped before its residual reached the tolerance."""


@dataclasses.dataclass(frozen=True)
class NewtonOptions:
    """How ``mode="newton"`` iterates.

    * ``max_iters``: None means T (enough for exact convergence in exact arithmetic).
    * ``tol``: converged when max |h_t - f(h_{t-1}, x_t)| <= tol · max(1, max |h|). None: 1e-6 for
      float32 compute, 4 ulps of a lower compute dtype (bfloat16: 3e-2), 1e-12 for float64.
    * ``jacobian``: "full" (the declared structure, DEER) or "diagonal" (its diagonal, quasi-DEER).
    * ``damping``: the fraction of each Newton step taken, in (0, 1].
    * ``backtrack``: how many times a step may be halved while the residual does not decrease.
    * ``linear_mode``: how each linear recurrence is solved: "associative" (O(log T) depth),
      "sequential" (one pass; fastest on CPU) or "auto" (sequential on CPU, associative elsewhere).
    * ``warn``: emit a ``NewtonWarning`` when the iteration stops unconverged.
    * ``callback``: called on the host after every solve as ``callback(iterations, residual,
      converged)`` (numpy scalars), also under ``jit``: a way to log a model's iterations, whose
      ``apply`` returns no diagnostics.
    """

    max_iters: int | None = None
    tol: float | None = None
    jacobian: str = "full"
    damping: float = 1.0
    backtrack: int = 0
    linear_mode: str = "auto"
    warn: bool = True
    callback: Callable | None = None

    def __post_init__(self):
        iters = self.max_iters
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
            raise ValueError(f"newton: max_iters must be a positive int or None, got {self.max_iters!r}")
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"newton: tol must be a positive float or None, got {self.tol!r}")
        if self.jacobian not in JACOBIANS:
            raise ValueError(f"newton: jacobian={self.jacobian!r}; choose one of {JACOBIANS}")
        if not (isinstance(self.damping, (int, float)) and 0 < self.damping <= 1):
            raise ValueError(f"newton: damping must be in (0, 1], got {self.damping!r}")
        if isinstance(self.backtrack, bool) or not isinstance(self.backtrack, int) or self.backtrack < 0:
            raise ValueError(f"newton: backtrack must be a non-negative int, got {self.backtrack!r}")
        if self.linear_mode not in LINEAR_MODES:
            raise ValueError(f"newton: linear_mode={self.linear_mode!r}; choose one of {LINEAR_MODES}")
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"newton: callback must be callable, got {type(self.callback).__name__}")


class NewtonDiagnostics(NamedTuple):
    """What the iteration did: Newton updates taken, the final scaled residual, whether it reached
    ``tol``, and the state trajectory [B, T, ...] (a warm start for the next call's ``initial_guess``)."""

    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    trajectory: Any


_OPTIONS: contextvars.ContextVar[NewtonOptions | None] = contextvars.ContextVar("zoo_newton_options",
                                                                                 default=None)


@contextlib.contextmanager
def newton_options(options: NewtonOptions | None = None, **fields):
    """Trace-time defaults for ``mode="newton"`` calls that pass no ``newton=``, so that a model's
    ``apply(..., mode="newton")`` can be tuned without a config field::

        with nonlinear.newton_options(max_iters=8, jacobian="diagonal"):
            ys, state = rec.apply(params, xs, mode="newton")
    """
    if options is None:
        options = NewtonOptions(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    token = _OPTIONS.set(options)
    try:
        yield options
    finally:
        _OPTIONS.reset(token)


def current_options(newton: NewtonOptions | None) -> NewtonOptions:
    if newton is not None:
        if not isinstance(newton, NewtonOptions):
            raise TypeError(f"nonlinear.apply: newton must be a NewtonOptions, got {type(newton).__name__}")
        return newton
    return _OPTIONS.get() or NewtonOptions()


# --------------------------------------------------------------------------------------------
# Jacobian structure: the state as [..., K, n] blocks.


class Blocks(NamedTuple):
    """Two linear maps, inverse to each other: ``to_blocks(state) -> [..., K, n]`` and back, for any
    leading axes. Block k of ∂h_t/∂h_{t-1} may be dense, blocks never mix."""

    to_blocks: Callable[[Any], jax.Array]
    from_blocks: Callable[[jax.Array], Any]


def _flat_layout(like):
    """Per leaf of a [B, ...] state: its feature shape and float count."""
    leaves, treedef = jax.tree.flatten(like)
    shapes = [tuple(leaf.shape[1:]) for leaf in leaves]
    sizes = [int(np.prod(s, dtype=int)) for s in shapes]
    return treedef, shapes, sizes


def _flatten(like, block_size_one: bool) -> Blocks:
    treedef, shapes, sizes = _flat_layout(like)
    total = sum(sizes)

    def to_blocks(state):
        parts = []
        for leaf, shape in zip(jax.tree.leaves(state), shapes, strict=True):
            lead = leaf.shape[:leaf.ndim - len(shape)]
            parts.append(leaf.reshape(lead + (-1,)))
        flat = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return flat[..., :, None] if block_size_one else flat[..., None, :]

    def from_blocks(z):
        lead = z.shape[:-2]
        flat = z.reshape(lead + (total,))
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1], axis=-1) if len(sizes) > 1 else [flat]
        return jax.tree.unflatten(treedef, [p.reshape(lead + s) for p, s in zip(pieces, shapes, strict=True)])

    return Blocks(to_blocks, from_blocks)


def dense(like) -> Blocks:
    """One block holding the whole state (a general cell: Elman, GRU, LSTM)."""
    return _flatten(like, block_size_one=False)


def diagonal_blocks(like) -> Blocks:
    """Every float its own 1x1 block: ∂h_t/∂h_{t-1} is diagonal (ParaGRU, diagonal Elman)."""
    return _flatten(like, block_size_one=True)


def resolve_structure(structure, like) -> Blocks:
    """``structure``: "dense", "diagonal", a ``Blocks``, or a function ``like -> Blocks``."""
    if structure is None or structure == "dense":
        return dense(like)
    if structure == "diagonal":
        return diagonal_blocks(like)
    if isinstance(structure, Blocks):
        return structure
    if callable(structure):
        blocks = structure(like)
        if not isinstance(blocks, Blocks):
            raise TypeError(f"nonlinear.apply: structure(state) must return a Blocks, "
                            f"got {type(blocks).__name__}")
        return blocks
    raise ValueError(f"nonlinear.apply: structure={structure!r}; give 'dense', 'diagonal' or a Blocks")


# --------------------------------------------------------------------------------------------
# Linear recurrences z_t = A_t z_{t-1} + b_t over [B, T, K, n].


def _matvec(a, z):
    return jnp.einsum("...ij,...j->...i", a, z)


def _auto_linear_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "sequential" if jax.default_backend() == "cpu" else "associative"


def solve_linear(a, b, z0, *, elementwise: bool, mode: str, reverse: bool = False):
    """z_t = a_t z_{t-1} + b_t (``reverse``: z_t = a_t z_{t+1} + b_t), z before the first step = z0.

    ``elementwise``: a is [B, T, K, n] (diagonal Jacobian), else [B, T, K, n, n]."""
    mode = _auto_linear_mode(mode)
    if elementwise:
        # [B, T, K·n]: the diagonal engine's batch-major pass is fastest with one wide feature axis.
        flat = lambda x: x.reshape(x.shape[:-2] + (-1,))
        z, _ = diagonal.apply(flat(a), flat(b), initial_state=flat(z0), reverse=reverse, mode=mode)
        return z.reshape(b.shape)
    if reverse:
        return jnp.flip(solve_linear(jnp.flip(a, 1), jnp.flip(b, 1), z0, elementwise=False, mode=mode), 1)
    if mode == "associative":
        b = b.at[:, 0].add(_matvec(a[:, 0], z0))

        def compose(earlier, later):
            (a1, b1), (a2, b2) = earlier, later
            return jnp.einsum("...ij,...jk->...ik", a2, a1), _matvec(a2, b1) + b2

        return lax.associative_scan(compose, (a, b), axis=1)[1]

    def body(z, ab):
        z = _matvec(ab[0], z) + ab[1]
        return z, z

    _, z = lax.scan(body, z0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(z, 0, 1)


def _apply_jacobian(a, z, elementwise: bool):
    return a * z if elementwise else _matvec(a, z)


# --------------------------------------------------------------------------------------------
# One evaluation of the cell at every step: values, outputs and the block Jacobian.


class _Problem(NamedTuple):
    f: Callable                  # f(params, h, inp_t) -> (h_new, y_t), on any leading batch
    blocks: Blocks
    options: NewtonOptions
    batch: int
    time: int
    block_count: int
    block_size: int
    tol: float
    max_iters: int


def _fold(tree, batch, time):
    return jax.tree.map(lambda x: x.reshape((batch * time,) + x.shape[2:]), tree)


def _unfold(tree, batch, time):
    return jax.tree.map(lambda x: x.reshape((batch, time) + x.shape[1:]), tree)


def _cell_on_blocks(prob: _Problem, params, inp_flat):
    def g(z):
        h_new, y = prob.f(params, prob.blocks.from_blocks(z), inp_flat)
        return prob.blocks.to_blocks(jax.tree.map(lambda v: v.astype(jnp.float32), h_new)), y
    return g


def _evaluate(prob: _Problem, params, inp_flat, zp, *, exact: bool):
    """f at every step from the entering states ``zp`` [B, T, K, n]: (values, outputs, Jacobian).
    The Jacobian is [B, T, K, n] when it is used elementwise, else [B, T, K, n, n]."""
    batch, time, n = prob.batch, prob.time, prob.block_size
    zp_flat = zp.reshape((batch * time,) + zp.shape[2:])
    fz, jvp, ys = jax.linearize(_cell_on_blocks(prob, params, inp_flat), zp_flat, has_aux=True)
    if n == 1:
        jac = jvp(jnp.ones_like(zp_flat))                                   # [M, K, 1]: the diagonal
    else:
        basis = jnp.eye(n, dtype=zp.dtype)                                  # tangent j: e_j in every block
        columns = jax.vmap(lambda e: jvp(jnp.broadcast_to(e, zp_flat.shape)))(basis)   # [n, M, K, n]
        jac = jnp.moveaxis(columns, 0, -1)                                   # [M, K, n_out, n_in]
        if not exact:
            jac = jnp.diagonal(jac, axis1=-2, axis2=-1)                      # quasi-DEER
    unfold = lambda x: x.reshape((batch, time) + x.shape[1:])
    return unfold(fz), _unfold(ys, batch, time), unfold(jac)


def _elementwise(prob: _Problem, exact: bool) -> bool:
    return prob.block_size == 1 or not exact


def _entering(z, z0, fresh, reset):
    """The state entering each step: z shifted one step later, z0 first, fresh where a reset is."""
    zp = jnp.concatenate([z0[:, None], z[:, :-1]], axis=1)
    if reset is None:
        return zp
    return jnp.where(reset[:, :, None, None], fresh[:, None], zp)


def _mask(jac, reset):
    if reset is None:
        return jac
    return jnp.where(reset.reshape(reset.shape + (1,) * (jac.ndim - 2)), 0, jac)


def _scaled_residual(z, fz):
    return jnp.max(jnp.abs(fz - z)) / jnp.maximum(1.0, jnp.max(jnp.abs(fz)))


# --------------------------------------------------------------------------------------------
# The iteration.


def _iterate(prob: _Problem, params, inp, z0, fresh, reset, guess):
    exact = prob.options.jacobian == "full"
    elementwise = _elementwise(prob, exact)
    inp_flat = _fold(inp, prob.batch, prob.time)
    opts = prob.options

    def evaluate(z):
        zp = _entering(z, z0, fresh, reset)
        fz, ys, jac = _evaluate(prob, params, inp_flat, zp, exact=exact)
        return fz, ys, _mask(jac, reset), _scaled_residual(z, fz)

    def newton_target(z, fz, jac):
        zp = _entering(z, z0, fresh, reset)
        return solve_linear(jac, fz - _apply_jacobian(jac, zp, elementwise), z0,
                            elementwise=elementwise, mode=opts.linear_mode)

    def line_search(z, z_newton, residual):
        """Step of size damping, halved up to ``backtrack`` times while the residual does not fall."""
        def trial(alpha):
            z_c = z + alpha * (z_newton - z)
            return (z_c, *evaluate(z_c))

        def worse(state):
            tries, alpha, cand = state
            return (tries < opts.backtrack) & ~(cand[4] < residual)

        def halve(state):
            tries, alpha, _ = state
            return tries + 1, alpha / 2, trial(alpha / 2)

        alpha0 = jnp.float32(opts.damping)
        state = (jnp.int32(0), alpha0, trial(alpha0))
        if opts.backtrack:
            state = lax.while_loop(worse, halve, state)
        return state[2]

    def running(carry):
        _, _, _, _, residual, iters, stalled = carry
        return (residual > prob.tol) & (iters < prob.max_iters) & ~stalled

    def step(carry):
        z, fz, ys, jac, residual, iters, _ = carry
        cand = line_search(z, newton_target(z, fz, jac), residual)
        ok = jnp.isfinite(cand[4])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        z, fz, ys, jac, residual = keep(cand, (z, fz, ys, jac, residual))
        return z, fz, ys, jac, residual, iters + ok.astype(jnp.int32), ~ok

    z_init = jnp.zeros((prob.batch, prob.time) + z0.shape[1:], jnp.float32) if guess is None else guess
    carry = (z_init, *evaluate(z_init), jnp.int32(0), jnp.bool_(False))
    z, fz, ys, jac, residual, iters, _ = lax.while_loop(running, step, carry)
    converged = residual <= prob.tol
    if opts.warn:
        jax.debug.callback(_warn_unconverged, converged, iters, residual, prob.tol)
    if opts.callback is not None:
        jax.debug.callback(opts.callback, iters, residual, converged)
    return z, fz, ys, jac, (iters, residual, converged)


def _warn_unconverged(converged, iters, residual, tol):
    if not bool(np.all(converged)):
        warnings.warn(f"nonlinear.apply(mode='newton') did not converge: scaled residual "
                      f"{float(np.max(residual)):.3g} > tol {tol:.3g} after {int(np.max(iters))} iterations; "
                      f"raise max_iters, use damping/backtrack, or run mode='sequential'",
                      NewtonWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# Implicit differentiation at the solution.


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _solve(prob, params, inp, z0, fresh, reset, guess):
    _, fz, ys, _, stats = _iterate(prob, params, inp, z0, fresh, reset, guess)
    return ys, fz, stats


def _solve_fwd(prob, params, inp, z0, fresh, reset, guess):
    z, fz, ys, jac, stats = _iterate(prob, params, inp, z0, fresh, reset, guess)
    exact_kept = prob.options.jacobian == "full" or prob.block_size == 1
    residuals = (params, inp, z0, fresh, reset, _entering(z, z0, fresh, reset), jac if exact_kept else None)
    return (ys, fz, stats), residuals


def _solve_bwd(prob, residuals, cotangents):
    params, inp, z0, fresh, reset, zp, jac = residuals
    dys, dz, _ = cotangents
    inp_flat = _fold(inp, prob.batch, prob.time)
    if jac is None:                                      # quasi-DEER forward: the exact Jacobian here
        _, _, jac = _evaluate(prob, params, inp_flat, zp, exact=True)
        jac = _mask(jac, reset)
    elementwise = prob.block_size == 1

    def cell_all(p, zp_, x_flat):
        zp_flat = zp_.reshape((prob.batch * prob.time,) + zp_.shape[2:])
        fz, ys = _cell_on_blocks(prob, p, x_flat)(zp_flat)
        return fz.reshape(zp_.shape), _unfold(ys, prob.batch, prob.time)

    (_, ys_like), cell_vjp = jax.vjp(cell_all, params, zp, inp_flat)
    dys = jax.tree.map(lambda d, y: d.astype(y.dtype), dys, ys_like)
    _, dzp_from_ys, _ = cell_vjp((jnp.zeros_like(zp), dys))
    if reset is not None:
        dzp_from_ys = jnp.where(reset[:, :, None, None], 0, dzp_from_ys)

    # u_t = dz_t + J_{t+1}ᵀ u_{t+1} + (∂y_{t+1}/∂h_t)ᵀ dy_{t+1}: coefficients shifted one step earlier.
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
    coef = shift(jac if elementwise else jnp.swapaxes(jac, -1, -2))
    u = solve_linear(coef, dz + shift(dzp_from_ys), jnp.zeros_like(z0), elementwise=elementwise,
                     mode=prob.options.linear_mode, reverse=True)
    d_params, d_zp, d_inp = cell_vjp((u, dys))
    d_inp = _unfold(d_inp, prob.batch, prob.time)
    if reset is None:
        d_z0, d_fresh = d_zp[:, 0], jnp.zeros_like(fresh)
    else:
        flags = reset[:, :, None, None]
        d_z0 = jnp.where(reset[:, 0, None, None], 0, d_zp[:, 0])
        d_fresh = jnp.sum(jnp.where(flags, d_zp, 0), axis=1)
    return d_params, d_inp, d_z0, d_fresh, None, None


_solve.defvjp(_solve_fwd, _solve_bwd)


def _default_tol(compute_dtype) -> float:
    if compute_dtype == jnp.float64:
        return 1e-12
    eps = float(jnp.finfo(compute_dtype).eps) if jnp.issubdtype(compute_dtype, jnp.floating) else 0.0
    return max(1e-6, 4 * eps)


def run(f, params, inp, *, initial_state, fresh, reset, structure, options: NewtonOptions,
        initial_guess=None, compute_dtype=jnp.float32):
    """Forward-in-time Newton solve. ``f(params, h, inp_t) -> (h_new, y_t)`` takes any leading batch;
    ``inp`` leaves are [B, T, ...]; ``reset`` [B, T] bool or None, already in the running order.
    Returns ``(ys, trajectory [B, T, ...] state pytree, (iterations, residual, converged))``."""
    blocks = resolve_structure(structure, initial_state)
    z0 = blocks.to_blocks(initial_state)
    if z0.ndim != 3:
        raise ValueError(f"nonlinear.apply: structure.to_blocks(state) must give [B, K, n], got {z0.shape}")
    batch, time = jax.tree.leaves(inp)[0].shape[:2]
    guess = None
    if initial_guess is not None:
        guess = blocks.to_blocks(jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), initial_guess))
        if guess.shape != (batch, time) + z0.shape[1:]:
            raise ValueError(f"nonlinear.apply: initial_guess must be the state trajectory [B, T, ...]; its "
                             f"blocks have shape {guess.shape}, expected {(batch, time) + z0.shape[1:]}")
    prob = _Problem(f=f, blocks=blocks, options=options, batch=batch, time=time, block_count=z0.shape[1],
                    block_size=z0.shape[2], tol=float(options.tol or _default_tol(compute_dtype)),
                    max_iters=int(options.max_iters or time))
    ys, fz, stats = _solve(prob, params, inp, z0, blocks.to_blocks(fresh), reset, guess)
    return ys, blocks.from_blocks(fz), stats
