"""The Flax NNX shells: they compute the functional recurrence and train with nnx + optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoo

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")


def _random(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_recurrent_module_equals_functional_apply_and_step():
    rec = zoo.stack(zoo.get("elman", d_model=8), zoo.residual(zoo.get("elman", d_model=5)))
    layer = zoo.nn.Recurrent(rec, 6, rngs=nnx.Rngs(3))
    params = layer.param_values()
    assert jax.tree.structure(params) == jax.tree.structure(rec.init(jax.random.key(0), 6))
    xs, reset = _random(1, (2, 7, 6)), jax.random.bernoulli(jax.random.key(2), 0.3, (2, 7))
    state = jax.tree.map(lambda s: s + 0.3, rec.initial_state(params, 2))
    want_ys, want_state = rec.apply(params, xs, state=state, reset=reset)
    got_ys, got_state = layer(xs, state=state, reset=reset, return_state=True)
    np.testing.assert_allclose(got_ys, want_ys, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got_state, want_state)
    s, y = layer.step(layer.initial_state(2), xs[:, 0])
    np.testing.assert_allclose(y, layer(xs[:, :1])[:, 0], rtol=1e-6, atol=1e-6)


def test_recurrent_params_are_nnx_params_with_the_functional_names():
    layer = zoo.nn.Recurrent(zoo.get("elman", d_model=4), 3, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    assert set(state["params"].keys()) == {"w_in", "w_rec", "bias"}
    assert state["params"]["w_in"][...].shape == (3, 4)


def _train(model, inputs, targets, steps, lr=3e-3):
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, inputs, targets):
        def loss_fn(model):
            logits = model(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(train_step(model, optimizer, inputs, targets)) for _ in range(steps)]


@pytest.mark.parametrize("mixer", ["lstm"])
def test_sequence_model_training_steps_reduce_the_loss(mixer):
    model = zoo.nn.SequenceModel(mixer, vocab_size=11, d_model=16, n_layers=2, d_output=11, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 13), 0, 11)
    losses = _train(model, tokens[:, :-1], tokens[:, 1:], steps=15)
    assert losses[-1] < 0.7 * losses[0], losses


def test_pooled_classifier_on_float_features_learns_labels():
    model = zoo.nn.SequenceModel("elman", d_input=3, d_model=8, n_layers=1, d_output=2, pool="mean",
                                 rngs=nnx.Rngs(0))
    inputs = _random(4, (8, 6, 3))
    labels = (inputs.sum(axis=(1, 2)) > 0).astype(jnp.int32)
    assert model(inputs).shape == (8, 2)
    losses = _train(model, inputs, labels, steps=30, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses


def test_sequence_model_step_matches_call_token_by_token():
    model = zoo.nn.SequenceModel("elman", vocab_size=7, d_model=8, n_layers=2, d_output=5, rngs=nnx.Rngs(2))
    tokens = jax.random.randint(jax.random.key(5), (3, 6), 0, 7)
    want = model(tokens)
    state = model.initial_state(3)
    for t in range(6):
        state, logits = model.step(state, tokens[:, t])
        np.testing.assert_allclose(logits, want[:, t], rtol=1e-5, atol=1e-5)


def test_plain_block_is_the_cells_stacked_under_a_linear_readout():
    # The classic papers' network: embedding, two LSTMs, a linear head; no residual, no norm.
    model = zoo.nn.SequenceModel("lstm", vocab_size=5, d_model=8, n_layers=2, d_output=3, mlp_ratio=0,
                                 block="plain", rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 5)
    cell = zoo.get("lstm", d_model=8)
    first, second = model.blocks.param_values()
    hs = model.embed.embedding[...][tokens]
    for params in (first, second):
        hs = cell_loop(cell, params, hs)
    want = hs @ model.head.kernel[...] + model.head.bias[...]
    np.testing.assert_allclose(model(tokens), want, rtol=1e-5, atol=1e-5)
    state = model.initial_state(2)
    for t in range(7):
        state, logits = model.step(state, tokens[:, t])
        np.testing.assert_allclose(logits, want[:, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block='plain' has no MLP; set mlp_ratio=0"):
        zoo.nn.SequenceModel("lstm", vocab_size=5, d_output=2, block="plain", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block='stacked'; choose one of"):
        zoo.nn.SequenceModel("lstm", vocab_size=5, d_output=2, block="stacked", rngs=nnx.Rngs(0))


def cell_loop(cell, params, xs):
    """The recurrence as a Python loop over its own ``step``: outputs [B, T, D]."""
    state, outputs = cell.initial_state(params, xs.shape[0]), []
    for t in range(xs.shape[1]):
        state, y = cell.step(params, state, xs[:, t])
        outputs.append(y)
    return jnp.stack(outputs, axis=1)


def test_sequence_model_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        zoo.nn.SequenceModel("elman", d_output=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool"):
        zoo.nn.SequenceModel("elman", vocab_size=5, d_output=2, pool="max", rngs=nnx.Rngs(0))
    model = zoo.nn.SequenceModel("elman", vocab_size=5, d_model=8, d_output=2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="integer tokens"):
        model(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="rank 2"):
        model(jnp.ones((2, 3, 1), jnp.int32))
