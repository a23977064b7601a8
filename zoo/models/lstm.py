"""LSTM and the eight variants of "LSTM: A Search Space Odyssey".

Papers: S. Hochreiter and J. Schmidhuber, "Long Short-Term Memory" (1997); F. A. Gers, J. Schmidhuber
and F. Cummins, "Learning to Forget: Continual Prediction with LSTM" (2000); K. Greff, R. K.
Srivastava, J. Koutník, B. R. Steunebrink and J. Schmidhuber, "LSTM: A Search Space Odyssey" (IEEE
TNNLS, 2017), whose vanilla LSTM ("V") and variants are implemented here, in that paper's notation::

    z_t = g(W_z x_t + R_z h_{t-1} + b_z)                         block input, g = tanh
    i_t = σ(W_i x_t + R_i h_{t-1} + p_i ⊙ c_{t-1} + b_i)         input gate
    f_t = σ(W_f x_t + R_f h_{t-1} + p_f ⊙ c_{t-1} + b_f)         forget gate
    c_t = z_t ⊙ i_t + c_{t-1} ⊙ f_t                              cell
    o_t = σ(W_o x_t + R_o h_{t-1} + p_o ⊙ c_t + b_o)             output gate (peeks at the new cell)
    h_t = φ(c_t) ⊙ o_t,   y_t = h_t                               φ = tanh

``variant=`` (lower case) selects one change to V:

=========  ======================================================================================
vanilla    V above, with diagonal peepholes p_i, p_f, p_o (the default)
nig        no input gate: i_t = 1
nfg        no forget gate: f_t = 1 (the 1997 LSTM; c accumulates without forgetting)
nog        no output gate: o_t = 1
niaf       no input activation: g(x) = x
noaf       no output activation: φ(x) = x, so h_t = c_t ⊙ o_t
np         no peepholes. **This is the LSTM of torch.nn.LSTM, flax OptimizedLSTMCell and cuDNN.**
cifg       coupled input and forget gate: f_t = 1 - i_t (no forget-gate weights)
fgr        full gate recurrence: i, f and o also receive i_{t-1}, f_{t-1}, o_{t-1} through a
           [3D, 3D] matrix (the state carries the previous gates)
=========  ======================================================================================

Parameters (D = d_model, D_in = input width; the gates that a variant drops have no parameters):

* ``w_in`` [D_in, n·D] and ``w_rec`` [D, n·D]: the gate pre-activations fused in one matrix each.
  Column blocks of width D follow the order **(i, f, z, o)** (torch's i, f, g, o), skipping the
  gates the variant removes: nig -> (f, z, o), nfg -> (i, z, o), nog -> (i, f, z), cifg -> (i, z, o),
  every other variant -> (i, f, z, o). So for "np", ``w_in = weight_ih_l0.T``,
  ``w_rec = weight_hh_l0.T`` and ``bias = bias_ih_l0 + bias_hh_l0`` of a torch.nn.LSTM.
* ``bias`` [n·D], same order; the forget-gate block starts at ``forget_bias`` (+1), the rest at 0.
* ``peep_i``, ``peep_f``, ``peep_o`` [D]: the diagonal peepholes of the gates present (not in "np").
* ``w_gate_rec`` [3D, 3D] ("fgr" only): rows and columns in the order (i, f, o).

``recurrence="diagonal"`` is ParaLSTM ("ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for
Large Language Models", Danieli et al., 2025): each R_g becomes a vector r_g, so R_g h_{t-1} becomes
r_g ⊙ h_{t-1}. Unit j of (h_t, c_t) then depends only on unit j of (h_{t-1}, c_{t-1}): the Jacobian is
block-diagonal with D blocks of 2x2, which ``mode="newton"`` declares and solves. ``w_rec`` is then
[n·D]; not with "fgr", whose gate recurrence mixes units by design.

State: ``{"h": [B, D], "c": [B, D]}`` (+ ``"gates": [B, 3D]`` = (i, f, o) at t-1 for "fgr"), float32.

Changes from the paper: the gate order inside the fused matrices follows torch so that weights
convert by transposition; the forget-gate bias starts at +1 (Gers et al.; Jozefowicz et al.), which
the paper's initialisation does not do; ``w_rec`` starts orthogonal. The cell update runs in float32
whatever the compute dtype, since c is the long-term memory. Engine: nonlinear, as a ``SplitCell``
(one fused [x_t, h] @ [w_in; w_rec] product per step, the rest pointwise; the weight gradients are
single products over all steps after the backward loop).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models._common import (
    cast,
    cell_recurrence,
    check_recurrence,
    dense_init,
    diagonal_recurrent_init,
    input_projection,
    orthogonal_init,
)
from zoo.models._fused import check_implementation, fused_apply
from zoo.ops import nonlinear
from zoo.registry import register

VARIANTS = ("vanilla", "nig", "nfg", "nog", "niaf", "noaf", "np", "cifg", "fgr")
_DROPPED = {"nig": "i", "nfg": "f", "nog": "o", "cifg": "f"}


def gate_order(variant: str) -> tuple[str, ...]:
    """The column blocks of ``w_in``, ``w_rec`` and ``bias`` for this variant, in order."""
    return tuple(g for g in ("i", "f", "z", "o") if g != _DROPPED.get(variant))


def peepholes(variant: str) -> tuple[str, ...]:
    """The gates that have a diagonal peephole in this variant."""
    if variant == "np":
        return ()
    return tuple(g for g in ("i", "f", "o") if g in gate_order(variant))


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    d_model: int = 32
    variant: str = "vanilla"
    forget_bias: float = 1.0
    recurrence: str = "dense"          # "dense" R [D, n·D], or "diagonal" r [n·D] (ParaLSTM)
    # "xla", "pallas" (pallas_kernels.fused_rnn_cell, for "vanilla" and "np"), a tuple tried in turn,
    # or None: the kernel on GPU/TPU in mode "auto" (zoo/models/_fused.py).
    implementation: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"lstm: variant={self.variant!r}; choose one of {VARIANTS}")
        check_implementation("lstm", self.implementation)
        check_recurrence("lstm", self.recurrence)
        if self.recurrence == "diagonal" and self.variant == "fgr":
            raise ValueError("lstm: recurrence='diagonal' does not combine with variant='fgr' (its gate "
                             "recurrence mixes units)")
        if self.d_model <= 0:
            raise ValueError(f"lstm: d_model must be positive, got {self.d_model}")


def _state_size(config: LSTMConfig) -> int:
    return (5 if config.variant == "fgr" else 2) * config.d_model


@register("lstm", config=LSTMConfig, paper="LSTM: A Search Space Odyssey", engine="nonlinear",
          modes=nonlinear.MODES, state_size=_state_size)
def build(config: LSTMConfig):
    d, variant = config.d_model, config.variant
    order = gate_order(variant)
    peeps = peepholes(variant)
    block = {g: slice(k * d, (k + 1) * d) for k, g in enumerate(order)}
    in_act = (lambda a: a) if variant == "niaf" else jnp.tanh
    out_act = (lambda a: a) if variant == "noaf" else jnp.tanh
    fgr = variant == "fgr"

    def init(key, d_in):
        k_in, k_rec, k_gate = jax.random.split(key, 3)
        n = len(order)
        bias = jnp.zeros((n * d,))
        if "f" in block:
            bias = bias.at[block["f"]].set(config.forget_bias)
        w_rec = (diagonal_recurrent_init(k_rec, d, n) if config.recurrence == "diagonal"
                 else orthogonal_init(k_rec, d, n))
        params = {"w_in": dense_init(k_in, d_in, n * d), "w_rec": w_rec,
                  "bias": bias}
        params.update({f"peep_{g}": jnp.zeros((d,)) for g in peeps})
        if fgr:
            params["w_gate_rec"] = dense_init(k_gate, 3 * d, 3 * d)
        return params

    def recurrent_weight(params):
        if not fgr:
            return params["w_rec"]
        # Rows for (i, f, o)_{t-1} feed the i, f and o columns; the block input z gets none.
        w_g = params["w_gate_rec"]
        zero = jnp.zeros((3 * d, d), w_g.dtype)
        from_gates = jnp.concatenate([w_g[:, :2 * d], zero, w_g[:, 2 * d:]], axis=1)
        return jnp.concatenate([params["w_rec"], from_gates], axis=0)

    def read(h):
        return jnp.concatenate([h["h"], h["gates"]], axis=-1) if fgr else h["h"]

    def pointwise(params, pre, h):
        p = cast({k: v for k, v in params.items() if k.startswith("peep_")}, pre.dtype)
        c_prev = h["c"]
        c_prev_lo = c_prev.astype(pre.dtype)
        # One split, not a slice per gate: the VJP of a split is one concatenate, while each slice's is a
        # pad of the whole [B, n·D] row, which XLA CPU then adds up (8% of a profiled LSTM fwd+bwd).
        parts = dict(zip(order, jnp.split(pre, len(order), axis=-1), strict=True))
        gate = {}
        for g in ("i", "f"):
            if g in block:
                a = parts[g]
                gate[g] = jax.nn.sigmoid(a + p[f"peep_{g}"] * c_prev_lo if g in peeps else a)
        one = jnp.ones_like(c_prev_lo)
        i = gate.get("i", one)
        f = 1 - i if variant == "cifg" else gate.get("f", one)
        z = in_act(parts["z"])
        c = f.astype(jnp.float32) * c_prev + (i * z).astype(jnp.float32)
        c_lo = c.astype(pre.dtype)
        if "o" in block:
            a = parts["o"]
            o = jax.nn.sigmoid(a + p["peep_o"] * c_lo if "o" in peeps else a)
        else:
            o = one
        y = out_act(c_lo) * o
        new = {"h": y.astype(jnp.float32), "c": c}
        if fgr:
            new["gates"] = jnp.concatenate([i, f, o], axis=-1).astype(jnp.float32)
        return new, y

    cell = nonlinear.SplitCell(input_weight=lambda p: p["w_in"], recurrent_weight=recurrent_weight,
                               read=read, pointwise=pointwise, bias=lambda p: p["bias"])

    def initial_state(params, batch):
        state = {"h": jnp.zeros((batch, d), jnp.float32), "c": jnp.zeros((batch, d), jnp.float32)}
        if fgr:
            state["gates"] = jnp.zeros((batch, 3 * d), jnp.float32)
        return state

    def prepare(params, xs):
        """The fused kernel's inputs: the hoisted input projection, W_rec, the peepholes (i, f, o)."""
        kwargs = {}
        if peeps:
            kwargs["peepholes"] = jnp.stack([params[f"peep_{g}"] for g in ("i", "f", "o")])
        return input_projection(params, xs), params["w_rec"].astype(xs.dtype), kwargs

    def diagonal_cell(params, h, pre_x):
        """ParaLSTM from the hoisted input part: R h becomes r ⊙ h, one copy of h per gate block."""
        dt = pre_x.dtype
        pre_h = jnp.tile(h["h"].astype(dt), len(order)) * params["w_rec"].astype(dt)
        return pointwise(params, pre_x + pre_h, h)

    def unit_pairs(like):
        """(h_j, c_j) as block j: the 2x2 blocks of ParaLSTM's Jacobian."""
        return nonlinear.Blocks(to_blocks=lambda s: jnp.stack([s["h"], s["c"]], axis=-1),
                                from_blocks=lambda z: {"h": z[..., 0], "c": z[..., 1]})

    common = dict(init=init, initial_state=initial_state, input_width=lambda p: p["w_in"].shape[0],
                  default_d_in=d)
    if config.recurrence == "diagonal":
        return cell_recurrence("lstm", diagonal_cell, project=input_projection, structure=unit_pairs,
                               **common)
    reason = None if variant in ("vanilla", "np") else f"the {variant!r} variant"
    fused = fused_apply("lstm", config.implementation, cell="lstm", width=d, prepare=prepare, reason=reason)
    return cell_recurrence("lstm", cell, fused=fused, **common)
