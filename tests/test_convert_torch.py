"""zoo.convert.from_torch against PyTorch itself: outputs and final states of torch.nn.RNN / LSTM / GRU.

Both sides run in float32 on the same random weights, inputs and initial states; the sums are
ordered differently (torch's fused kernels vs XLA), so they agree to a few ulps per step: compared
at rtol = atol = 1e-5.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.convert import from_torch, state_from_torch, state_to_torch

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.refs, pytest.mark.usefixtures("quick_compile")]

B, T, D_IN, H = 3, 7, 5, 6

# (module, num_layers, bidirectional, batch_first, bias): every module type with 1 and 2 layers,
# each of bidirectional / batch_first / bias both on and off somewhere.
CASES = [
    ("rnn_tanh", 1, False, True, True),
    ("rnn_tanh", 2, True, False, False),
    ("rnn_relu", 2, False, True, True),
    ("rnn_relu", 1, True, False, True),
    ("lstm", 1, False, False, True),
    ("lstm", 2, True, True, False),
    ("lstm", 2, False, False, True),
    ("lstm", 1, True, True, True),
    ("gru", 1, False, True, False),
    ("gru", 2, True, False, True),
    ("gru", 2, False, True, True),
    ("gru", 1, True, False, False),
]


def make_module(kind, num_layers, bidir, batch_first, bias, seed=0):
    torch.manual_seed(seed)
    common = dict(input_size=D_IN, hidden_size=H, num_layers=num_layers, bidirectional=bidir,
                  batch_first=batch_first, bias=bias)
    if kind.startswith("rnn"):
        return torch.nn.RNN(nonlinearity=kind.removeprefix("rnn_"), **common)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](**common)


def case_id(case):
    kind, layers, bidir, batch_first, bias = case
    flags = ("bi" if bidir else "uni", "bf" if batch_first else "tf", "bias" if bias else "nobias")
    return "-".join((kind, f"L{layers}", *flags))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_outputs_and_final_states_match_torch(case):
    kind, num_layers, bidir, batch_first, bias = case
    module = make_module(*case).eval()
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(B, T, D_IN)).astype(np.float32)                 # zoo layout [B, T, D]
    n_states = num_layers * (2 if bidir else 1)
    h_0 = rng.normal(size=(n_states, B, H)).astype(np.float32)
    c_0 = rng.normal(size=(n_states, B, H)).astype(np.float32) if kind == "lstm" else None

    x_torch = torch.from_numpy(xs if batch_first else xs.swapaxes(0, 1).copy())
    state_torch = torch.from_numpy(h_0) if c_0 is None else (torch.from_numpy(h_0), torch.from_numpy(c_0))
    with torch.no_grad():
        out, final_torch = module(x_torch, state_torch)
    out = out.numpy() if batch_first else out.numpy().swapaxes(0, 1)

    rec, params = from_torch(module)
    ys, state = rec.apply(params, jnp.asarray(xs), state=state_from_torch(module, h_0, c_0))
    assert ys.shape == (B, T, H * (2 if bidir else 1))
    np.testing.assert_allclose(ys, out, rtol=1e-5, atol=1e-5)
    got = state_to_torch(module, state)
    if kind == "lstm":
        np.testing.assert_allclose(got[0], final_torch[0].numpy(), rtol=1e-5, atol=1e-5)   # h_n
        np.testing.assert_allclose(got[1], final_torch[1].numpy(), rtol=1e-5, atol=1e-5)   # c_n
    else:
        np.testing.assert_allclose(got, final_torch.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_default_zero_state_matches_torch_default_and_step_matches_apply(kind):
    module = make_module(kind, 1, False, True, True, seed=2).eval()
    xs = np.random.default_rng(2).normal(size=(B, T, D_IN)).astype(np.float32)
    with torch.no_grad():
        out, _ = module(torch.from_numpy(xs))
    rec, params = from_torch(module)
    ys, _ = rec.apply(params, jnp.asarray(xs))
    np.testing.assert_allclose(ys, out.numpy(), rtol=1e-5, atol=1e-5)
    state = rec.initial_state(params, B)
    for t in range(T):
        state, y = rec.step(params, state, jnp.asarray(xs[:, t]))
        np.testing.assert_allclose(y, out.numpy()[:, t], rtol=1e-5, atol=1e-5)


def test_bias_false_converts_to_zero_biases():
    module = make_module("gru", 1, False, True, False)
    _, params = from_torch(module)
    assert not np.any(params["bias_in"]) and not np.any(params["bias_rec"])
    assert np.any(params["w_in"])


def test_unsupported_modules_raise():
    with pytest.raises(TypeError, match="torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU"):
        from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="proj_size"):
        from_torch(torch.nn.LSTM(D_IN, H, proj_size=2))
    module = make_module("gru", 2, False, True, True)
    with pytest.raises(ValueError, match="h_0"):
        state_from_torch(module, np.zeros((1, B, H), np.float32))
    with pytest.raises(ValueError, match="c_0"):
        state_from_torch(module, np.zeros((2, B, H), np.float32), np.zeros((2, B, H), np.float32))
