"""The training CLI picks each task's loss and metrics (``TASK_LOSSES``) and reads float vector inputs
through a linear input layer: bach_chorales trains on NLL per frame, char_lm reports bits per character,
``sequential_digits`` with ``view=rows`` gets ``d_input``."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.train import char_lm_loss, default_config, loss_fn_for, model_inputs, run
from zoo.train.losses import classification_loss


def test_each_task_names_its_loss_and_the_rest_classify():
    from zoo.data.bach_chorales import frame_loss

    assert loss_fn_for("bach_chorales") is frame_loss
    assert loss_fn_for("char_lm") is char_lm_loss
    from zoo.data.linear_regression import regression_loss

    assert loss_fn_for("linear_regression") is regression_loss
    for task in ("running_parity", "parity_check", "copy", "selective_copy", "mqar", "sequential_digits"):
        assert loss_fn_for(task) is classification_loss
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        loss_fn_for("nope")


def test_char_lm_loss_adds_bits_per_character_to_the_classification_metrics():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    batch = {"inputs": jnp.zeros((2, 5), jnp.int32), "targets": jnp.asarray(rng.integers(0, 7, (2, 5))),
             "mask": jnp.asarray(rng.random((2, 5)) > 0.3), "reset": jnp.zeros((2, 5), bool)}

    def model(inputs, reset):
        return logits

    loss, metrics = char_lm_loss(model, batch)
    expected, expected_metrics = classification_loss(model, batch)
    np.testing.assert_allclose(loss, expected)
    np.testing.assert_allclose(metrics["accuracy"], expected_metrics["accuracy"])
    np.testing.assert_allclose(metrics["bits_per_character"], expected / math.log(2), rtol=1e-6)


def test_vector_tasks_get_a_linear_input_layer_and_token_tasks_an_embedding():
    class Vectors:
        input_dim, vocab_size = 88, 88

    class Tokens:
        vocab_size = 12

    assert model_inputs(Vectors()) == {"d_input": 88}
    assert model_inputs(Tokens()) == {"vocab_size": 12}


def tiny(task, out, **task_config):
    cfg = default_config("gru", task)
    cfg.d_model, cfg.batch_size, cfg.mlp_ratio = 4, 2, 1.0
    cfg.steps, cfg.eval_every, cfg.eval_batches, cfg.log_every, cfg.progress = 2, 2, 1, 1, False
    cfg.output_dir, cfg.checkpoint_dir = str(out), ""
    for key, value in task_config.items():
        cfg.task_config[key] = value
    return cfg


def test_the_cli_trains_bach_chorales_on_nll_per_frame(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    summary = run(tiny("bach_chorales", tmp_path / "run", max_chorales=2, pack=True))
    final = summary["final"]
    assert set(final) == {"eval_loss", "eval_nll_per_frame"}
    assert final["eval_loss"] == final["eval_nll_per_frame"] > 0
    assert summary["params"] > 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["final"] == final
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("nll_per_frame" in r for r in records if "loss" in r)


def test_the_cli_reports_bits_per_character_for_char_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    final = run(tiny("char_lm", tmp_path / "run", window_length=8, train_size=4, eval_size=2))["final"]
    assert {"eval_loss", "eval_accuracy", "eval_bits_per_character"} <= set(final)
    np.testing.assert_allclose(final["eval_bits_per_character"], final["eval_loss"] / math.log(2), rtol=1e-5)


def test_the_cli_trains_linear_regression_on_mse_and_sweeps_its_length(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    cfg = tiny("linear_regression", tmp_path / "run", n_points=6, dim=2, train_size=4, eval_size=2)
    cfg.eval_lengths = (16,)
    final = run(cfg)["final"]
    assert final["eval_loss"] == final["eval_mse"] > 0
    assert final["eval_len16_mse"] > 0                 # 8 points at length 16 (interleaved x, y steps)
    assert (tmp_path / "run" / "lengths.png").stat().st_size > 0


def test_sequential_digits_rows_build_a_model_with_d_input(tmp_path, monkeypatch):
    from experiments.train import build_model, build_task

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "data"))
    cfg = tiny("sequential_digits", tmp_path / "run", view="rows", train_size=4, eval_size=2)
    task = build_task(cfg)
    model = build_model(cfg, task)
    batch = task.batch(0)
    assert model.d_input == 8 and model.vocab_size is None
    assert model(batch["inputs"], reset=batch["reset"]).shape == (*batch["mask"].shape, 10)


def test_curves_without_accuracy_plot_the_first_other_metric(tmp_path):
    from zoo.train.metrics import plot_curves

    records = [{"step": 0, "eval_loss": 9.0, "eval_nll_per_frame": 9.0},
               {"step": 1, "loss": 8.0, "nll_per_frame": 8.0},
               {"step": 2, "loss": 7.0, "nll_per_frame": 7.0, "eval_loss": 7.5, "eval_nll_per_frame": 7.5}]
    plot_curves(records, tmp_path / "curves.png", title="t", chance=1 / 88)
    plot_curves([{"step": 1, "loss": 1.0}], tmp_path / "loss_only.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "loss_only.png").stat().st_size > 0
