"""fused_rnn_cell: LSTM, GRU and sLSTM time steps with the recurrent matrix resident on chip, as Pallas
kernels for GPU (Triton) and TPU (Mosaic) with a Pallas backward.

The FlashRNN idea (K. Pöppel, M. Beck, S. Hochreiter, "FlashRNN: I/O-Aware Optimization of
Traditional RNNs on modern hardware", 2024): the input projection x_t @ W_in + b is hoisted out of the
recurrence (one large matmul in XLA, done by the caller), and one kernel launch runs a block of time
steps, reading the pre-activations and writing h, with W_rec loaded into on-chip memory once. Public
function::

    hs, final_state = fused_rnn_cell(cell, x_pre, w_rec, initial_state, *, reset=None, peepholes=None,
                                     b_rec=None, forget_gate="sigmoid", batch_block=None, time_block=16,
                                     platform=None, interpret=False)

Cells (zoo's default forms; the formulas are in ``_math.py``):

* ``"lstm"`` (zoo.models.lstm, vanilla): x_pre [B, T, 4D] (gate blocks i, f, z, o, bias included),
  w_rec [D, 4D], initial_state {"h": [B, D], "c": [B, D]}, peepholes [3, D] (rows p_i, p_f, p_o;
  None: zeros, the "np" variant = torch's LSTM).
* ``"gru"`` (zoo.models.gru, reset_after=False, Cho et al.: r multiplies h before the product):
  x_pre [B, T, 3D] (blocks r, z, n, bias included), w_rec [D, 3D], initial_state h [B, D].
* ``"gru_reset_after"`` (zoo.models.gru, reset_after=True; cuDNN / torch.nn.GRU): as "gru", x_pre =
  x @ w_in + bias_in, and b_rec [3D] (bias_rec, torch's bias_hh; None: zeros) added to h @ w_rec
  inside the step: n = tanh(x_n + r ⊙ (h W_n + b_n)).
* ``"slstm"`` (zoo.models.slstm's cell): x_pre [B, T, 4, D] (rows i, f, z, o; W x̂ + b), w_rec the
  block-diagonal R [H, Dh, 4, Dh], initial_state (h, c, n, m) each [B, D]; ``forget_gate`` "sigmoid"
  or "exp". R is expanded to a dense [4, D, D] in XLA (differentiable; its gradient is the blocks of
  the dense one).

x_pre float32 or bfloat16; w_rec float32 or bfloat16 (the recurrent matmuls take w_rec's dtype with
float32 accumulation; pass w_rec in x_pre's dtype to match zoo's LSTM/GRU, float32 for sLSTM).
reset bool [B, T]: True replaces the state before step t by zeros. hs [B, T, D] in x_pre's dtype; the
final state is the same pytree as initial_state, float32. Gradients (``jax.custom_vjp``, Pallas
backward kernels) w.r.t. x_pre, w_rec, initial_state, peepholes and b_rec. Not supported (fall back to
XLA): reverse, a non-zero reset_state, LSTM variants other than vanilla/np (so also "fgr"); on GPU,
D beyond what ``fits_on_chip`` allows keeps W in L2 (see README).

``platform=None`` picks by ``lax.platform_dependent``: Triton on cuda, Mosaic on tpu, the Triton kernel
body in interpret mode on cpu. ``platform="gpu"``/``"tpu"`` forces one (``interpret=True`` on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import DTYPES, pow2_at_least
from pallas_kernels.fused_rnn_cell import gpu, tpu
from pallas_kernels.fused_rnn_cell._math import FORGET_GATES, SPECS
from pallas_kernels.fused_rnn_cell.reference import fused_rnn_cell_reference

__all__ = ["fused_rnn_cell", "fused_rnn_cell_reference", "fits_on_chip", "CELLS"]

CELLS = tuple(SPECS)
PLATFORMS = (None, "gpu", "tpu")
F32 = jnp.float32
# TPU: W (double-buffered by the pipeline) and, in the backward pass, dW float32 scratch, within the
# default 16 MiB scoped VMEM of a v5e with room for the x / h blocks.
TPU_RESIDENT_BYTES = 12 * 1024 * 1024


def padded_width(d: int) -> int:
    """Dp: the kernel's channel width (a power of two >= 16; a multiple of 128 from 128 on)."""
    return pow2_at_least(d)


def fits_on_chip(cell: str, d: int, dtype, platform: str) -> bool:
    """Whether W_rec (and dW) stay on chip for the whole kernel: the dispatch condition.

    GPU: G·Dp²·(bytes(W) + 4) <= 128 KiB per program (registers/shared memory of one SM): LSTM up to
    D = 64 (sLSTM counts its dense expansion). Above it the kernel still runs, reading W from L2 each
    step, which is no faster than XLA. TPU: 2·G·Dp²·bytes(W) + G·Dp²·4 <= 12 MiB of VMEM (LSTM up
    to D = 512)."""
    dp, gates, size = padded_width(d), SPECS[cell].gates, jnp.dtype(dtype).itemsize
    if platform == "gpu":
        return gpu.resident(cell, dp, size)
    return gates * dp * dp * (2 * size + 4) <= TPU_RESIDENT_BYTES


def _kernels(platform, interpret):
    """(forward, backward) for one platform, or platform_dependent dispatchers."""
    if platform == "gpu":
        return (functools.partial(gpu.forward, interpret=interpret),
                functools.partial(gpu.backward, interpret=interpret))
    if platform == "tpu":
        return (functools.partial(tpu.forward, interpret=interpret),
                functools.partial(tpu.backward, interpret=interpret))

    def dispatch(name):
        def run(*args, time_block, **kw):
            per_platform = {
                "cpu": functools.partial(getattr(gpu, name), interpret=True, **kw),
                "cuda": functools.partial(getattr(gpu, name), **kw),
                "tpu": functools.partial(getattr(tpu, name), time_block=time_block, **kw),
            }
            return lax.platform_dependent(*args, **per_platform)
        return run

    return dispatch("forward"), dispatch("backward")


def _options(platform, interpret, options):
    """The static keyword arguments of the kernels (the GPU kernel has no time blocks)."""
    cell, time, forget_gate, batch_block, time_block = options
    kw = dict(cell=cell, time=time, forget_gate=forget_gate, batch_block=batch_block)
    if platform != "gpu":
        kw["time_block"] = time_block
    return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _core(x, w, params, state0, keep, options, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    hs, final, _ = forward(x, w, params, state0, keep, save=False, **_options(platform, interpret, options))
    return hs, final


def _core_fwd(x, w, params, state0, keep, options, platform, interpret):
    forward, _ = _kernels(platform, interpret)
    hs, final, states = forward(x, w, params, state0, keep, save=True,
                                **_options(platform, interpret, options))
    return (hs, final), (x, w, params, states, keep)


def _core_bwd(options, platform, interpret, residuals, cotangents):
    x, w, params, states, keep = residuals
    dhs, dfinal = cotangents
    _, backward = _kernels(platform, interpret)
    dx, dw, dparams, ds0 = backward(x, w, params, states, keep, dhs.astype(F32), dfinal.astype(F32),
                                    **_options(platform, interpret, options))
    return dx, dw.astype(w.dtype), dparams, ds0, jnp.zeros_like(keep)


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------------------------
# Input checks and layouts (XLA).


def _state_names(cell):
    return {"lstm": ("h", "c"), "gru": ("h",), "gru_reset_after": ("h",), "slstm": ("h", "c", "n", "m")}[cell]


def _check(cell, x_pre, w_rec, initial_state, reset, peepholes, b_rec, forget_gate, platform, time_block,
           batch_block):
    who = "fused_rnn_cell"
    if cell not in CELLS:
        raise ValueError(f"{who}: cell={cell!r}; choose one of {CELLS}")
    if platform not in PLATFORMS:
        raise ValueError(f"{who}: platform must be one of {PLATFORMS}, got {platform!r}")
    if forget_gate not in FORGET_GATES:
        raise ValueError(f"{who}: forget_gate={forget_gate!r}; choose one of {FORGET_GATES}")
    gates = SPECS[cell].gates
    shape = tuple(x_pre.shape)
    if cell == "slstm":
        if len(shape) != 4 or shape[2] != 4:
            raise ValueError(f"{who}: slstm x_pre must be [B, T, 4, D], got {shape}")
        d = shape[3]
        if w_rec.ndim != 4 or w_rec.shape[2] != 4 or w_rec.shape[1] != w_rec.shape[3] \
                or w_rec.shape[0] * w_rec.shape[1] != d:
            raise ValueError(f"{who}: slstm w_rec must be [H, Dh, 4, Dh] with H·Dh = D = {d}, "
                             f"got {tuple(w_rec.shape)}")
    else:
        if len(shape) != 3 or shape[2] % gates:
            raise ValueError(f"{who}: {cell} x_pre must be [B, T, {gates}·D], got {shape}")
        d = shape[2] // gates
        if tuple(w_rec.shape) != (d, gates * d):
            raise ValueError(f"{who}: {cell} w_rec must be [D, {gates}·D] = {(d, gates * d)} "
                             f"(x_pre {shape}), got {tuple(w_rec.shape)}")
    for name, a in (("x_pre", x_pre), ("w_rec", w_rec)):
        if a.dtype not in DTYPES:
            raise TypeError(f"{who}: {name} must be float32 or bfloat16, got {a.dtype}")
    batch, time = shape[:2]
    names = _state_names(cell)
    if cell == "lstm" and not (isinstance(initial_state, dict) and set(initial_state) == set(names)):
        raise ValueError(f"{who}: lstm initial_state must be {{'h', 'c'}} of [B, D] arrays, "
                         f"got {jax.tree.map(jnp.shape, initial_state)}")
    if cell == "slstm" and not isinstance(initial_state, (tuple, list)):
        raise ValueError(f"{who}: slstm initial_state must be a tuple {names} of [B, D] arrays, "
                         f"got {jax.tree.map(jnp.shape, initial_state)}")
    leaves = (initial_state,) if cell.startswith("gru") else (
        tuple(initial_state[k] for k in names) if cell == "lstm" else tuple(initial_state))
    if len(leaves) != len(names) or any(getattr(s, "shape", None) != (batch, d) for s in leaves):
        raise ValueError(f"{who}: {cell} initial_state must be {names} of [B, D] = {(batch, d)} arrays, "
                         f"got {jax.tree.map(jnp.shape, initial_state)}")
    if reset is not None and (tuple(reset.shape) != (batch, time) or reset.dtype != jnp.bool_):
        raise ValueError(f"{who}: reset must be bool [B, T] = {(batch, time)}, "
                         f"got {reset.dtype} {tuple(reset.shape)}")
    if peepholes is not None and (cell != "lstm" or tuple(peepholes.shape) != (3, d)):
        raise ValueError(f"{who}: peepholes must be [3, D] = {(3, d)} (lstm only), "
                         f"got {tuple(peepholes.shape)} for cell {cell!r}")
    if b_rec is not None and (cell != "gru_reset_after" or tuple(b_rec.shape) != (3 * d,)):
        raise ValueError(f"{who}: b_rec must be [3·D] = {(3 * d,)} (gru_reset_after only), "
                         f"got {tuple(b_rec.shape)} for cell {cell!r}")
    if not isinstance(time_block, int) or time_block < 1:
        raise ValueError(f"{who}: time_block must be a positive int, got {time_block!r}")
    if batch_block is not None and (batch_block < 16 or batch_block & (batch_block - 1)):
        raise ValueError(f"{who}: batch_block must be a power of two >= 16, got {batch_block!r}")
    return d, leaves


def dense_block_diagonal(r):
    """R [H, Dh, 4, Dh] (head k maps its channels to its channels) -> dense [4, D, D]."""
    heads, dh = r.shape[0], r.shape[1]
    dense = jnp.einsum("kagc,kl->gkalc", r, jnp.eye(heads, dtype=r.dtype))
    return dense.reshape(4, heads * dh, heads * dh)


def fused_rnn_cell(cell: str, x_pre, w_rec, initial_state, *, reset=None, peepholes=None, b_rec=None,
                   forget_gate: str = "sigmoid", batch_block: int | None = None, time_block: int = 16,
                   platform=None, interpret: bool = False):
    """See the module docstring. Returns (hs [B, T, D] in x_pre's dtype, final state pytree float32)."""
    d, leaves = _check(cell, x_pre, w_rec, initial_state, reset, peepholes, b_rec, forget_gate, platform,
                       time_block, batch_block)
    spec = SPECS[cell]
    batch, time = x_pre.shape[:2]
    dp = padded_width(d)
    bb = batch_block or min(64, pow2_at_least(batch))
    bp = -(-batch // bb) * bb
    tc = min(time_block, max(time, 1))
    tp = -(-time // tc) * tc
    # Time-major, gate-split, zero-padded: padded channels and rows stay zero in every cell (pre = 0
    # keeps c = h = 0; the sLSTM's n becomes 1, harmlessly), padded steps are masked in the kernels.
    x = x_pre.reshape(batch, time, spec.gates, d)
    x = jnp.pad(jnp.transpose(x, (1, 2, 0, 3)), ((0, tp - time), (0, 0), (0, bp - batch), (0, dp - d)))
    w = dense_block_diagonal(w_rec) if cell == "slstm" else jnp.transpose(
        w_rec.reshape(d, spec.gates, d), (1, 0, 2))
    w = jnp.pad(w, ((0, 0), (0, dp - d), (0, dp - d)))
    per_channel = peepholes if b_rec is None else b_rec.reshape(3, d)
    if per_channel is None:
        params = jnp.zeros((spec.params, 1, dp), F32)
    else:
        params = jnp.pad(per_channel.astype(F32), ((0, 0), (0, dp - d)))[:, None, :]
    state0 = jnp.pad(jnp.stack([s.astype(F32) for s in leaves]), ((0, 0), (0, bp - batch), (0, dp - d)))
    keep = jnp.ones((batch, time), F32) if reset is None else 1.0 - reset.astype(F32)
    keep = jnp.pad(keep.T, ((0, tp - time), (0, bp - batch)), constant_values=1.0)[..., None]
    options = (cell, int(time), forget_gate, int(bb), int(tc))
    hs, final = _core(x, w, params, state0, keep, options, platform, bool(interpret))
    hs = jnp.transpose(hs[:time, :batch, :d], (1, 0, 2))
    final = tuple(final[k, :batch, :d] for k in range(spec.states))
    if cell == "lstm":
        return hs, dict(zip(_state_names(cell), final, strict=True))
    return hs, (final[0] if cell.startswith("gru") else final)
