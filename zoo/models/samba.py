"""Samba: Mamba layers interleaved with sliding-window attention, each followed by a SwiGLU MLP.

Paper: L. Ren, Y. Liu, Y. Lu, Y. Shen, C. Liang, W. Chen, "Samba: Simple Hybrid State Space Models
for Efficient Unlimited Context Language Modeling" (arXiv 2406.07522, 2024), Section 2. Reference
code: github:microsoft/Samba (``lit_gpt/model.py``, ``Block`` with ``mb_per_layer=2``; configs
``Samba_421M`` ... in ``lit_gpt/config.py``).

The layers alternate Mamba and SWA (Mamba at even indices, as the reference's ``mb_per_layer=2``),
and every layer has an MLP, so each pair of layers reads Mamba–MLP–SWA–MLP (x ∈ R^D, D = d_model)::

    h = x + Mamba(RMSNorm(x));    x' = h + SwiGLU(RMSNorm(h))        layer 2i
    h = x' + SWA(RMSNorm(x'));    y = h + SwiGLU(RMSNorm(h))          layer 2i+1
    SwiGLU(z) = W_down (SiLU(W_gate z) ⊙ W_up z)                       hidden width d_mlp, no biases

``n_layers`` counts both kinds, as the reference's ``n_layer`` does (Samba-421M: 12, i.e. 6 Mamba
and 6 SWA layers); the tiny default 2 is one Mamba layer and one SWA layer.

* Mamba: ``zoo.models.mamba`` (selective scan, the paper's Mamba-1 block).
* SWA (``sliding_window_attention`` below, on ``zoo.ops.softmax``): multi-head attention (H query
  heads of width K = D/H, G = n_kv_heads key/value heads; Samba-421M has G = H, the repository's GQA
  and MQA variants fewer), RoPE on the whole head
  (base 10 000, entry i paired with i + K/2 as in the reference's non-interleaved rotary), no
  biases; query t sees itself and the ``window`` tokens before it.
* The model is ``zoo.hybrid({"mamba": ..., "swa": ...}, "mamba,swa,...")`` (n_layers entries; each layer
  is ``zoo.residual``: RMSNorm, mixer, add, RMSNorm, SwiGLU, add), then a final RMSNorm. An input
  projection ``w_in`` maps d_in to D when they differ (none for d_in = D, the language-model case).

State: a tuple with one entry per layer: Mamba's ``(conv_window [B, d_conv-1, E], h [B, E, N])``
and SWA's sliding window ``{"keys": [B, W, G, K], "values": [B, W, G, K], "valid": [B, W]}``;
decoding one token costs O(window) whatever the length. Modes: ``"sequential"`` (both engines step
by step) and ``"chunked"`` (Mamba's chunked scan, SWA's block-local attention), the modes both
engines have; Mamba's ``"associative"`` scan is left out (it holds every step's state).

What differs from the reference, and why:

* ``window`` counts the tokens before the query, as in ``zoo.ops.softmax`` and Griffin: the
  reference's ``local_window = 2048`` (flash-attn ``window_size=(2047, 0)``) is ``window=2047``.
* RMSNorm uses eps = 1e-6 (``zoo.residual``'s); the reference uses 1e-5. The residual stream is in
  the compute dtype; the reference keeps it in float32 after Mamba layers.
* RoPE is applied by relative offset inside the attention window (``zoo.ops.softmax``), so the state
  holds no position; the scores equal the reference's absolute-position ones up to rounding.
* Init: projections LeCun-normal (``dense_init``) instead of torch's defaults; as in the reference's
  ``mamba_init``, the output projections of each mixer and MLP are divided by sqrt(2 · n_layers).
* ``reset`` (packed sequences) and ``reverse=True`` are zoo's additions.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from zoo.combinators import hybrid, norm_init, rms_norm
from zoo.contract import make_recurrence
from zoo.models import mamba
from zoo.models._common import cast, dense_init
from zoo.ops import selective, softmax
from zoo.registry import register

PAPER = "Samba: Simple Hybrid State Space Models for Efficient Unlimited Context Language Modeling"
ROPE_BASE = 10_000.0
SWA_MODES = softmax.LOCAL_MODES
# The modes both engines name: each means the same for every layer. (Mamba's "associative" scan holds
# every step's state; zoo.hybrid of the same mixers offers it.)
MODES = tuple(m for m in selective.MODES if m in SWA_MODES)


@dataclasses.dataclass(frozen=True)
class SambaConfig:
    d_model: int = 16
    n_layers: int = 2                # the reference's n_layer: Mamba at even, SWA at odd layer indices
    n_heads: int = 2                 # attention query heads, of width d_model / n_heads
    n_kv_heads: int | None = None    # key/value heads; None: n_heads (multi-head, as Samba)
    window: int = 4                  # attention sees itself and the `window` tokens before it
    d_mlp: int = 32                  # SwiGLU hidden width (the reference's intermediate_size)
    d_state: int = 4                 # Mamba's N
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None       # None: ceil(d_model / 16)
    rope_base: float = ROPE_BASE
    chunk_size: int = 64             # Mamba steps per chunk in mode="chunked"

    def __post_init__(self):
        for field in ("n_layers", "d_mlp"):
            _check_positive_int("samba", field, getattr(self, field))
        check_attention("samba", self.d_model, self.n_heads, self.n_kv_heads, self.window, self.rope_base)
        try:
            self.mamba_config()
        except ValueError as error:
            raise ValueError(f"samba: {error}") from error

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def pattern(self) -> tuple[str, ...]:
        return tuple(("mamba", "swa")[i % 2] for i in range(self.n_layers))

    def mamba_config(self) -> mamba.MambaConfig:
        return mamba.MambaConfig(d_model=self.d_model, d_state=self.d_state, d_conv=self.d_conv,
                                 expand=self.expand, dt_rank=self.dt_rank, chunk_size=self.chunk_size)


def _check_positive_int(who: str, field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {field} must be a positive int, got {value!r}")


def check_attention(who: str, d_model, n_heads, n_kv_heads, window, rope_base) -> None:
    """The SWA layer's shape arguments: heads that divide d_model into even widths (RoPE pairs)."""
    for field, value in (("d_model", d_model), ("n_heads", n_heads), ("window", window)):
        _check_positive_int(who, field, value)
    if n_kv_heads is not None:
        _check_positive_int(who, "n_kv_heads", n_kv_heads)
    if d_model % n_heads:
        raise ValueError(f"{who}: d_model={d_model} must be a multiple of n_heads={n_heads}")
    if (d_model // n_heads) % 2:
        raise ValueError(f"{who}: the head width d_model / n_heads = {d_model // n_heads} must be even "
                         f"for RoPE (d_model={d_model}, n_heads={n_heads})")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"{who}: n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    if not rope_base > 1:
        raise ValueError(f"{who}: rope_base must be > 1, got {rope_base!r}")


def state_size(config: SambaConfig) -> int:
    head = config.d_model // config.n_heads
    swa = config.window * (2 * config.kv_heads * head + 1)
    sizes = {"mamba": mamba.state_size(config.mamba_config()), "swa": swa}
    return sum(sizes[kind] for kind in config.pattern)


# --------------------------------------------------------------------------------------------
# The sliding-window attention mixer.


def sliding_window_attention(d_model: int, n_heads: int, window: int, n_kv_heads: int | None = None,
                             rope_base: float = ROPE_BASE):
    """Samba's SWA layer as a Recurrence: [B, T, d_in] -> [B, T, d_model].

    q = x W_q, k = x W_k, v = x W_v split into heads (``n_kv_heads`` key/value heads shared by
    groups of query heads), RoPE on the whole of each q and k head, softmax attention of each query
    over itself and the ``window`` keys before it, o = concat_h(o_h) W_o. No biases.
    """
    check_attention("swa", d_model, n_heads, n_kv_heads, window, rope_base)
    kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    head = d_model // n_heads
    rope = softmax.Rope(dims=head, base=rope_base)

    def init(key, d_in):
        k_q, k_k, k_v, k_o = jax.random.split(key, 4)
        return {"w_q": dense_init(k_q, d_in, n_heads * head),
                "w_k": dense_init(k_k, d_in, kv_heads * head),
                "w_v": dense_init(k_v, d_in, kv_heads * head),
                "w_o": dense_init(k_o, n_heads * head, d_model)}

    def qkv(params, x):
        p = cast(params, x.dtype)
        heads = lambda y, n: y.reshape(*x.shape[:-1], n, head)
        return heads(x @ p["w_q"], n_heads), heads(x @ p["w_k"], kv_heads), heads(x @ p["w_v"], kv_heads)

    def out(params, o):
        o = o.reshape(*o.shape[:-2], n_heads * head)
        return o @ params["w_o"].astype(o.dtype)

    def initial_state(params, batch):
        return softmax.initial_state(batch, window, kv_heads, head, head)

    def step(params, state, x_t):
        state, o = softmax.step(state, *qkv(params, x_t), rope=rope)
        return state, out(params, o)

    def apply(params, xs, state, reset, mode, reverse):
        o, state = softmax.apply(*qkv(params, xs), initial_state=state, reset=reset, reverse=reverse,
                                 mode=mode, rope=rope)
        return out(params, o), state

    return make_recurrence("swa", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=lambda p: p["w_q"].shape[0], modes=SWA_MODES, default_d_in=d_model)


# --------------------------------------------------------------------------------------------
# The model.


def _scale_output_projections(layers, factor: float):
    """The reference's mamba_init: each residual branch's last projection divided by sqrt(2 L)."""
    scaled = []
    for layer in layers:
        layer = dict(layer, mixer=dict(layer["mixer"]), mlp=dict(layer["mlp"]))
        out = "w_out" if "w_out" in layer["mixer"] else "w_o"
        layer["mixer"][out] = layer["mixer"][out] * factor
        layer["mlp"]["w_down"] = layer["mlp"]["w_down"] * factor
        scaled.append(layer)
    return tuple(scaled)


@register("samba", config=SambaConfig, paper=PAPER, engine="selective+softmax", modes=MODES,
          state_size=state_size)
def build(config: SambaConfig):
    d = config.d_model
    mixers = {"mamba": mamba.build(config.mamba_config()),
              "swa": sliding_window_attention(d, config.n_heads, config.window, config.n_kv_heads,
                                              config.rope_base)}
    # residual's SwiGLU has hidden width round(2/3 · mlp_ratio · D): this ratio gives d_mlp.
    layers = hybrid(mixers, config.pattern, mlp_ratio=1.5 * config.d_mlp / d, norm="rms", mlp="swiglu")

    def init(key, d_in):
        k_in, k_layers = jax.random.split(key)
        params = {"layers": _scale_output_projections(layers.init(k_layers, d),
                                                      1.0 / math.sqrt(2 * config.n_layers)),
                  "final_norm": norm_init("rms", d)}
        if d_in != d:
            params["w_in"] = dense_init(k_in, d_in, d)
        return params

    def read(params, x):
        return x @ params["w_in"].astype(x.dtype) if "w_in" in params else x

    def initial_state(params, batch):
        return layers.initial_state(params["layers"], batch)

    def step(params, state, x_t):
        state, h = layers.step(params["layers"], state, read(params, x_t))
        return state, rms_norm(params["final_norm"], h)

    def apply(params, xs, state, reset, mode, reverse):
        hs, state = layers.apply(params["layers"], read(params, xs), state=state, reset=reset, mode=mode,
                                 reverse=reverse)
        return rms_norm(params["final_norm"], hs), state

    def input_width(params):
        return params["w_in"].shape[0] if "w_in" in params else d

    return make_recurrence("samba", init=init, initial_state=initial_state, step=step, apply=apply,
                           input_width=input_width, modes=MODES, default_d_in=d)
