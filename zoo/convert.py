"""Weight converters: PyTorch recurrent layers and recurrentgemma's Griffin/Hawk as zoo models.

    from zoo.convert import from_torch, state_from_torch, state_to_torch

    rec, params = from_torch(torch_module)          # torch.nn.RNN / LSTM / GRU
    ys, state = rec.apply(params, xs)               # xs [B, T, input_size] -> ys [B, T, dirs * H]
    h_n = state_to_torch(torch_module, state)       # (h_n, c_n) for an LSTM, as torch lays them out

    config, lm = from_recurrentgemma(rg_params, rg_config)   # recurrentgemma.jax.Griffin's Flax params
    logits, state = zoo.models.griffin.lm_apply(config, lm, tokens)

    rec, params = from_xlstm(slstm_layer_or_block)  # xlstm's sLSTMLayer / sLSTMBlock (zoo.convert_xlstm)

torch is optional (the ``refs`` extra) and imported only inside these functions; the recurrentgemma
converter reads plain arrays and needs no recurrentgemma import.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from zoo.combinators import bidirectional, stack
from zoo.contract import Recurrence
from zoo.convert_xlstm import from_xlstm, state_from_xlstm, state_to_xlstm  # noqa: F401  (re-exported)
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


# --------------------------------------------------------------------------------------------
# recurrentgemma (Griffin, Hawk): its Flax parameter tree -> zoo's griffin language model.


def _rg_array(x) -> jnp.ndarray:
    # jnp, not np: the conversion is traceable, so gradients can flow back to recurrentgemma's tree.
    return jnp.asarray(x, jnp.float32)


def _rg_block_kind(block_type) -> str:
    """recurrentgemma's TemporalBlockType (or its name) -> "recurrent" / "attention"."""
    name = getattr(block_type, "name", block_type)
    kind = str(name).lower()
    if kind not in ("recurrent", "attention"):
        raise ValueError(f"from_recurrentgemma: unknown block type {block_type!r}")
    return kind


def from_recurrentgemma_rglru(params) -> dict:
    """One ``recurrentgemma.jax.layers.RGLRU``'s params (``a_param``, ``input_gate``, ``a_gate``) as
    zoo's RG-LRU layer params (``zoo.models.rglru.layer_init`` names). Only the real RG-LRU exists
    in zoo: a complex one (``a_imag_param``) raises."""
    params = params.get("params", params)
    if "a_imag_param" in params:
        raise ValueError("from_recurrentgemma: this RG-LRU is complex (lru_only_real=False); zoo's rglru is "
                         "the real RG-LRU of the released models")
    return {
        "a_param": _rg_array(params["a_param"]),
        "w_input_gate": _rg_array(params["input_gate"]["w"]),
        "b_input_gate": _rg_array(params["input_gate"]["b"]),
        "w_a_gate": _rg_array(params["a_gate"]["w"]),
        "b_a_gate": _rg_array(params["a_gate"]["b"]),
    }


def _rg_dense(layer, w: str, b: str) -> dict:
    out = {w: _rg_array(layer["kernel"])}
    if "bias" in layer:
        out[b] = _rg_array(layer["bias"])
    return out


def _rg_norm(layer) -> dict:
    # recurrentgemma's RMSNorm multiplies by (scale + 1); zoo stores the multiplier itself.
    return {"scale": _rg_array(layer["scale"]) + 1.0}


def _rg_recurrent_block(p) -> dict:
    return {**_rg_dense(p["linear_x"], "w_x", "b_x"), **_rg_dense(p["linear_y"], "w_y", "b_y"),
            # Conv1D.w [K, C] already has zoo's layout: w[K-1] multiplies the current input.
            "conv_w": _rg_array(p["conv_1d"]["w"]), "conv_b": _rg_array(p["conv_1d"]["b"]),
            "rglru": from_recurrentgemma_rglru(p["rg_lru"]),
            **_rg_dense(p["linear_out"], "w_out", "b_out")}


def _rg_attention_block(p) -> dict:
    return {"w_q": _rg_array(p["proj_q"]["kernel"]), "w_k": _rg_array(p["proj_k"]["kernel"]),
            "w_v": _rg_array(p["proj_v"]["kernel"]), **_rg_dense(p["proj_final"], "w_o", "b_o")}


def _rg_mlp(p) -> dict:
    up_w, up_b = _rg_array(p["ffw_up"]["w"]), _rg_array(p["ffw_up"]["b"])   # [2, D, M], [2, 1, 1, M]
    return {"w_gate": up_w[0], "b_gate": up_b[0].reshape(-1), "w_up": up_w[1], "b_up": up_b[1].reshape(-1),
            **_rg_dense(p["ffw_down"], "w_down", "b_down")}


def from_recurrentgemma(params, config):
    """``(zoo_config, lm_params)`` for recurrentgemma's JAX Griffin (or Hawk) model.

    ``params`` is the Flax parameter tree of ``recurrentgemma.jax.Griffin`` (with or without the
    outer ``{"params": ...}``), ``config`` its ``recurrentgemma.GriffinConfig``. The result runs
    with ``zoo.models.griffin``::

        from zoo.models import griffin
        zoo_config, lm = from_recurrentgemma(params, rg_config)
        logits, state = griffin.lm_apply(zoo_config, lm, tokens)            # [B, T, vocab]
        state, logits_t = griffin.lm_step(zoo_config, lm, state, tokens_t)  # decoding

    and gives recurrentgemma's logits for ``segment_pos = arange(T)`` (packed sequences: pass
    ``reset = segment_pos == 0``). The backbone alone is ``zoo.get("griffin", **asdict(zoo_config))``
    with params ``lm["backbone"]``. Weights become float32 arrays; recurrentgemma's
    ``scan_type`` has no counterpart (zoo's ``mode`` chooses the scan).
    """
    from zoo.models.griffin import GriffinConfig

    params = params.get("params", params)
    kinds = tuple(_rg_block_kind(t) for t in config.block_types)
    blocks = []
    for i, kind in enumerate(kinds):
        p = params[f"blocks.{i}"]
        temporal = (_rg_recurrent_block(p["recurrent_block"]) if kind == "recurrent"
                    else _rg_attention_block(p["attention_block"]))
        blocks.append({"temporal_norm": _rg_norm(p["temporal_pre_norm"]), "temporal": temporal,
                       "mlp_norm": _rg_norm(p["channel_pre_norm"]), "mlp": _rg_mlp(p["mlp_block"])})
    conv_width = next((b["temporal"]["conv_w"].shape[0] for b, k in zip(blocks, kinds, strict=True)
                       if k == "recurrent"), 4)
    zoo_config = GriffinConfig(
        d_model=int(config.width), d_rnn=int(config.lru_width or config.width),
        d_mlp=int(config.mlp_expanded_width), n_heads=int(config.num_heads), block_types=kinds,
        window=int(config.attention_window_size), conv_width=int(conv_width),
        vocab_size=int(config.vocab_size),
        scale_embeddings=bool(config.embeddings_scale_by_sqrt_dim),
        logits_soft_cap=float(config.logits_soft_cap or 0.0))
    lm = {"embedding": _rg_array(params["embedder"]["input_embedding"]),
          "backbone": {"blocks": tuple(blocks), "final_norm": _rg_norm(params["final_norm"])}}
    return zoo_config, lm
