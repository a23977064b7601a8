"""``python -m experiments.train``: names, exact resume after a real SIGKILL, checkpoint errors, lengths."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax
import pytest
from flax import nnx

import zoo
from experiments.train import default_config, run
from zoo.data import TASKS, RunningParity
from zoo.nn import SequenceModel
from zoo.train import make_eval_step, read_records, train
from zoo.train.checkpoint import CheckpointError
from zoo.train.loop import batch_at_length, check_eval_lengths, evaluate

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out, **overrides):
    """A run of a width-4 Elman network on running parity of 6 bits: seconds, not minutes."""
    cfg = default_config("elman", "running_parity")
    cfg.d_model, cfg.batch_size, cfg.task_config.length = 4, 4, 6
    cfg.steps, cfg.eval_every, cfg.eval_batches, cfg.progress = 4, 2, 1, False
    cfg.output_dir = str(out)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_every_model_and_task_is_addressable_and_unknown_names_list_the_choices():
    for name, info in zoo.list_models().items():
        cfg = default_config(name, "running_parity")
        assert cfg.model == name
        assert set(cfg.model_config) == set(info.defaults()) - {"d_model"}
    cfg = default_config("lstm", "running_parity")
    assert cfg.model_config.forget_bias == zoo.list_models()["lstm"].defaults()["forget_bias"]
    assert dict(cfg.task_config) == {"length": 32, "min_segment": None}    # batch_size, seed: top level
    # tfds tasks take their dataset config's fields flat, read off the task they build.
    copy_fields = set(default_config("lstm", "copy").task_config)
    assert {"n_symbols", "max_copy_length", "length", "pack"} <= copy_fields
    assert {"n_pairs", "n_keys", "train_size"} <= set(default_config("lstm", "mqar").task_config)
    with pytest.raises(ValueError, match="unknown model 'nope'") as error:
        default_config("nope", "running_parity")
    assert all(name in str(error.value) for name in zoo.list_models())
    with pytest.raises(ValueError, match="unknown task 'nope'") as error:
        default_config("lstm", "nope")
    assert all(name in str(error.value) for name in TASKS)


def test_unknown_names_and_fields_stop_the_command_with_the_choices():
    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr

    code, err = cli("--model", "nope")
    assert code != 0 and "unknown model 'nope'; choose one of:" in err and "lstm" in err and "mamba" in err
    code, err = cli("--task", "nope", "--model", "gru")
    assert code != 0 and "unknown task 'nope'; choose one of:" in err and "running_parity" in err
    code, err = cli("--model", "gru", "--config.model_config.forget_bias=1.0")     # an lstm field
    assert code != 0 and "no config field 'forget_bias' for --model gru" in err and "reset_after" in err


def cli_command(out, steps):
    return [sys.executable, "-m", "experiments.train", "--model", "elman", "--task", "running_parity",
            "--config.d_model=8", "--config.batch_size=4", "--config.task_config.length=8",
            f"--config.steps={steps}", "--config.eval_every=40", "--config.checkpoint_every=40",
            "--config.eval_batches=1", "--config.eval_lengths=(12,)", "--config.progress=False",
            f"--config.output_dir={out}"]


def committed_steps(checkpoint_dir):
    """Steps whose checkpoint orbax has committed (a temporary directory is renamed on commit)."""
    return sorted(int(p.name) for p in Path(checkpoint_dir).glob("*") if p.name.isdigit())


def test_sigkill_then_the_same_command_resumes_with_the_uninterrupted_losses(tmp_path):
    steps = 200
    # The uninterrupted run goes on in a process of its own beside the one that is killed (they share
    # nothing but the CPUs; starting Python and compiling is most of what each spends).
    with open(tmp_path / "whole.out", "w") as whole_out, open(tmp_path / "whole.err", "w") as whole_err:
        whole = subprocess.Popen(cli_command(tmp_path / "whole", steps), cwd=ROOT, stdout=whole_out,
                                 stderr=whole_err, text=True)
    try:
        out = tmp_path / "killed"
        command = cli_command(out, steps)
        victim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        try:
            # Kill once a checkpoint is committed and the log has run past it, so the rerun must resume
            # from that checkpoint and drop the records logged after it.
            while time.monotonic() < deadline and victim.poll() is None:
                saved = committed_steps(out / "checkpoints")
                logged = [r["step"] for r in read_records(out / "metrics.jsonl")]
                if saved and logged and max(logged) > saved[-1]:
                    break
                time.sleep(0.01)
            assert victim.poll() is None, "the run finished before it could be killed: give it more steps"
            os.kill(victim.pid, signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
        finally:
            if victim.poll() is None:
                victim.kill()
        killed_at = max(r["step"] for r in read_records(out / "metrics.jsonl"))
        assert 0 < saved[-1] < killed_at < steps

        again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        assert whole.wait(timeout=120) == 0, (tmp_path / "whole.err").read_text()[-2000:]
    finally:
        if whole.poll() is None:
            whole.kill()
    whole_stdout = (tmp_path / "whole.out").read_text()
    assert "final metrics: eval_accuracy" in whole_stdout and "eval_len12_accuracy" in whole_stdout
    summary = json.loads((out / "final.json").read_text())
    assert saved[-1] <= summary["start_step"] <= killed_at and summary["start_step"] % 40 == 0
    assert f"resumed from the checkpoint at step {summary['start_step']}" in again.stdout

    want = read_records(tmp_path / "whole" / "metrics.jsonl")
    got = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in want] == list(range(steps + 1))
    assert [r.get("loss") for r in got] == [r.get("loss") for r in want]       # bit for bit
    assert got == want                                                          # every metric, evals too
    assert "eval_len12_accuracy" in got[-1]
    assert json.loads((tmp_path / "whole" / "final.json").read_text())["final"] == summary["final"]


def test_a_corrupt_checkpoint_names_its_file_and_never_restarts(tmp_path):
    cfg = tiny_config(tmp_path)
    run(cfg)
    log = (tmp_path / "metrics.jsonl").read_text()
    latest = tmp_path / "checkpoints" / "4"
    metadata = latest / "model" / "_METADATA"
    original = metadata.read_text()
    metadata.write_text(original[:40])                        # truncated mid-write
    with pytest.raises(CheckpointError, match=f"checkpoint item {latest / 'model'}: JSONDecodeError"):
        run(cfg)
    assert (tmp_path / "metrics.jsonl").read_text() == log   # nothing was rewritten

    # The same run's checkpoints, intact but for garbage in the optimizer's array data files.
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "b" / "checkpoints")
    latest = tmp_path / "b" / "checkpoints" / "4"
    (latest / "model" / "_METADATA").write_text(original)
    data_files = [p for p in (latest / "optimizer").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(latest / "optimizer")) as error:
        run(tiny_config(tmp_path / "b"))
    assert "Delete" in str(error.value)


def test_a_checkpoint_of_another_configuration_names_what_differs(tmp_path):
    run(tiny_config(tmp_path))
    ckpt = str(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=r"d_model: checkpoint 4, this run 6") as error:
        run(tiny_config(tmp_path / "other", d_model=6, checkpoint_dir=ckpt))
    assert f"{ckpt}/4 was written by a different run configuration" in str(error.value)
    # Logging fields may change on resume; a step a kill left half-saved (orbax's temporary name) is
    # not a checkpoint and is skipped.
    half_saved = Path(ckpt) / "6.orbax-checkpoint-tmp-1765000000000000"
    (half_saved / "model").mkdir(parents=True)
    (half_saved / "model" / "_METADATA").write_text("{")
    summary = run(tiny_config(tmp_path / "more", eval_every=4, checkpoint_dir=ckpt))
    assert summary["start_step"] == 4

    # Without a run description the arrays themselves are compared, and named with both shapes.
    model = SequenceModel("elman", vocab_size=2, d_model=6, n_layers=1, d_output=2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    with pytest.raises(CheckpointError, match=r"model/blocks/params/0/mixer/w_in: checkpoint has shape "
                                              r"\(4, 4\), this run has \(6, 6\)") as error:
        train(model, optimizer, RunningParity(length=6, batch_size=4), steps=4, checkpoint_dir=ckpt,
              progress=False)
    assert f"the checkpoint {ckpt}/4 does not fit" in str(error.value)
    assert "array(s) the checkpoint has, this run lacks: optimizer/opt_state/1/0/count" in str(error.value)


def test_keep_best_is_reported_in_final_json(tmp_path):
    summary = run(tiny_config(tmp_path, keep_best="eval_loss", keep_best_mode="max", checkpoint_dir=""))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    worst = max(evals, key=evals.get)
    assert summary["best"]["step"] == worst and summary["best"]["eval_loss"] == evals[worst]
    assert json.loads((tmp_path / "final.json").read_text())["best"] == summary["best"]


class ParityAtLength:
    """A task offering ``batch_at_length`` itself, as the protocol asks."""

    name, vocab_size, n_classes = "parity_at_length", 2, 2

    def __init__(self, task):
        self.task = task

    def batch(self, step, split="train"):
        return self.task.batch(step, split)

    def batch_at_length(self, step, length, split="eval"):
        return dataclasses.replace(self.task, length=length, seed=self.task.seed + 1).batch(step, split)


def numpy_metrics(model, batches):
    """Mean of per-batch cross-entropy and accuracy, in float64 numpy, from the model's logits."""
    losses, accuracies = [], []
    for batch in batches:
        logits = np.asarray(model(batch["inputs"], reset=batch["reset"]), np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
        losses.append(nll[batch["mask"]].mean())
        accuracies.append((logits.argmax(-1) == batch["targets"])[batch["mask"]].mean())
    return np.mean(losses), np.mean(accuracies)


def test_evaluation_at_several_lengths_matches_a_numpy_evaluation():
    task = RunningParity(length=6, batch_size=4, seed=3)
    model = SequenceModel("elman", vocab_size=2, d_model=4, n_layers=1, d_output=2, rngs=nnx.Rngs(1))
    eval_step = nnx.cached_partial(make_eval_step(), model)
    for candidate in (task, ParityAtLength(task)):
        got = evaluate(eval_step, candidate, 2, lengths=(3, 11))
        assert set(got) == {f"eval{p}_{m}" for p in ("", "_len3", "_len11") for m in ("loss", "accuracy")}
        for length in (3, 11):
            batches = [batch_at_length(candidate, i, length) for i in range(2)]
            assert all(b["inputs"].shape == (4, length) for b in batches)
            loss, accuracy = numpy_metrics(model, batches)
            np.testing.assert_allclose(got[f"eval_len{length}_loss"], loss, rtol=1e-5)
            np.testing.assert_allclose(got[f"eval_len{length}_accuracy"], accuracy, rtol=1e-6)
    # The two tasks draw their length batches differently, so the protocol method is what ran.
    assert not np.array_equal(batch_at_length(task, 0, 11)["inputs"],
                              batch_at_length(ParityAtLength(task), 0, 11)["inputs"])

    class NoLengths:
        name, vocab_size, n_classes = "fixed", 2, 2
        batch = task.batch

    with pytest.raises(ValueError, match=r"eval_lengths must be positive ints, got \(8, 0\)"):
        check_eval_lengths(task, (8, 0))
    with pytest.raises(TypeError, match="'fixed'.*batch_at_length"):
        train(model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param), NoLengths(), steps=1,
              eval_lengths=(8,), progress=False)


class Noisy(nnx.Module):
    """A layer that keeps its own dropout key, as a model with dropout does."""

    def __init__(self, seed):
        self.linear = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=seed))

    def __call__(self, x):
        return self.dropout(self.linear(x))


def test_an_rng_kept_by_the_model_is_checkpointed_and_restored_with_it(tmp_path):
    from zoo.train import checkpoint

    model = Noisy(seed=0)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = np.ones((64, 3), np.float32)
    for _ in range(3):          # advance the key's counter past its initial value
        model(x)
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 3, model, optimizer)
    mngr.wait_until_finished()
    mngr.close()

    restored = Noisy(seed=7)
    mngr = checkpoint.manager(tmp_path)
    step = checkpoint.restore_latest(mngr, restored, nnx.Optimizer(restored, optax.sgd(0.1), wrt=nnx.Param))
    mngr.close()
    assert step == 3 and int(restored.dropout.rngs.count[...]) == int(model.dropout.rngs.count[...]) == 3
    # The next masks are the ones the saved model draws next, not those of the new seed.
    np.testing.assert_array_equal(restored(x), model(x))
    assert not np.array_equal(Noisy(seed=7)(x), Noisy(seed=0)(x))


@pytest.mark.parametrize("task", ["parity_check", "copy", "mqar"])
def test_the_cli_builds_tfds_tasks_from_their_default_config(task, tmp_path, monkeypatch):
    """Every field the CLI reads off a built task goes back into its factory (a Chomsky task's own
    ``task`` field included), here at small sizes in a temporary data directory."""
    from experiments.train import build_task

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    cfg = default_config("gru", task)
    sizes = {"train_size": 8, "eval_size": 4}
    for key, value in sizes.items():
        if key in cfg.task_config:
            cfg.task_config[key] = value
    built = build_task(cfg)
    batch = built.batch(0)
    assert batch["inputs"].shape[0] == cfg.batch_size and batch["mask"].any()
