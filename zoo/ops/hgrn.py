"""HGRN's recurrence: ``h_t = exp(g_t) ⊙ h_{t-1} + x_t`` over [B, T, D], with g the log forget gate.

Paper: Z. Qin, S. Yang, Y. Zhong, "Hierarchically Gated Recurrent Neural Network for Sequence
Modeling" (NeurIPS 2023). Signature and semantics follow FLA's ``fused_recurrent_hgrn`` /
``chunk_hgrn`` (fla-org/flash-linear-attention, ``fla/ops/hgrn``), which users know::

    o, final_state = hgrn(x, g, *, initial_state=None, output_final_state=False, reset=None,
                          reverse=False, mode="auto", chunk_size=None)
    h_new          = step(x_t, g_t, h)
    o, final_state = reference(x, g, *, initial_state=None, output_final_state=False, reset=None,
                               reverse=False)

Shapes::

    x              [B, T, D]   input, already scaled by the caller: HGRN's layer passes
                               (1 - f_t) ⊙ c_t (see zoo/models/hgrn.py); any float dtype
    g              [B, T, D]   log forget gate, g <= 0 (log f_t); may be -inf for f_t = 0
    initial_state  [B, D]      float32 (zeros when None)
    reset          [B, T] bool True: the state before step t is discarded (a new segment starts)
    o              [B, T, D]   in x's dtype: o_t = h_t
    final_state    [B, D]      float32, or None unless output_final_state (FLA's convention)

This is a thin front end to ``zoo.ops.diagonal`` with decay ``a = exp(g)`` taken in at least
float32 (a bfloat16 exp would round slow decays such as 0.999 to 1). The modes are the diagonal
engine's, ``"sequential"``, ``"associative"`` and ``"chunked"`` (``chunk_size``, default 64, only
there), and ``"auto"`` picks as the engine does. Every mode's gradient is the engine's
``custom_vjp``; the gradient with respect to g is the one with respect to a times a. ``reset`` and
``reverse`` have the engine's meaning (running backwards, a flag still marks where a segment starts).
All modes and ``reference`` agree to float32 rounding; ``reference`` computes in float64 when given
float64 inputs (with x64 enabled).

Not offered: HGRN1's complex recurrence ``h_t = f_t e^{iθ} ⊙ h_{t-1} + ...`` (the paper's main form;
FLA's kernels and its ``HGRNAttention`` use the real one, as here). The diagonal engine runs complex
recurrences, so a complex variant would be ``diagonal.apply(exp(g + iθ), x)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from zoo.ops import diagonal
from zoo.ops._checks import check_float
from zoo.ops._time import check_reset

MODES = diagonal.MODES


def _check_float(who: str, arg: str, x, rank: int, letters: str) -> None:
    check_float(who, arg, x, rank=rank, letters=letters)


def _check_inputs(who: str, x, g, initial_state, reset):
    """ValueError/TypeError naming the argument and the shapes; returns reset as bool [B, T] or None."""
    _check_float(who, "x", x, 3, "[B, T, D]")
    _check_float(who, "g", g, 3, "[B, T, D]")
    if np.shape(g) != np.shape(x):
        raise ValueError(f"{who}: g has shape {np.shape(g)} but x has {np.shape(x)}; both are [B, T, D]")
    if np.shape(x)[1] == 0:
        raise ValueError(f"{who}: x has shape {np.shape(x)} with T = 0 steps; at least one step is needed")
    if initial_state is not None:
        _check_float(who, "initial_state", initial_state, 2, "[B, D]")
        batch, _, width = np.shape(x)
        if np.shape(initial_state) != (batch, width):
            raise ValueError(f"{who}: initial_state must have shape [B, D] = {(batch, width)} to match x "
                             f"{np.shape(x)}, got {np.shape(initial_state)}")
    return check_reset(who, reset, *np.shape(x)[:2])


def _decay(g):
    """exp(g) in at least float32: the decay is never rounded to the compute dtype."""
    return jnp.exp(g.astype(jnp.promote_types(g.dtype, jnp.float32)))


def hgrn(x, g, *, initial_state=None, output_final_state: bool = False, reset=None, reverse: bool = False,
         mode: str = "auto", chunk_size: int | None = None):
    """``h_t = exp(g_t) ⊙ h_{t-1} + x_t``. Returns ``(o [B, T, D], final_state [B, D] or None)``.

    See the module docstring for shapes, modes and dtypes.
    """
    who = "hgrn"
    if mode != "auto" and mode not in MODES:
        raise ValueError(f"{who}: mode={mode!r} is not supported; choose one of {('auto', *MODES)}")
    if chunk_size is not None and mode not in ("chunked", "auto"):
        raise ValueError(f"{who}: chunk_size={chunk_size} only applies to mode='chunked', got mode={mode!r}")
    reset = _check_inputs(who, x, g, initial_state, reset)
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    o, final = diagonal.apply(_decay(g), x, initial_state=initial_state, reset=reset, reverse=reverse,
                              mode=mode, **chunk)
    return o, (final if output_final_state else None)


def step(x_t, g_t, h):
    """One step ``h ← exp(g_t) ⊙ h + x_t``; x_t, g_t and h are [B, D]. Returns the new state
    (float32, float64 for float64 inputs), which is also the step's output."""
    who = "hgrn.step"
    _check_float(who, "x_t", x_t, 2, "[B, D]")
    _check_float(who, "g_t", g_t, 2, "[B, D]")
    _check_float(who, "h", h, 2, "[B, D]")
    if np.shape(g_t) != np.shape(x_t) or np.shape(h) != np.shape(x_t):
        raise ValueError(f"{who}: x_t {np.shape(x_t)}, g_t {np.shape(g_t)} and h {np.shape(h)} must all be "
                         f"the same [B, D]")
    return diagonal.step(_decay(g_t), x_t, h)


def reference(x, g, *, initial_state=None, output_final_state: bool = False, reset=None,
              reverse: bool = False):
    """A plain loop over time (the diagonal engine's reference): the check for every mode."""
    reset = _check_inputs("hgrn.reference", x, g, initial_state, reset)
    o, final = diagonal.reference(_decay(g), x, initial_state=initial_state, reset=reset, reverse=reverse)
    return o, (final if output_final_state else None)
