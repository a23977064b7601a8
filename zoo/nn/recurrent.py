"""``Recurrent``: an nnx.Module that holds a recurrence's params and calls its pure functions."""

from __future__ import annotations

import jax
from flax import nnx

from zoo.contract import AUTO, Recurrence


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class Recurrent(nnx.Module):
    """Holds ``rec.init(key, d_in)`` as ``nnx.Param`` leaves (same nested names) and runs ``rec``.

    ``__call__`` is ``rec.apply`` and ``step`` is ``rec.step`` on the current params, so the module
    and the functional form compute the same function. Works with ``nnx.jit``,
    ``nnx.value_and_grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``.
    """

    def __init__(self, rec: Recurrence, d_in: int, *, rngs: nnx.Rngs):
        if not isinstance(rec, Recurrence):
            raise TypeError(f"Recurrent: rec is a {type(rec).__name__}, not a zoo.Recurrence")
        self.rec = nnx.static(rec)
        self.d_in = d_in
        self.params = nnx.data(jax.tree.map(nnx.Param, rec.init(rngs.params(), d_in)))

    def param_values(self):
        """The params as the plain pytree of arrays that ``rec``'s functions take."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def __call__(self, xs, state=None, reset=None, mode: str = AUTO, return_state: bool = False,
                 reverse: bool = False):
        """xs [B, T, D_in] -> ys [B, T, D_out] (and the final state when ``return_state``)."""
        ys, final = self.rec.apply(self.param_values(), xs, state=state, reset=reset, mode=mode,
                                   reverse=reverse)
        return (ys, final) if return_state else ys

    def step(self, state, x_t):
        """One time step: x_t [B, D_in] -> (new_state, y_t [B, D_out])."""
        return self.rec.step(self.param_values(), state, x_t)

    def initial_state(self, batch_size: int):
        return self.rec.initial_state(self.param_values(), batch_size)
