"""Weight converters: PyTorch recurrent layers as zoo recurrences.

    from zoo.convert import from_torch, state_from_torch, state_to_torch

    rec, params = from_torch(torch_module)          # torch.nn.RNN / LSTM / GRU
    ys, state = rec.apply(params, xs)               # xs [B, T, input_size] -> ys [B, T, dirs * H]
    h_n = state_to_torch(torch_module, state)       # (h_n, c_n) for an LSTM, as torch lays them out

torch is optional (the ``refs`` extra) and imported only inside these functions.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from zoo.combinators import bidirectional, stack
from zoo.contract import Recurrence
from zoo.registry import get


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("zoo.convert needs PyTorch: pip install 'recurrent-zoo[refs]' "
                          "(or torch==2.13.0)") from err
    return torch


def _kind(module) -> str:
    """"elman", "lstm" or "gru" for a supported module; TypeError / ValueError otherwise."""
    nn = _torch().nn
    if isinstance(module, nn.LSTM):
        if getattr(module, "proj_size", 0):
            raise ValueError(f"from_torch: torch.nn.LSTM with proj_size={module.proj_size} has no zoo "
                             f"counterpart (the lstm model has no output projection); use proj_size=0")
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    if isinstance(module, nn.RNN):
        return "elman"
    raise TypeError(f"from_torch: expected torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, "
                    f"got {type(module).__name__}")


def _array(tensor) -> jnp.ndarray:
    return jnp.asarray(np.asarray(tensor.detach().cpu().numpy(), np.float32))


def _direction_params(module, kind: str, layer: int, reverse: bool) -> dict:
    """One direction of one layer, in the zoo model's names (see each model's docstring)."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih = _array(getattr(module, "weight_ih" + suffix))            # [G·H, D_in], torch gate order
    w_hh = _array(getattr(module, "weight_hh" + suffix))            # [G·H, H]
    if module.bias:
        b_ih = _array(getattr(module, "bias_ih" + suffix))
        b_hh = _array(getattr(module, "bias_hh" + suffix))
    else:
        b_ih = b_hh = jnp.zeros((w_ih.shape[0],), jnp.float32)
    # zoo stores matrices input-major ([D_in, G·H]) with torch's gate order, so they transpose.
    params = {"w_in": w_ih.T, "w_rec": w_hh.T}
    if kind == "gru":
        # reset_after=True keeps b_hh apart: its n block sits inside r ⊙ (U_n h + b_hn).
        params.update(bias_in=b_ih, bias_rec=b_hh)
    else:
        params["bias"] = b_ih + b_hh
    return params


def _layer_model(module, kind: str) -> Recurrence:
    if kind == "elman":
        return get("elman", d_model=module.hidden_size, activation=module.nonlinearity)
    if kind == "lstm":
        return get("lstm", d_model=module.hidden_size, variant="np")
    return get("gru", d_model=module.hidden_size, reset_after=True)


def from_torch(module) -> tuple[Recurrence, Any]:
    """``(rec, params)`` computing what ``module`` computes (in eval mode), for float32 inputs.

    ``module`` is a ``torch.nn.RNN`` (``nonlinearity`` "tanh" or "relu"), ``torch.nn.LSTM``
    (``proj_size=0``) or ``torch.nn.GRU``, with any ``num_layers``, ``bidirectional``, ``bias`` and
    ``batch_first``. Each direction of each layer becomes zoo's ``elman``, ``lstm`` (variant "np")
    or ``gru`` (``reset_after=True``), whose params follow torch's gate order (transposed to
    [D_in, ·]). ``bias=False`` gives zero biases (zoo's models always have them).

    Structure of the result (L = num_layers):

    * one layer, one direction: the model itself; params a dict (``w_in``, ``w_rec``, ...).
    * ``bidirectional=True``: each layer is ``zoo.bidirectional(model, model, merge="concat")``
      with params ``{"forward", "backward"}``; outputs ``[forward, backward]`` concatenated on the
      last axis, as torch does.
    * ``num_layers > 1``: ``zoo.stack`` of the layers; params a tuple, one entry per layer.

    Layouts: the returned recurrence always takes ``xs`` [B, T, input_size]. For ``batch_first=True``
    that is the torch module's own layout; for ``batch_first=False`` torch takes [T, B, input_size],
    so ``module(x)`` corresponds to ``rec.apply(params, x.swapaxes(0, 1))`` with outputs swapped
    back. States do not depend on ``batch_first``: use ``state_from_torch`` / ``state_to_torch`` to
    move ``h_0`` / ``(h_0, c_0)`` [L·dirs, B, H] in and ``h_n`` / ``(h_n, c_n)`` out.

    Not converted: inter-layer ``dropout`` (active only in torch's training mode; the recurrence
    computes the eval-mode function). Weights become float32 JAX arrays whatever torch's dtype.
    """
    kind = _kind(module)
    model = _layer_model(module, kind)
    layers, params = [], []
    for layer in range(module.num_layers):
        if module.bidirectional:
            layers.append(bidirectional(model, model, merge="concat"))
            params.append({"forward": _direction_params(module, kind, layer, reverse=False),
                           "backward": _direction_params(module, kind, layer, reverse=True)})
        else:
            layers.append(model)
            params.append(_direction_params(module, kind, layer, reverse=False))
    if len(layers) == 1:
        return layers[0], params[0]
    return stack(*layers), tuple(params)


# --------------------------------------------------------------------------------------------
# States: torch's [L·dirs, B, H] stacks <-> the nested zoo state of ``from_torch``'s recurrence.


def _split_state(module, state) -> list:
    """The per-(layer, direction) states in torch's order: index = layer·dirs + direction."""
    per_layer = list(state) if module.num_layers > 1 else [state]
    if not module.bidirectional:
        return per_layer
    return [s for pair in per_layer for s in pair]


def _join_state(module, flat: list):
    dirs = 2 if module.bidirectional else 1
    per_layer = [tuple(flat[k * dirs:(k + 1) * dirs]) if dirs == 2 else flat[k]
                 for k in range(module.num_layers)]
    return tuple(per_layer) if module.num_layers > 1 else per_layer[0]


def _as_numpy(x, arg: str, shape: tuple[int, ...]) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, np.float32)
    if x.ndim != 3 or x.shape[0] != shape[0] or x.shape[2] != shape[2]:
        raise ValueError(f"state_from_torch: {arg} must have shape [L·dirs, B, H] = "
                         f"[{shape[0]}, B, {shape[2]}], got {x.shape}")
    return x


def state_from_torch(module, h_0, c_0=None):
    """The zoo state for ``from_torch(module)``'s recurrence from torch's ``h_0`` (and ``c_0``).

    ``h_0`` / ``c_0``: [num_layers · dirs, B, hidden_size] tensors or arrays, as torch takes them
    (``c_0`` only, and then always, for an LSTM).
    """
    kind = _kind(module)
    dirs = 2 if module.bidirectional else 1
    shape = (module.num_layers * dirs, None, module.hidden_size)
    if (c_0 is not None) != (kind == "lstm"):
        raise ValueError("state_from_torch: c_0 is needed for torch.nn.LSTM and only for it")
    h = _as_numpy(h_0, "h_0", shape)
    if kind != "lstm":
        return _join_state(module, [jnp.asarray(v) for v in h])
    c = _as_numpy(c_0, "c_0", shape)
    if c.shape != h.shape:
        raise ValueError(f"state_from_torch: c_0 has shape {c.shape} but h_0 has {h.shape}")
    pairs = zip(h, c, strict=True)
    return _join_state(module, [{"h": jnp.asarray(hv), "c": jnp.asarray(cv)} for hv, cv in pairs])


def state_to_torch(module, state):
    """torch's ``h_n`` (or ``(h_n, c_n)`` for an LSTM), numpy [num_layers · dirs, B, hidden_size]."""
    kind = _kind(module)
    flat = _split_state(module, state)
    if kind != "lstm":
        return np.stack([np.asarray(s) for s in flat])
    return np.stack([np.asarray(s["h"]) for s in flat]), np.stack([np.asarray(s["c"]) for s in flat])
