"""Held-out batches at chosen lengths for tfds tasks (``TfdsTask.batch_at_length``, the training loop's
``eval_lengths``): passkey through its ``eval_sequence_length`` field, linear regression through
``eval_n_points``, and a clear refusal for a task without a length field."""

import numpy as np
import pytest

from zoo.data import TASKS
from zoo.data.passkey import PasskeyConfig
from zoo.data.passkey.builder import ANSWER, KEY_MARKER, QUESTION
from zoo.data.tfds_task import TfdsTask
from zoo.train.loop import batch_at_length, check_eval_lengths, evaluate, supports_lengths

PASSKEY = dict(sequence_length=40, n_digits=3, n_filler_tokens=5, train_size=8, eval_size=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_passkey_batches_at_other_lengths(data_dir):
    task = TASKS["passkey"](batch_size=3, data_dir=data_dir, **PASSKEY)
    assert supports_lengths(task) and check_eval_lengths(task, (64, 100)) == (64, 100)
    for length in (64, 100):
        batch = batch_at_length(task, 1, length)
        assert {key: value.shape for key, value in batch.items()} == {key: (3, length) for key in batch}
        for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["mask"], strict=True):
            # a whole passkey example of exactly ``length`` tokens: key marker, question, blanks
            assert (inputs == KEY_MARKER).sum() == 1 and inputs[-4] == QUESTION
            np.testing.assert_array_equal(inputs[-3:], ANSWER)
            np.testing.assert_array_equal(mask, np.arange(length) >= length - 3)
            key_at = int(np.flatnonzero(inputs == KEY_MARKER)[0])
            np.testing.assert_array_equal(targets[-3:], inputs[key_at + 1 : key_at + 4])
        np.testing.assert_array_equal(batch_at_length(task, 1, length)["inputs"], batch["inputs"])
        # It is the eval batch of the config with that eval length, built on its own ...
        direct = TfdsTask(task.builder_cls, PasskeyConfig(**{**PASSKEY, "eval_sequence_length": length}),
                          batch_size=3, data_dir=data_dir)
        np.testing.assert_array_equal(direct.batch(1, "eval")["inputs"], batch["inputs"])
        names = [path.name for path in (data_dir / "passkey").iterdir()]
        assert any(name.startswith("seed=0,train_size=1,") and f"eval_sequence_length={length}," in name
                   for name in names)
    # ... and the task's own batches are untouched.
    assert task.batch(0, "eval")["inputs"].shape == (3, 40) and task.batch(0)["inputs"].shape == (3, 40)
    with pytest.raises(ValueError, match="eval_sequence_length=5"):
        batch_at_length(task, 0, 5)                         # shorter than a key and its question
    with pytest.raises(ValueError, match="split='train'"):
        task.batch_at_length(0, 64, split="train")


def test_the_loop_evaluates_passkey_at_several_lengths(data_dir):
    task = TASKS["passkey"](batch_size=2, data_dir=data_dir, **PASSKEY)

    def eval_step(batch):     # what a model's metrics would be: here the batch's own shape
        return {"steps": float(batch["inputs"].shape[1]), "answers": float(batch["mask"].sum())}

    got = evaluate(eval_step, task, 2, lengths=(48, 80))
    assert got == {"eval_steps": 40.0, "eval_answers": 6.0, "eval_len48_steps": 48.0,
                   "eval_len48_answers": 6.0, "eval_len80_steps": 80.0, "eval_len80_answers": 6.0}


def test_linear_regression_lengths_set_the_number_of_points(data_dir):
    fields = dict(dim=2, n_points=6, train_size=4, eval_size=4, batch_size=2, data_dir=data_dir)
    for layout, length, points in (("interleaved", 20, 10), ("paired", 9, 9)):
        task = TASKS["linear_regression"](layout=layout, **fields)
        batch = batch_at_length(task, 0, length)
        assert batch["inputs"].shape == (2, length, 3) and batch["targets"].shape == (2, length, 1)
        assert batch["mask"].sum() == 2 * points
        assert task.at_eval_length(length).config.eval_n_points == points
    with pytest.raises(ValueError, match="multiple of 2, got 21"):
        batch_at_length(TASKS["linear_regression"](**fields), 0, 21)


def test_a_task_without_a_length_field_is_refused_before_training(data_dir):
    task = TASKS["copy"](batch_size=2, train_size=4, eval_size=4, data_dir=data_dir)
    assert not hasattr(task, "batch_at_length") and not supports_lengths(task)
    with pytest.raises(TypeError, match="'copy'.*batch_at_length"):
        check_eval_lengths(task, (32,))
    with pytest.raises(AttributeError, match="CopyConfig has no eval length field"):
        task.batch_at_length(0, 32)


def test_chomsky_lengths_are_input_lengths(data_dir):
    """A Chomsky task at a chosen length: every eval example has exactly that many input symbols (the
    paper's per-length x-axis), then its answer, and the answer is the task's own function of them."""
    from zoo.data.chomsky import TASKS as SPECS
    from zoo.data.chomsky.regular import ARITHMETIC_SYMBOLS

    fields = dict(train_size=4, eval_size=6, batch_size=3, data_dir=data_dir)
    parity = TASKS["parity_check"](**fields)
    assert supports_lengths(parity) and check_eval_lengths(parity, (45, 60)) == (45, 60)
    for length in (45, 60):
        batch = batch_at_length(parity, 1, length)
        assert batch["inputs"].shape == (3, length + 1)                 # the bits, then one blank
        bits = batch["inputs"][:, :length]
        assert set(np.unique(bits)) <= {0, 1}
        assert np.all(batch["inputs"][:, length] == SPECS["parity_check"].blank)
        np.testing.assert_array_equal(batch["targets"][:, length], bits.sum(axis=1) % 2)
        assert np.all(batch["mask"] == (np.arange(length + 1) == length))    # the answer position only
    arithmetic = TASKS["modular_arithmetic"](**fields)
    batch = batch_at_length(arithmetic, 0, 60)                          # even: rounded down to 59
    assert batch["inputs"].shape == (3, 60)
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        expression = "".join(ARITHMETIC_SYMBOLS[token] for token in inputs[:59])   # e.g. "3+1*4-2..."
        assert targets[59] == eval(expression) % 5       # Python's own precedence, not the generator's
    reverse = TASKS["reverse_string"](**fields)
    batch = batch_at_length(reverse, 0, 50)
    np.testing.assert_array_equal(batch["targets"][:, 50:], batch["inputs"][:, 49::-1])
    with pytest.raises(ValueError, match="positive int, got 0"):
        parity.batch_at_length(0, 0)
