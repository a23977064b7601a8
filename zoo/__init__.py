"""zoo: recurrent and linear-recurrent sequence models in JAX.

    rec = zoo.get("lstm", d_model=64)
    params = rec.init(jax.random.key(0), d_in)
    ys, state = rec.apply(params, xs)            # parallel mode, xs [B, T, d_in]
    state, y_t = rec.step(params, state, x_t)    # recurrent mode
"""

from zoo.contract import Recurrence, make_recurrence
from zoo.registry import ModelInfo, get, list_models, register

__all__ = ["ModelInfo", "Recurrence", "get", "list_models", "make_recurrence", "register"]
