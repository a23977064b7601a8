"""Every study of ``experiments/studies`` runs in its ``--quick`` setting (a few steps of tiny models, a
subset of each study's models) and writes a table with the header facts (command, hardware, wall time,
seeds) and one row per model it trained."""

import importlib
import json
import os
import re

import pytest

STUDIES = ("bach_chorales", "bach_chorales_search", "selective_copy", "chomsky", "chomsky_regular",
           "chomsky_counter", "chomsky_rnn_modular", "mqar", "char_lm")
PER_LENGTH_STUDIES = ("chomsky_counter", "chomsky_rnn_modular")
SEARCH_CHOSEN = "Each model at its setting of the lowest validation NLL"
SEARCH_EVERY = "Test NLL/frame (validation NLL/frame) at every setting"
HEADER = ("**Command:** `.venv/bin/python -m experiments.studies.", "**Hardware:**", "CPU cores usable",
          "**Wall time:**", "**Seeds:** 0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def sections(text: str) -> dict[str, list[list[str]]]:
    """The rows (cells) of each ``## heading``'s markdown table, header row first."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and not re.fullmatch(r"\|(---\|)+", line) and heading is not None:
            tables.setdefault(heading, []).append([cell.strip() for cell in line.strip("|").split(" | ")])
    return tables


def expected_rows(name: str, module) -> tuple[str, list[str]]:
    """(section, first cells) that the quick table must have: one row per model that --quick trains."""
    if name in ("bach_chorales", "selective_copy"):
        return "Results", [label for label, *_ in module.MODELS if label in module.QUICK_MODELS]
    if name == "bach_chorales_search":
        return SEARCH_CHOSEN, [label for label, *_ in module.MODELS if label in module.QUICK_MODELS]
    if name == "chomsky":
        return "Every run", list(module.QUICK_MODELS)
    if name == "chomsky_regular":           # one run per model, task, rate and the one quick seed
        main_arms = [m for _ in module.QUICK_TASKS for m in module.arm_labels(module.QUICK_MODELS)
                     for _ in module.QUICK_LEARNING_RATES]
        return "Every run", (main_arms + module.long_labels(module.QUICK_LONG_RUNS)
                             + module.paper_net_labels(module.QUICK_PAPER_NET_RUNS)
                             + [module.ablation_label(factor) for factor, _, _ in module.QUICK_ABLATIONS])
    if name in PER_LENGTH_STUDIES:   # one run per quick seed, the mean over seeds, then the longer arm
        longer = [f"seed 0, {steps} steps" for steps in module.STUDY.quick_long_steps]
        return "Test accuracy per run", ["seed 0", "mean ± sd", *longer]
    if name == "mqar":
        return "Accuracy against state size", [family for family, names in module.QUICK_FAMILIES.items()
                                               for _ in names]
    return "Results", [model for model, _ in module.MODELS if model in module.QUICK_MODELS]


@pytest.mark.parametrize("name", STUDIES)
def test_each_study_quick_writes_its_table(name, tmp_path, data_dir, monkeypatch, quick_compile):
    monkeypatch.setenv("ZOO_DATA_DIR", str(data_dir))
    module = importlib.import_module(f"experiments.studies.{name}")
    path = module.main(["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])
    text = open(path).read()
    assert path.endswith(f"{name}.md")
    for fact in HEADER:
        assert fact in text, (fact, text[:800])
    assert "--quick" in text
    section, firsts = expected_rows(name, module)
    rows = sections(text)[section][1:]
    assert [row[0] for row in rows] == firsts
    if name == "mqar":      # the second cell is the model: each once (sorted by state size in its family)
        models = [m for names in module.QUICK_FAMILIES.values() for m in names]
        assert sorted(row[1] for row in rows) == sorted(models)
    if name == "chomsky_regular":   # the best cell is the best run (first of ties), with its rate, seed
        summary = sections(text)["Best and mean test accuracy (lengths 41–500) over seeds and learning rates"]
        task, label = summary[1][0], summary[1][2]
        best_run = max((row for row in rows if row[:2] == [label, task]), key=lambda row: float(row[4]))
        assert summary[1][3].startswith(f"{float(best_run[4]):.4g} (lr {best_run[2]}, seed {best_run[3]};"), \
            (summary, rows)
    if name == "bach_chorales_search":   # each model's chosen setting is the one of its lowest valid NLL
        every = sections(text)[SEARCH_EVERY]
        for chosen, (label, *cells) in zip(rows, every[1:], strict=True):
            valid = [float(cell.split("(")[1].rstrip(")")) for cell in cells]
            best = valid.index(min(valid))
            assert chosen[0] == label and chosen[2] == every[0][1 + best], (chosen, every)
            assert float(chosen[5]) == pytest.approx(float(cells[best].split()[0]), rel=1e-3)
    if name in PER_LENGTH_STUDIES:   # the paper's score averages every length; the quick ones are adjacent
        from experiments.studies.chomsky_counter import QUICK_EVAL_LENGTHS

        curve = sections(text)["Accuracy at each test length"]
        assert curve[0][1:] == [rows[0][0], rows[2][0]]       # a column per run, the longer arm's too
        assert [row[0] for row in curve[1:]] == [str(n) for n in QUICK_EVAL_LENGTHS]
        assert QUICK_EVAL_LENGTHS[1] == QUICK_EVAL_LENGTHS[0] + 1
        for column, row in ((1, rows[0]), (2, rows[2])):
            per_length = [float(line[column]) for line in curve[1:]]
            assert float(row[1]) == pytest.approx(sum(per_length) / 2, abs=1e-4), (rows, curve)
    # Every number of the table comes from a run: no cell of a metric column is empty.
    assert all(cell not in ("", "n/a") for row in rows for cell in row)


def test_a_study_run_again_loads_its_finished_runs(tmp_path, data_dir, monkeypatch, quick_compile, capsys):
    """The same study command run a second time trains nothing: every run is loaded from its
    ``study_result.json`` with the same numbers, and the header says so; another command trains afresh."""
    from experiments.studies import _runner as R
    from experiments.studies import chomsky

    monkeypatch.setenv("ZOO_DATA_DIR", str(data_dir))
    argv = ["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    first = sections(open(chomsky.main(argv)).read())["Every run"]
    capsys.readouterr()
    text = open(chomsky.main(argv)).read()
    printed = capsys.readouterr().out
    assert sections(text)["Every run"] == first
    assert printed.count("the finished run in") == len(chomsky.QUICK_MODELS)
    assert f"loaded {len(chomsky.QUICK_MODELS)} of the {len(chomsky.QUICK_MODELS)} runs" in text
    run_dir = str(tmp_path / "runs" / f"{chomsky.QUICK_MODELS[0]}-{chomsky.PARITY}-seed0")
    command = json.load(open(os.path.join(run_dir, R.FINISHED)))["command"]
    assert R.finished_run(run_dir, command, True).cached
    assert R.finished_run(run_dir, command + " --config.steps=3", True) is None   # another run
    assert R.finished_run(run_dir, command, False) is None     # another held-out evaluation


def test_chomsky_counter_score_averages_every_length_of_the_interpolated_curve():
    """The paper averages the accuracy over every test length; the study measures a few lengths and
    interpolates. A curve that falls linearly from 1.0 at 41 to 0.2 at 101 and stays there up to 500:
    every length's value by hand, then the mean, against the study's function."""
    from experiments.studies.chomsky_counter import mean_over_every_length

    lengths, accuracies = (41, 101, 500), (1.0, 0.2, 0.2)
    every = [1.0 - 0.8 * (n - 41) / 60 if n <= 101 else 0.2 for n in range(41, 501)]
    assert mean_over_every_length(lengths, accuracies) == pytest.approx(sum(every) / len(every), rel=1e-12)
    assert mean_over_every_length((41, 50, 500), (0.5, 0.5, 0.5)) == pytest.approx(0.5)


def test_chomsky_counter_reach_is_the_end_of_the_first_run_of_solved_lengths():
    from experiments.studies.chomsky_counter import reach

    assert reach((41, 50, 60, 80), (1.0, 0.96, 0.5, 0.97)) == 50      # a later recovery does not count
    assert reach((41, 50), (0.9, 1.0)) is None
    assert reach((41, 50), (0.95, 0.99)) == 50
