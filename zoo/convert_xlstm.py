"""Weight converter: the ``xlstm`` package's sLSTM layer and block as zoo's ``slstm`` model.

    from zoo.convert import from_xlstm               # (this module: zoo.convert_xlstm)

    rec, params = from_xlstm(module)                 # xlstm sLSTMLayer, or sLSTMBlock / xLSTMBlock
    ys, state = rec.apply(params, xs)                # xs [B, T, embedding_dim], batch first like xlstm
    state = state_from_xlstm(module, conv_state, slstm_state)     # xlstm's states -> zoo's
    conv_state, slstm_state = state_to_xlstm(module, state)      # and back (numpy)

The weights are read from the torch module's tensors (no pickle); torch and xlstm are optional (the
``refs`` extra) and only the module's own attributes are touched, so this module imports neither.
Either backend's module converts ("vanilla" or "cuda": the cell's ``recurrent_kernel`` and ``bias``
proxies give one external layout). Dropout is not converted (the recurrence computes eval mode).

Layout notes (see zoo/models/slstm.py for zoo's):

* ``sLSTMLayer`` feeds ``torch.cat([fgate(x_c), igate(x_c), zgate(x), ogate(x)])`` to the cell, whose
  gate order is (i, f, z, o): the submodule named ``fgate`` makes the *input*-gate pre-activation and
  ``igate`` the forget gate's. zoo names the weights by the gate they feed: ``w_i`` is ``fgate``'s.
* ``LinearHeadwiseExpand.weight`` [H, out, in] -> [H, in, out]; the cell's ``recurrent_kernel``
  [H, d, 4, d] and ``bias`` [H, 4, d] -> ``r`` (as is) and ``bias`` [4, H·d].
* xlstm's norms hold ``weight`` with a multiplier ``1 + weight`` (``weight_proxy``); zoo stores the
  multiplier. The conv weight [D, 1, K] -> [K, D].
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from zoo.contract import Recurrence
from zoo.registry import get


def _array(tensor) -> jnp.ndarray:
    return jnp.asarray(np.asarray(tensor.detach().cpu().double().numpy(), np.float32))


def _layer_and_block(module):
    """(sLSTMLayer, the block around it or None); TypeError for anything else."""
    kind = type(module).__name__
    inner = getattr(module, "xlstm", None)
    if kind == "sLSTMLayer":
        return module, None
    if type(inner).__name__ == "sLSTMLayer" and hasattr(module, "xlstm_norm"):
        return inner, module
    raise TypeError(f"from_xlstm: expected xlstm's sLSTMLayer, or an sLSTMBlock / xLSTMBlock holding one, "
                    f"got {kind}" + (f" holding {type(inner).__name__}" if inner is not None else ""))


def _scale(norm, arg: str, width: int) -> jnp.ndarray:
    """A norm's multiplier (``1 + weight`` in xlstm's LayerNorm, or ones without a weight)."""
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"from_xlstm: {arg} has a bias; zoo's slstm norms have none")
    weight = norm.weight_proxy
    return jnp.ones((width,), jnp.float32) if weight is None else _array(weight)


def _eps(norms) -> float:
    values = {float(norm.eps) for norm in norms}
    if len(values) != 1:
        raise ValueError(f"from_xlstm: the module's norms use different eps {sorted(values)}; zoo's slstm "
                         f"has one norm_eps")
    return values.pop()


def _layer_params(layer) -> tuple[dict, dict]:
    """(config, params) of the sLSTM layer alone."""
    cfg = layer.config
    if cfg.function != "slstm":
        raise ValueError(f"from_xlstm: the cell computes function={cfg.function!r}; only 'slstm' converts")
    d, heads = cfg.embedding_dim, cfg.num_heads
    config = {"d_model": d, "n_heads": heads, "d_conv": int(cfg.conv1d_kernel_size), "forget_gate": "sigmoid"}
    cell = layer.slstm_cell
    gates = {"i": layer.fgate, "f": layer.igate, "z": layer.zgate, "o": layer.ogate}   # see the docstring
    params = {}
    for name, linear in gates.items():
        if linear.bias is not None:
            raise ValueError(f"from_xlstm: the {name}-gate projection has a bias; xlstm's sLSTMLayer has "
                             f"none")
        params[f"w_{name}"] = jnp.transpose(_array(linear.weight), (0, 2, 1))
    params["r"] = _array(cell.recurrent_kernel[...])                              # [H, d, 4, d]
    params["bias"] = jnp.transpose(_array(cell.bias[...]), (1, 0, 2)).reshape(4, d)
    params["out_norm_scale"] = _scale(layer.group_norm, "group_norm", d)
    if config["d_conv"]:
        conv = layer.conv1d.conv
        if conv.groups != d:
            raise ValueError("from_xlstm: the convolution mixes channels (channel_mixing=True); zoo's is "
                             "depthwise")
        params["conv_kernel"] = jnp.transpose(_array(conv.weight)[:, 0, :])         # [K, D]
        params["conv_bias"] = (_array(conv.bias) if conv.bias is not None
                               else jnp.zeros((d,), jnp.float32))
    return config, params


def from_xlstm(module) -> tuple[Recurrence, Any]:
    """``(rec, params)`` computing what ``module`` computes (in eval mode), for float32 inputs.

    ``module``: xlstm's ``sLSTMLayer`` (zoo ``slstm`` with ``block=False``: x -> GroupNorm(sLSTM(x)))
    or an ``sLSTMBlock`` / ``xLSTMBlock`` with an sLSTM layer (``block=True``: pre-LayerNorm,
    residual, and the gated FFN when the block has one), for example
    ``xLSTMBlockStack(...).blocks[k]``. The stack's ``post_blocks_norm`` is not part of a block.
    The returned recurrence takes ``xs`` [B, T, embedding_dim], as xlstm does.
    """
    layer, block = _layer_and_block(module)
    config, params = _layer_params(layer)
    norms = [layer.group_norm]
    if block is None:
        config["block"] = False
    else:
        d = config["d_model"]
        config["block"] = True
        params["norm_scale"] = _scale(block.xlstm_norm, "xlstm_norm", d)
        norms.append(block.xlstm_norm)
        ffn = block.ffn
        if ffn is None:
            config["ffn_proj_factor"] = 0.0
        else:
            if type(ffn).__name__ != "GatedFeedForward":
                raise TypeError(f"from_xlstm: the block's FFN is {type(ffn).__name__}; only GatedFeedForward "
                                f"converts")
            width = ffn.proj_down.in_features
            config.update(ffn_proj_factor=width / d, ffn_act=ffn.config.act_fn,
                          ffn_bias=ffn.proj_up.bias is not None)
            params.update(ffn_norm_scale=_scale(block.ffn_norm, "ffn_norm", d),
                          w_up=_array(ffn.proj_up.weight).T, w_down=_array(ffn.proj_down.weight).T)
            if ffn.proj_up.bias is not None:
                params.update(b_up=_array(ffn.proj_up.bias), b_down=_array(ffn.proj_down.bias))
            norms.append(block.ffn_norm)
    config["norm_eps"] = _eps(norms)
    return get("slstm", **config), params


# --------------------------------------------------------------------------------------------
# States: xlstm's (conv_state, slstm_state) <-> zoo's (window, h, c, n, m).


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, np.float32)


def state_from_xlstm(module, conv_state=None, slstm_state=None, *, batch_size: int | None = None):
    """zoo's state for ``from_xlstm(module)`` from xlstm's states (zeros where one is None).

    ``slstm_state``: [4, B, D] = (y, c, n, m), what ``sLSTMLayer.forward(..., return_last_state=True)``
    and ``step`` return under ``"slstm_state"``. ``conv_state``: [B, K-1, D] from ``forward`` (the last
    K − 1 inputs), or ``step``'s tuple ``(window [B, K, D],)`` whose oldest row is dropped.
    """
    layer, _ = _layer_and_block(module)
    d, taps = layer.config.embedding_dim, int(layer.config.conv1d_kernel_size)
    if slstm_state is not None:
        memory = _numpy(slstm_state)
        if memory.ndim != 3 or memory.shape[0] != 4 or memory.shape[2] != d:
            raise ValueError(f"state_from_xlstm: slstm_state must have shape [4, B, D] = [4, B, {d}], got "
                             f"{memory.shape}")
        batch = memory.shape[1]
    elif batch_size is not None:
        batch = batch_size
        memory = np.zeros((4, batch, d), np.float32)
    else:
        raise ValueError("state_from_xlstm: give slstm_state or batch_size")
    state = tuple(jnp.asarray(s) for s in memory)
    if not taps:
        return state
    if conv_state is None:
        window = np.zeros((batch, taps - 1, d), np.float32)
    else:
        if isinstance(conv_state, (tuple, list)):          # step's (window of the last K inputs,)
            (conv_state,) = conv_state
            conv_state = _numpy(conv_state)[:, 1:]
        window = _numpy(conv_state)
        if window.shape != (batch, taps - 1, d):
            raise ValueError(f"state_from_xlstm: conv_state must have shape [B, K-1, D] = "
                             f"{(batch, taps - 1, d)} (or step's ([B, K, D],)), got {window.shape}")
    return (jnp.asarray(window), *state)


def state_to_xlstm(module, state):
    """``(conv_state [B, K-1, D] or None, slstm_state [4, B, D])`` as numpy, in ``forward``'s layout."""
    layer, _ = _layer_and_block(module)
    taps = int(layer.config.conv1d_kernel_size)
    window, memory = (state[0], state[1:]) if taps else (None, state)
    return (None if window is None else np.asarray(window)), np.stack([np.asarray(s) for s in memory])
