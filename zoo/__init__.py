"""zoo: recurrent and linear-recurrent sequence models in JAX.

    rec = zoo.get("lstm", d_model=64)
    params = rec.init(jax.random.key(0), d_in)
    ys, state = rec.apply(params, xs)            # parallel mode, xs [B, T, d_in]
    state, y_t = rec.step(params, state, x_t)    # recurrent mode

Combinators (``zoo.stack``, ``zoo.residual``, ``zoo.bidirectional``, ``zoo.hybrid``) return a
``Recurrence`` too; ``zoo.nn`` (imported on first use) holds the Flax NNX shells and
``zoo.convert`` reads PyTorch RNN modules, recurrentgemma and xlstm weights.
"""

from zoo.combinators import bidirectional, hybrid, residual, stack
from zoo.contract import Recurrence, make_recurrence
from zoo.registry import ModelInfo, get, list_models, register

__all__ = ["ModelInfo", "Recurrence", "bidirectional", "get", "hybrid", "list_models", "make_recurrence",
           "register", "residual", "stack"]


def __getattr__(name):
    # zoo.nn imports Flax and zoo.convert reads torch modules: load them on first use so that the
    # functional core needs neither.
    if name in ("nn", "convert"):
        import importlib

        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
