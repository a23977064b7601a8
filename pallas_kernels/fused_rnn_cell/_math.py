"""The per-step arithmetic of the fused RNN cells, shared by the GPU (Triton) and TPU (Mosaic) kernels.

Every function works on loaded [bb, Dp] values, one array per gate (Triton cannot slice values, so
gates are never cut out of a wide [bb, G·Dp] array). The recurrent products go through three
callables handed in by the kernel, so that the weight may be a value held across the time loop or a
ref read at each step:

    rec(a, g)    = a @ W_g            [bb, Dp] x [Dp, Dp] -> float32
    rec_t(d, g)  = d @ W_gᵀ           the state cotangent through gate g's product
    outer(a, d)  = aᵀ d               [Dp, Dp] float32, a contribution to dW_g

Matmul operands take the weight's dtype (bf16 stays bf16) and accumulate in float32; everything
else is float32. The cells, in zoo's default forms (x_g = the hoisted x_t @ W_in + bias, gate g):

* lstm (Greff et al., "LSTM: A Search Space Odyssey", vanilla with peepholes p; p = 0 is torch's
  LSTM): gates (i, f, z, o), state (h, c)::

      i = σ(a_i + p_i c), f = σ(a_f + p_f c), z = tanh(a_z), c' = f c + i z,
      o = σ(a_o + p_o c'), h' = tanh(c') o,        a_g = x_g + h W_g

* gru (Cho et al. 2014, the reset gate before the product): gates (r, z, n), state (h,)::

      r = σ(x_r + h W_r), z = σ(x_z + h W_z), n = tanh(x_n + (r h) W_n), h' = (1 - z) n + z h

* gru_reset_after (the cuDNN / torch.nn.GRU form, zoo's GRU with reset_after=True): gates (r, z, n),
  state (h,), per-channel recurrent bias b (params)::

      r = σ(x_r + h W_r + b_r), z = σ(x_z + h W_z + b_z), n = tanh(x_n + r (h W_n + b_n)),
      h' = (1 - z) n + z h

* slstm (Beck et al., "xLSTM", §2.2, exponential gating with stabiliser m): gates (i, f, z, o),
  state (h, c, n, m), W block-diagonal over heads (expanded to dense by the caller)::

      a_g = x_g + h W_g,  lf = log σ(a_f) (or a_f for forget_gate="exp"),
      m' = a_i if n = 0 else max(lf + m, a_i),  i' = exp(a_i - m'),  f' = exp(lf + m - m'),
      c' = f' c + i' tanh(a_z),  n' = f' n + i',  h' = σ(a_o) c' / n'

Backward steps recompute the step from its entering state and return the gate pre-activation
cotangents da_g (= the x_pre cotangents), the entering state's cotangent, the pairs (l_g, e_g) with
dW_g += l_gᵀ e_g, and the cotangents of the per-channel parameters (peepholes, recurrent bias).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


class Spec(NamedTuple):
    gates: int        # G: gate blocks of the pre-activation and of W_rec
    states: int       # S: [B, D] float32 arrays in the state
    params: int       # P: per-channel float32 parameters ([P, 1, Dp]; a dummy row when none)


SPECS = {"lstm": Spec(4, 2, 3), "gru": Spec(3, 1, 1), "gru_reset_after": Spec(3, 1, 3),
         "slstm": Spec(4, 4, 1)}
FORGET_GATES = ("sigmoid", "exp")


def dot(a, b, contract_a: int = 1, contract_b: int = 0):
    """a·b contracting one axis of each 2-D operand, float32 accumulation."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=F32)


def sigmoid(a):
    return 1.0 / (1.0 + jnp.exp(-a))


def log_sigmoid(a):
    """log σ(a) = min(a, 0) - log(1 + exp(-|a|)), stable for both signs."""
    return jnp.minimum(a, 0.0) - jnp.log(1.0 + jnp.exp(-jnp.abs(a)))


# --------------------------------------------------------------------------------------------
# Forward steps: (x gates, entering state, params, rec) -> (new state, y).


def lstm_forward(x, state, params, rec, **_):
    h, c = state
    p_i, p_f, p_o = params
    a = [x[g] + rec(h, g) for g in range(4)]
    i = sigmoid(a[0] + p_i * c)
    f = sigmoid(a[1] + p_f * c)
    z = jnp.tanh(a[2])
    c_new = f * c + i * z
    o = sigmoid(a[3] + p_o * c_new)
    h_new = jnp.tanh(c_new) * o
    return (h_new, c_new), h_new


def gru_forward(x, state, params, rec, **_):
    (h,) = state
    r = sigmoid(x[0] + rec(h, 0))
    z = sigmoid(x[1] + rec(h, 1))
    n = jnp.tanh(x[2] + rec(r * h, 2))
    h_new = (1.0 - z) * n + z * h
    return (h_new,), h_new


def _slstm_gates(x, state, rec, forget_gate):
    h, c, n, m = state
    a = [x[g] + rec(h, g) for g in range(4)]
    lf = log_sigmoid(a[1]) if forget_gate == "sigmoid" else a[1]
    lead = lf + m
    # A fresh state (n = 0) has no history to scale: the stabiliser starts at the input gate.
    m_new = jnp.where(n == 0.0, a[0], jnp.maximum(lead, a[0]))
    i_act = jnp.exp(a[0] - m_new)
    f_act = jnp.exp(lead - m_new)
    tz = jnp.tanh(a[2])
    so = sigmoid(a[3])
    return a, lead, m_new, i_act, f_act, tz, so


def slstm_forward(x, state, params, rec, *, forget_gate="sigmoid"):
    _, c, n, _ = state
    _, _, m_new, i_act, f_act, tz, so = _slstm_gates(x, state, rec, forget_gate)
    c_new = f_act * c + i_act * tz
    n_new = f_act * n + i_act
    h_new = so * c_new / n_new
    return (h_new, c_new, n_new, m_new), h_new


def gru_reset_after_forward(x, state, params, rec, **_):
    (h,) = state
    r = sigmoid(x[0] + rec(h, 0) + params[0])
    z = sigmoid(x[1] + rec(h, 1) + params[1])
    n = jnp.tanh(x[2] + r * (rec(h, 2) + params[2]))
    h_new = (1.0 - z) * n + z * h
    return (h_new,), h_new


FORWARD = {"lstm": lstm_forward, "gru": gru_forward, "gru_reset_after": gru_reset_after_forward,
           "slstm": slstm_forward}


# --------------------------------------------------------------------------------------------
# Backward steps: (x gates, entering state, params, cotangent of the new state incl. dy, rec,
# rec_t) -> (dx gates, d entering state, (left, right) operands of dW_g, d params).


def lstm_backward(x, state, params, d_new, rec, rec_t, **_):
    h, c = state
    p_i, p_f, p_o = params
    dh_new, dc_new = d_new
    a = [x[g] + rec(h, g) for g in range(4)]
    i = sigmoid(a[0] + p_i * c)
    f = sigmoid(a[1] + p_f * c)
    z = jnp.tanh(a[2])
    c_new = f * c + i * z
    o = sigmoid(a[3] + p_o * c_new)
    tc = jnp.tanh(c_new)
    da_o = dh_new * tc * o * (1.0 - o)
    dc_new = dc_new + dh_new * o * (1.0 - tc * tc) + da_o * p_o
    da_i = dc_new * z * i * (1.0 - i)
    da_f = dc_new * c * f * (1.0 - f)
    da_z = dc_new * i * (1.0 - z * z)
    dc = dc_new * f + da_i * p_i + da_f * p_f
    da = [da_i, da_f, da_z, da_o]
    dh = rec_t(da[0], 0) + rec_t(da[1], 1) + rec_t(da[2], 2) + rec_t(da[3], 3)
    d_params = [_row_sum(da_i * c), _row_sum(da_f * c), _row_sum(da_o * c_new)]
    return da, (dh, dc), [(h, d) for d in da], d_params


def gru_backward(x, state, params, d_new, rec, rec_t, **_):
    (h,) = state
    (dh_new,) = d_new
    r = sigmoid(x[0] + rec(h, 0))
    z = sigmoid(x[1] + rec(h, 1))
    rh = r * h
    n = jnp.tanh(x[2] + rec(rh, 2))
    da_n = dh_new * (1.0 - z) * (1.0 - n * n)
    da_z = dh_new * (h - n) * z * (1.0 - z)
    d_rh = rec_t(da_n, 2)
    da_r = d_rh * h * r * (1.0 - r)
    dh = dh_new * z + d_rh * r + rec_t(da_r, 0) + rec_t(da_z, 1)
    da = [da_r, da_z, da_n]
    return da, (dh,), [(h, da_r), (h, da_z), (rh, da_n)], [jnp.zeros_like(params[0])]


def slstm_backward(x, state, params, d_new, rec, rec_t, *, forget_gate="sigmoid"):
    h, c, n, m = state
    dh_new, dc_new, dn_new, dm_new = d_new
    a, lead, m_new, i_act, f_act, tz, so = _slstm_gates(x, state, rec, forget_gate)
    c_new = f_act * c + i_act * tz
    n_new = f_act * n + i_act
    inv_n = 1.0 / n_new
    h_new = so * c_new * inv_n
    da_o = dh_new * c_new * inv_n * so * (1.0 - so)
    dc_new = dc_new + dh_new * so * inv_n
    dn_new = dn_new - dh_new * h_new * inv_n
    g_f = (dc_new * c + dn_new * n) * f_act          # d(lead - m') through f'
    g_i = (dc_new * tz + dn_new) * i_act             # d(a_i - m') through i'
    da_z = dc_new * i_act * (1.0 - tz * tz)
    dm_total = dm_new - g_i - g_f                    # cotangent of m'
    # m' = a_i on a fresh step, else max(lead, a_i) (ties split in half, as jnp.maximum's rule).
    fresh = n == 0.0
    to_lead = jnp.where(fresh, 0.0, jnp.where(lead > a[0], 1.0, jnp.where(lead == a[0], 0.5, 0.0)))
    d_lead = g_f + dm_total * to_lead
    da_i = g_i + dm_total * (1.0 - to_lead)
    da_f = d_lead * sigmoid(-a[1]) if forget_gate == "sigmoid" else d_lead
    da = [da_i, da_f, da_z, da_o]
    dh = rec_t(da[0], 0) + rec_t(da[1], 1) + rec_t(da[2], 2) + rec_t(da[3], 3)
    d_state = (dh, dc_new * f_act, dn_new * f_act, d_lead)
    return da, d_state, [(h, d) for d in da], [jnp.zeros_like(params[0])]


def gru_reset_after_backward(x, state, params, d_new, rec, rec_t, **_):
    (h,) = state
    (dh_new,) = d_new
    r = sigmoid(x[0] + rec(h, 0) + params[0])
    z = sigmoid(x[1] + rec(h, 1) + params[1])
    hn = rec(h, 2) + params[2]
    n = jnp.tanh(x[2] + r * hn)
    da_n = dh_new * (1.0 - z) * (1.0 - n * n)
    da_z = dh_new * (h - n) * z * (1.0 - z)
    da_r = da_n * hn * r * (1.0 - r)
    d_hn = da_n * r                                   # the recurrent part of the n gate
    dh = dh_new * z + rec_t(da_r, 0) + rec_t(da_z, 1) + rec_t(d_hn, 2)
    d_params = [_row_sum(da_r), _row_sum(da_z), _row_sum(d_hn)]
    return [da_r, da_z, da_n], (dh,), [(h, da_r), (h, da_z), (h, d_hn)], d_params


BACKWARD = {"lstm": lstm_backward, "gru": gru_backward, "gru_reset_after": gru_reset_after_backward,
            "slstm": slstm_backward}


def _row_sum(a):
    """Sum over the batch rows, kept [1, Dp]."""
    return jnp.sum(a, axis=0, keepdims=True)
