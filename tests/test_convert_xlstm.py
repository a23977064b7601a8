"""zoo.convert_xlstm.from_xlstm against the xlstm package itself (backend="vanilla", its pure-torch
sLSTM): outputs and states (conv window and (h, c, n, m)) of the sLSTM layer and block.

Every torch parameter is perturbed at random (xlstm starts R at zero and the norms at one), so each
one is checked. xlstm runs in float64 and zoo in float32 from the same float32 weights: the outputs
and states agree to float32 rounding, compared at rtol 1e-5 and atol 1e-5 of each array's scale.
Under x64 zoo computes in float64 but rounds its state to float32 after each step (every zoo state
is float32), so the float64 comparison is at 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.convert import from_xlstm, state_from_xlstm, state_to_xlstm

torch = pytest.importorskip("torch")
xlstm = pytest.importorskip("xlstm")
pytestmark = [pytest.mark.refs, pytest.mark.usefixtures("quick_compile")]

B, T, T_SPLIT, D = 2, 9, 5, 16


def close(got, want, what, rtol=1e-5):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(want))), err_msg=what)


def perturb(module, seed):
    """Every parameter plus normal(0, 0.3) noise, rounded to float32 (zoo's weights are float32)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.eval()


def make_layer(num_heads=2, kernel=4, seed=0):
    config = xlstm.sLSTMLayerConfig(embedding_dim=D, num_heads=num_heads, conv1d_kernel_size=kernel,
                                    backend="vanilla")
    return perturb(xlstm.sLSTMLayer(config), seed)


def make_block(act="gelu", proj_factor=1.3, num_blocks=2, index=1, seed=0):
    """Block ``index`` of an all-sLSTM ``xLSTMBlockStack``, as the package assembles it."""
    config = xlstm.xLSTMBlockStackConfig(
        slstm_block=xlstm.sLSTMBlockConfig(
            slstm=xlstm.sLSTMLayerConfig(num_heads=2, conv1d_kernel_size=4, backend="vanilla"),
            feedforward=xlstm.FeedForwardConfig(proj_factor=proj_factor, act_fn=act)),
        embedding_dim=D, num_blocks=num_blocks, slstm_at="all")
    return perturb(xlstm.xLSTMBlockStack(config).blocks[index], seed)


def inputs(seed=1):
    return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def as_torch(x):
    return torch.from_numpy(np.asarray(x, np.float64))


@pytest.mark.parametrize("num_heads, kernel", [(2, 4), (4, 0)], ids=["heads2-conv4", "heads4-noconv"])
def test_layer_matches_xlstm_across_two_calls_with_states(num_heads, kernel):
    layer = make_layer(num_heads, kernel)
    rec, params = from_xlstm(layer)
    xs = inputs()
    torch_layer = layer.double()
    with torch.no_grad():
        want_a, state_a = torch_layer(as_torch(xs[:, :T_SPLIT]), return_last_state=True)
        want_b, state_b = torch_layer(as_torch(xs[:, T_SPLIT:]), return_last_state=True, **state_a)
    ys_a, zoo_a = rec.apply(params, jnp.asarray(xs[:, :T_SPLIT]))
    ys_b, zoo_b = rec.apply(params, jnp.asarray(xs[:, T_SPLIT:]), state=zoo_a)
    close(ys_a, want_a, "outputs, first call")
    close(ys_b, want_b, "outputs, second call")
    for got, want in ((zoo_a, state_a), (zoo_b, state_b)):
        conv, memory = state_to_xlstm(layer, got)
        for k, name in enumerate("hcnm"):
            close(memory[k], want["slstm_state"][k], f"slstm_state {name}")
        if kernel:
            close(conv, want["conv_state"], "conv_state")
        else:
            assert conv is None
    # xlstm's state converted in gives the same second call.
    ys_from, _ = rec.apply(params, jnp.asarray(xs[:, T_SPLIT:]),
                           state=state_from_xlstm(layer, state_a["conv_state"], state_a["slstm_state"]))
    close(ys_from, want_b, "outputs from xlstm's state")


@pytest.mark.parametrize("act, proj_factor, index", [("gelu", 1.3, 1), ("swish", 2.0, 0)])
def test_block_matches_xlstm(act, proj_factor, index):
    block = make_block(act, proj_factor, index=index)
    rec, params = from_xlstm(block)
    assert params["w_up"].shape == (D, 2 * block.ffn.config._proj_up_dim)
    xs = inputs(2)
    with torch.no_grad():
        want = block.double()(as_torch(xs))
    ys, _ = rec.apply(params, jnp.asarray(xs))
    close(ys, want, "block outputs")


def test_block_step_matches_xlstm_step_with_states():
    """xlstm's ``sLSTMBlock.step`` token by token from a random state against zoo's ``step``: the
    outputs and, after every token, the states (xlstm's step keeps the last K conv inputs)."""
    block = make_block(seed=3).double()
    rec, params = from_xlstm(block)
    xs = inputs(3)
    rng = np.random.default_rng(4)
    window = rng.standard_normal((B, 4, D))
    memory = np.stack([rng.uniform(-0.5, 0.5, (B, D)), rng.uniform(-0.5, 0.5, (B, D)),
                       rng.uniform(0.5, 1.5, (B, D)), rng.uniform(-1, 1, (B, D))])
    torch_state = {"conv_state": (as_torch(window),), "slstm_state": as_torch(memory)}
    state = state_from_xlstm(block, (torch.from_numpy(window),), memory)
    step = jax.jit(rec.step)
    for t in range(4):
        with torch.no_grad():
            want, torch_state = block.step(as_torch(xs[:, t:t + 1]), **torch_state)
        state, y_t = step(params, state, jnp.asarray(xs[:, t]))
        close(y_t, want[:, 0], f"step {t} output")
        conv, mem = state_to_xlstm(block, state)
        close(conv, torch_state["conv_state"][0][:, 1:], f"step {t} conv window")
        close(mem, torch_state["slstm_state"], f"step {t} (h, c, n, m)")


def test_float64_layer_matches_xlstm():
    layer = make_layer(seed=5)
    rec, params = from_xlstm(layer)
    xs = inputs(5)
    with torch.no_grad():
        want = layer.double()(as_torch(xs))
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        ys, _ = rec.apply(params64, jnp.asarray(xs, jnp.float64))
        assert ys.dtype == jnp.float64
    close(ys, want, "float64 outputs", rtol=1e-6)


def test_unsupported_modules_raise():
    with pytest.raises(TypeError, match="sLSTMLayer"):
        from_xlstm(torch.nn.LSTM(4, 4))
    mlstm_block = xlstm.mLSTMBlock(xlstm.mLSTMBlockConfig(
        mlstm=xlstm.mLSTMLayerConfig(embedding_dim=D, context_length=T), _num_blocks=1, _block_idx=0))
    with pytest.raises(TypeError, match="mLSTMLayer"):
        from_xlstm(mlstm_block)
    lstm_cell_layer = xlstm.sLSTMLayer(xlstm.sLSTMLayerConfig(embedding_dim=D, num_heads=2, backend="vanilla",
                                                              function="lstm"))
    with pytest.raises(ValueError, match="function='lstm'"):
        from_xlstm(lstm_cell_layer)
    with pytest.raises(ValueError, match="slstm_state must have shape"):
        state_from_xlstm(make_layer(), None, np.zeros((3, B, D)))
