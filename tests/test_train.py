"""The training loop: masked losses, learning, exact resume after a kill, and the files it writes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zoo.data import RunningParity
from zoo.train import (
    CheckpointError,
    make_train_step,
    masked_accuracy,
    masked_cross_entropy,
    read_records,
    train,
)


class TinyRNN(nnx.Module):
    """Embedding, a tanh RNN whose state is zeroed where ``reset`` is set, and a linear head.

    The loop's own test model, so that these tests do not depend on any zoo model.
    """

    def __init__(self, vocab_size: int, width: int, n_classes: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
        self.w_rec = nnx.Param(jax.nn.initializers.orthogonal()(rngs.params(), (width, width)))
        self.head = nnx.Linear(width, n_classes, rngs=rngs)

    def __call__(self, inputs, reset=None):
        xs = jnp.swapaxes(self.embed(inputs), 0, 1)                       # [T, B, D]
        keep = jnp.ones(inputs.shape, bool) if reset is None else ~reset
        w_rec = self.w_rec[...]

        def step(h, x_and_keep):
            x_t, keep_t = x_and_keep
            h = jnp.tanh(x_t + (h * keep_t[:, None]) @ w_rec)
            return h, h

        h0 = jnp.zeros((inputs.shape[0], w_rec.shape[0]))
        _, hs = jax.lax.scan(step, h0, (xs, jnp.swapaxes(keep, 0, 1)))
        return self.head(jnp.swapaxes(hs, 0, 1))


def build(seed=0, width=16, lr=1e-2):
    model = TinyRNN(2, width, 2, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)


TASK = RunningParity(length=12, batch_size=8, min_segment=4, seed=5)


def log_softmax_np(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("shape", [(5, 7), (6,)])      # per-position [B, T] and pooled [B]
def test_masked_loss_and_accuracy_equal_a_numpy_computation(shape):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(*shape, 4)).astype(np.float32) * 3
    targets = rng.integers(0, 4, size=shape)
    mask = rng.random(shape) < 0.6
    mask.flat[0] = True
    nll = -np.take_along_axis(log_softmax_np(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
    want_loss = nll[mask].mean()
    want_acc = (logits.argmax(-1) == targets)[mask].mean()
    # float32 log-softmax over 4 classes: a few ulps of a value near 2.
    np.testing.assert_allclose(masked_cross_entropy(logits, targets, mask), want_loss, rtol=1e-6)
    np.testing.assert_allclose(masked_accuracy(logits, targets, mask), want_acc, rtol=1e-7)


def test_masked_positions_do_not_change_the_loss():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 2)).astype(np.float32)
    targets = rng.integers(0, 2, size=(3, 5))
    mask = np.ones((3, 5), bool)
    mask[:, 3:] = False
    scrambled = logits.copy()
    scrambled[:, 3:] = rng.normal(size=(3, 2, 2)) * 100
    assert masked_cross_entropy(logits, targets, mask) == masked_cross_entropy(scrambled, targets, mask)
    assert masked_cross_entropy(logits, targets, np.zeros_like(mask)) == 0.0


def test_train_steps_on_one_batch_reduce_its_loss():
    model, optimizer = build(lr=3e-2)
    train_step = make_train_step()
    batch = TASK.batch(0)
    losses = [float(train_step(model, optimizer, batch)["loss"]) for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_training_reduces_the_held_out_loss(tmp_path):
    model, optimizer = build(lr=1e-2)
    result = train(model, optimizer, TASK, steps=60, eval_every=30, progress=False)
    evals = [r for r in result.records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.01, evals
    assert result.final == {k: evals[-1][k] for k in ("eval_loss", "eval_accuracy")}
    assert len(result.losses) == 60


class Killed(Exception):
    pass


class KilledAt:
    """The task, except that asking for batch ``step`` raises, as a kill at that point would."""

    def __init__(self, task, step):
        self.task, self.step = task, step
        self.name, self.vocab_size, self.n_classes = task.name, task.vocab_size, task.n_classes

    def batch(self, step, split="train"):
        if split == "train" and step == self.step:
            raise Killed(step)
        return self.task.batch(step, split)


def params_of(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_resume_after_a_kill_gives_exactly_the_uninterrupted_params_and_losses(tmp_path):
    steps, every, kill_at = 17, 5, 13
    whole_model, whole_opt = build()
    whole = train(whole_model, whole_opt, TASK, steps=steps, eval_every=every, log_every=3,
                  metrics_path=tmp_path / "whole.jsonl", progress=False)

    ckpt, log = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    model, optimizer = build()
    with pytest.raises(Killed):
        train(model, optimizer, KilledAt(TASK, kill_at), steps=steps, eval_every=every, log_every=3,
              checkpoint_dir=ckpt, metrics_path=log, progress=False)
    assert max(r["step"] for r in read_records(log)) > 10     # the log ran past the last checkpoint

    fresh_model, fresh_opt = build(seed=1)                      # different init: all must come from disk
    resumed = train(fresh_model, fresh_opt, TASK, steps=steps, eval_every=every, log_every=3,
                    checkpoint_dir=ckpt, metrics_path=log, progress=False)
    assert resumed.start_step == 10                             # the last checkpoint before the kill
    assert resumed.losses == whole.losses[10:]
    assert read_records(log) == read_records(tmp_path / "whole.jsonl")
    for got, want in zip(params_of(fresh_model), params_of(whole_model), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(fresh_opt.step[...]) == int(whole_opt.step[...]) == steps


def test_sequence_model_resumes_exactly_on_packed_segments(tmp_path):
    from zoo.nn import SequenceModel

    # One model object for all three runs, set back to its initial state before each: building a
    # SequenceModel takes seconds here and each new instance is traced and compiled again. The
    # resumed run starts from the initial state, so only the checkpoint can bring it to step 4.
    model = SequenceModel("elman", vocab_size=2, d_model=8, n_layers=1, d_output=2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    initial_model, initial_opt = nnx.clone(model), nnx.clone(optimizer)

    def back_to_initial_state():
        nnx.update(model, nnx.state(initial_model))
        nnx.update(optimizer, nnx.state(initial_opt))

    kwargs = dict(steps=6, eval_every=2, eval_batches=1, progress=False)
    whole = train(model, optimizer, TASK, **kwargs)
    whole_params = [np.array(p) for p in params_of(model)]
    back_to_initial_state()
    with pytest.raises(Killed):
        train(model, optimizer, KilledAt(TASK, 5), checkpoint_dir=tmp_path, **kwargs)
    back_to_initial_state()
    assert int(optimizer.step[...]) == 0
    resumed = train(model, optimizer, TASK, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.start_step == 4 and resumed.losses == whole.losses[4:]
    for got, want in zip(params_of(model), whole_params, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_finished_run_resumes_to_nothing_new(tmp_path):
    model, optimizer = build()
    first = train(model, optimizer, TASK, steps=6, eval_every=3, checkpoint_dir=tmp_path / "c",
                  metrics_path=tmp_path / "m.jsonl", progress=False)
    again_model, again_opt = build(seed=2)
    result = train(again_model, again_opt, TASK, steps=6, eval_every=3, checkpoint_dir=tmp_path / "c",
                   metrics_path=tmp_path / "m.jsonl", progress=False)
    assert result.start_step == 6 and result.losses == [] and result.final == first.final
    assert read_records(tmp_path / "m.jsonl") == first.records
    for got, want in zip(params_of(again_model), params_of(model), strict=True):
        np.testing.assert_array_equal(got, want)


def evaluations(records, key="eval_loss"):
    return [(r["step"], r[key]) for r in records if key in r]


def test_keep_best_max_leaves_the_initial_model():
    # The held-out loss is highest before training, so "max" must leave the model as it was built.
    model, optimizer = build(lr=1e-2)
    initial = [np.array(p) for p in params_of(model)]
    result = train(model, optimizer, TASK, steps=30, eval_every=10, progress=False,
                   keep_best="eval_loss", keep_best_mode="max")
    steps, losses = zip(*evaluations(result.records), strict=True)
    assert steps == (0, 10, 20, 30) and int(np.argmax(losses)) == 0, losses
    assert result.best == {"step": 0, **{k: v for k, v in result.records[0].items() if k.startswith("eval_")}}
    assert result.final["eval_loss"] == losses[-1]          # ``final`` stays the last evaluation
    for got, want in zip(params_of(model), initial, strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(optimizer.step[...]) == 30                    # the optimizer is not rewound


def test_keep_best_min_leaves_the_model_of_the_lowest_evaluation(monkeypatch):
    # Scripted evaluations, so that where the minimum falls does not hang on a training trajectory
    # (which differs between machines): steps 0, 4, ..., 20; the lowest at 8, tied at 16 (first wins).
    from zoo.train import loop

    scripted = iter([5.0, 3.0, 1.0, 2.0, 1.0, 4.0])
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: {"eval_loss": next(scripted)})
    model, optimizer = build()
    result = train(model, optimizer, TASK, steps=20, eval_every=4, progress=False, keep_best="eval_loss")
    assert result.best == {"step": 8, "eval_loss": 1.0} and result.final == {"eval_loss": 4.0}
    # Independently: eight train steps by hand from the same start give these parameters.
    short_model, short_opt = build()
    train_step = make_train_step()
    for k in range(8):
        train_step(short_model, short_opt, TASK.batch(k))
    for got, want in zip(params_of(model), params_of(short_model), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(optimizer.step[...]) == 20


def test_keep_best_survives_a_kill_and_resume(tmp_path):
    # "max" of the held-out loss is the model at step 0: after the kill only the checkpoint holds it.
    kwargs = dict(steps=17, eval_every=3, log_every=3, progress=False, keep_best="eval_loss",
                  keep_best_mode="max")
    whole_model, whole_opt = build()
    whole = train(whole_model, whole_opt, TASK, **kwargs)
    model, optimizer = build()
    with pytest.raises(Killed):
        train(model, optimizer, KilledAt(TASK, 13), checkpoint_dir=tmp_path, **kwargs)
    fresh_model, fresh_opt = build(seed=1)                      # another init: the best must come from disk
    resumed = train(fresh_model, fresh_opt, TASK, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.start_step == 12 and whole.best["step"] == 0 and resumed.best == whole.best
    initial_model, _ = build()
    for got, want in zip(params_of(fresh_model), params_of(initial_model), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(fresh_opt.step[...]) == 17


def test_keep_best_errors_name_the_problem(tmp_path):
    model, optimizer = build()
    with pytest.raises(ValueError, match=r"keep_best='eval_bleu' is not one of .*eval_accuracy"):
        train(model, optimizer, TASK, steps=2, eval_every=1, progress=False, keep_best="eval_bleu")
    with pytest.raises(ValueError, match="keep_best_mode must be 'min' or 'max', got 'lowest'"):
        train(model, optimizer, TASK, steps=2, progress=False, keep_best="eval_loss", keep_best_mode="lowest")
    train(model, optimizer, TASK, steps=2, eval_every=1, progress=False, checkpoint_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"c/2/meta was written by a run without keep_best"):
        train(model, optimizer, TASK, steps=4, eval_every=1, progress=False, checkpoint_dir=tmp_path / "c",
              keep_best="eval_loss")


def test_improves_never_picks_a_nan():
    from zoo.train.loop import _improves

    assert _improves(1.0, None, "min") and _improves(1.0, float("nan"), "max")
    assert not _improves(float("nan"), 2.0, "min") and not _improves(float("nan"), None, "max")
    assert _improves(1.0, 2.0, "min") and not _improves(2.0, 1.0, "min") and not _improves(1.0, 1.0, "min")
    assert _improves(2.0, 1.0, "max") and not _improves(1.0, 1.0, "max")


def test_metrics_jsonl_and_png_are_written(tmp_path):
    model, optimizer = build()
    result = train(model, optimizer, TASK, steps=8, eval_every=4, metrics_path=tmp_path / "m.jsonl",
                   plot_path=tmp_path / "curves.png", progress=False)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(9))
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 4, 8]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in records[1:])
    assert records == result.records
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_trains_a_sequence_model_and_writes_its_files(tmp_path, capsys):
    from zoo.demo import main

    final = main(["--model", "elman", "--steps", "6", "--eval-every", "3", "--d-model", "8", "--layers", "1",
                  "--length", "8", "--batch-size", "4", "--out", str(tmp_path), "--no-progress"])
    assert set(final) == {"eval_loss", "eval_accuracy", "train_loss", "train_accuracy"}
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == list(range(7))
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "curves.png" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_defaults_solve_running_parity_on_held_out_data(tmp_path):
    from zoo.demo import main

    final = main(["--out", str(tmp_path), "--no-progress"])
    assert final["eval_accuracy"] > 0.99, final
