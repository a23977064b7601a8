"""Shared by the studies: train one (model, task, config, seed) through ``experiments.train``, evaluate a
whole held-out split, and write a markdown table that states the command, the hardware, the wall time
and the seeds.

A study is a script ``experiments/studies/<name>.py`` run as ``python -m experiments.studies.<name>``;
``--quick`` is a smoke setting of a few steps (what ``tests/test_studies.py`` runs), ``--out`` the folder
of the table (default ``experiments/results``), ``--runs`` the folder of the runs' logs (default
``runs/studies/<name>``), ``--seeds`` the seeds, ``--steps`` the steps of every run.

A finished run leaves ``study_result.json`` in its log folder, keyed by its whole command line: the same
study command run again (after a kill, or to rewrite the table) loads the runs it finished and trains only
the others. Delete the runs folder to train everything afresh.

Every run goes through ``experiments.train.train_model`` with the config of ``default_config(model,
task)`` and the study's overrides, so a row of a table is reproduced by the command
``python -m experiments.train --model M --task T --config.<field>=<value> ...`` that ``cli_command``
gives and the table lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import train as cli

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


@dataclasses.dataclass
class RunResult:
    """One trained (model, task, config, seed): its final metrics and how long it took."""

    label: str
    model: str
    task: str
    seed: int
    overrides: dict[str, Any]
    params: int
    steps: int
    final: dict[str, float]          # the loop's last evaluation (``eval_*`` over ``eval_batches`` batches)
    full: dict[str, float] | None    # the whole held-out split, exactly once (``full_split_metrics``)
    seconds: float                   # wall time of the run: building the task, training, evaluating
    command: str
    cached: bool = False             # loaded from an earlier invocation's finished run (``finished_run``)
    output_dir: str = ""             # the run's logs (metrics.jsonl, curves.png, final.json)
    best: dict[str, float] | None = None    # with ``keep_best``: the kept evaluation, {"step": s, ...}

    def records(self) -> list[dict]:
        """Every record of the run's ``metrics.jsonl`` (training steps and evaluations)."""
        from zoo.train import metrics

        return metrics.read_records(os.path.join(self.output_dir, "metrics.jsonl"))

    def train_tail(self, key: str, last: int = 100) -> float:
        """Mean training ``key`` (one batch per step, at training lengths) over the run's last ``last``
        steps, from its ``metrics.jsonl``: what the model reached in distribution, beside the held-out
        number."""
        values = [r[key] for r in self.records() if key in r and "loss" in r]
        return statistics.mean(values[-last:]) if values else float("nan")

    def metric(self, key: str) -> float:
        """``key`` of the whole-split evaluation if there is one, else of the loop's last evaluation."""
        if self.full is not None and key in self.full:
            return self.full[key]
        return self.final[f"eval_{key}"]


def config_for(model: str, task: str, overrides: Mapping[str, Any], seed: int, output_dir: str):
    """``default_config(model, task)`` with ``overrides`` (dotted field names) and the study's fixed fields:
    the seed, the output folder, no checkpoints and no progress bar."""
    cfg = cli.default_config(model, task)
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = cfg
        for part in [node, *path][:-1]:
            target = target[part]
        leaf = key.split(".")[-1]
        if leaf not in target:
            raise KeyError(f"no config field {key!r} for --model {model} --task {task}")
        target[leaf] = value
    cfg.seed = seed
    cfg.output_dir = output_dir
    cfg.checkpoint_dir = ""
    cfg.progress = False
    return cfg


def spell(value) -> str:
    if isinstance(value, tuple | list):
        return "(" + ", ".join(spell(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def cli_command(model: str, task: str, overrides: Mapping[str, Any], seed: int) -> str:
    """The ``experiments.train`` command line of this run (without output and checkpoint folders)."""
    args = ["python", "-m", "experiments.train", "--model", model, "--task", task]
    fields = {**overrides, "seed": seed}
    args += [f"--config.{key}={spell(value)}" for key, value in fields.items()]
    return " ".join(shlex.quote(arg) for arg in args)


def full_split_metrics(model, task, loss_fn, split: str = "eval") -> dict[str, float]:
    """Every metric of ``loss_fn`` over all records of ``split`` of a tfds task, each record once, in
    order: batches of the task's batch size (the last one filled with masked-out copies), each batch's
    means weighted by its number of masked positions, so a metric is its mean over all positions that
    count (NLL per frame over every frame of the split; accuracy over every target)."""
    from zoo.data.pack import pad
    from zoo.data.vectors import VectorTask, pad_vectors
    from zoo.train import make_eval_step

    eval_step = make_eval_step(loss_fn)
    n_records, rows, length = task.config.split_size(split), task.batch_size, task.row_length(split)
    pad_fn = pad_vectors if isinstance(task, VectorTask) else pad
    sums: dict[str, float] = {}
    total = 0.0
    for start in range(0, n_records, rows):
        indices = np.arange(start, start + rows)
        real = indices < n_records
        batch = pad_fn(task.records(split, np.where(real, indices, 0)), length)
        batch["mask"] = batch["mask"] & real[:, None]
        weight = float(batch["mask"].sum())
        if weight == 0:
            continue
        for key, value in eval_step(model, batch).items():
            sums[key] = sums.get(key, 0.0) + weight * float(value)
        total += weight
    return {key: value / total for key, value in sums.items()}


def train_one(model: str, task: str, overrides: Mapping[str, Any], *, seed: int = 0, label: str | None = None,
              runs_dir: str = "runs/studies", full_eval: bool | Mapping[str, Any] = False) -> RunResult:
    """Train ``model`` on ``task`` with ``default_config`` + ``overrides`` and ``seed``, through
    ``experiments.train.train_model`` (the CLI's code path). Logs go to ``runs_dir/<label>-seed<seed>``.

    ``full_eval``: ``True`` also evaluates the whole held-out split of the task (``full_split_metrics``);
    a mapping of task fields evaluates the whole held-out split of the task built with those fields
    changed, e.g. ``{"eval_split": "test"}``: the loop's evaluations watch the validation split and the
    reported number is the test split's.
    """
    label = label or model
    output_dir = os.path.join(runs_dir, f"{label}-seed{seed}")
    cfg = config_for(model, task, overrides, seed, output_dir)
    command = cli_command(model, task, overrides, seed)
    finished = finished_run(output_dir, command, full_eval)
    if finished is not None:
        return finished
    began = time.perf_counter()
    done = cli.train_model(cfg)
    full = None
    if full_eval:
        held_out = done.task
        if isinstance(full_eval, Mapping):
            other = cfg.copy_and_resolve_references()
            for key, value in full_eval.items():
                other.task_config[key] = value
            held_out = cli.build_task(other)
        full = full_split_metrics(done.model, held_out, done.loss_fn)
    seconds = time.perf_counter() - began
    result = RunResult(label=label, model=model, task=task, seed=seed, overrides=dict(overrides),
                       params=done.summary["params"], steps=cfg.steps, final=done.summary["final"], full=full,
                       seconds=seconds, command=command, output_dir=output_dir, best=done.summary.get("best"))
    save_finished(output_dir, result, full_eval)
    return result


# A finished run's result, so that a study stopped part-way (or re-run to rewrite its table) trains only the
# runs it has not finished. It is keyed by the run's whole command line and held-out evaluation: a run with
# any other field, seed or step count trains again.
FINISHED = "study_result.json"


def save_finished(output_dir: str, result: RunResult, full_eval) -> None:
    record = {"full_eval": _eval_key(full_eval), **dataclasses.asdict(result), "cached": False}
    cli.write_json(os.path.join(output_dir, FINISHED), record)     # atomic


def finished_run(output_dir: str, command: str, full_eval) -> RunResult | None:
    """The saved result of this exact run (same command and held-out evaluation), else ``None``."""
    import json

    path = os.path.join(output_dir, FINISHED)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.pop("full_eval") != _eval_key(full_eval) or record["command"] != command:
        return None
    record["overrides"] = dict(record["overrides"])
    record["cached"] = True
    record["output_dir"] = output_dir      # where it is now (the folder may have moved)
    print(f"studies: {record['label']} seed {record['seed']}: the finished run in {output_dir} "
          f"({record['seconds']:.0f} s when it ran)", flush=True)
    return RunResult(**record)


def _eval_key(full_eval) -> Any:
    return dict(full_eval) if isinstance(full_eval, Mapping) else bool(full_eval)


def params_at(model: str, task: str, overrides: Mapping[str, Any], d_model: int) -> int:
    """Parameters of the model that ``train_one(model, task, overrides)`` builds at width ``d_model``."""
    from zoo.nn import count_params

    cfg = config_for(model, task, {**overrides, "d_model": d_model}, 0, os.devnull)
    return count_params(cli.build_model(cfg, cli.build_task(cfg)))


def width_for_params(model: str, task: str, overrides: Mapping[str, Any], target: int,
                     widths: Sequence[int]) -> tuple[int, int]:
    """``(d_model, params)``: the width among ``widths`` (ascending) whose parameter count is nearest
    ``target``, by bisection (the count grows with the width)."""
    lo, hi = 0, len(widths) - 1
    counts: dict[int, int] = {}

    def count(i: int) -> int:
        if i not in counts:
            counts[i] = params_at(model, task, overrides, widths[i])
        return counts[i]

    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda i: abs(count(i) - target))
    return widths[best], count(best)


# --- the hardware and the table -----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware() -> str:
    """The CPU count this process may use, the CPU, the platform, the jax backend and the load."""
    import jax

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{usable} CPU cores usable ({os.cpu_count()} online), {cpu_model()}; {platform.platform()}; "
            f"Python {platform.python_version()}, jax {jax.__version__} on {jax.default_backend()} "
            f"({jax.device_count()} device(s)); load average at the start {load} (a shared machine)")


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def seconds_cell(runs: Sequence[RunResult]) -> str:
    """The runs' wall seconds: one number, or mean ± standard deviation over seeds."""
    values = [r.seconds for r in runs]
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f}"


def wall_text(wall_seconds: float, runs: Sequence[RunResult]) -> str:
    """The study's wall time; where some runs were finished by an earlier invocation of the command (and
    loaded here), also the sum of every run's own wall time."""
    text = f"{wall_seconds:.0f} s for the whole study ({wall_seconds / 60:.1f} min)"
    cached = [r for r in runs if r.cached]
    if not cached:
        return text
    total = sum(r.seconds for r in runs)
    return (f"{wall_seconds:.0f} s for this invocation, which loaded {len(cached)} of the {len(runs)} runs "
            f"as finished by an earlier invocation of the same command; the runs' own wall times sum to "
            f"{total:.0f} s ({total / 60:.1f} min)")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(path: str, *, title: str, command: str, seeds: Sequence[int], wall_seconds: float,
                hardware_line: str, sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
                setting: str = "", paper: str = "", notes: str = "", runs: Sequence[RunResult] = ()) -> str:
    """Write the study's markdown: title, the header facts (command, hardware, wall time, seeds), the
    paper's claim, then one table per section ``(heading, columns, rows)``, notes, and the command of
    every run. Returns the text."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"# {title}",
        "",
        f"- **Command:** `{command}`",
        f"- **Hardware:** {hardware_line}",
        f"- **Wall time:** {wall_text(wall_seconds, runs)}; per run in the tables",
        f"- **Seeds:** {', '.join(str(s) for s in seeds)} (each seeds the initial parameters and the data)",
        f"- **Written:** {stamp} by `experiments/studies/_runner.py`; every number below comes from the runs "
        "of this command",
    ]
    if setting:
        parts += ["", "## Setting", "", setting.strip()]
    if paper:
        parts += ["", "## The papers' claims", "", paper.strip()]
    for heading, columns, rows in sections:
        parts += ["", f"## {heading}", "", markdown_table(columns, rows)]
    if notes:
        parts += ["", "## Notes", "", notes.strip()]
    if runs:
        parts += ["", "## Each run as an `experiments.train` command", "",
                  "The training of each row (the study turns checkpoints and the progress bar off and sets "
                  "the output folder); the whole-split evaluation after it is `_runner.full_split_metrics`.",
                  ""]
        parts += [f"- {r.label}, seed {r.seed}: `{r.command}`" for r in runs]
    text = "\n".join(parts) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


# --- the command line of a study -------------------------------------------------------------------------

def parse_args(name: str, argv: Sequence[str] | None, doc: str | None = None) -> argparse.Namespace:
    """``--quick``, ``--out`` (the table's folder), ``--runs`` (the logs'), ``--seeds``, ``--steps``."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.studies.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke setting: a few steps, tiny models")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder of the table <name>.md")
    parser.add_argument("--runs", default=None, help="folder of the runs' logs (default runs/studies/<name>)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the "
                        "study's)")
    args = parser.parse_args(argv)
    args.runs = args.runs or os.path.join("runs", "studies", name + ("-quick" if args.quick else ""))
    args.seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    return args


def begin(name: str, argv, doc: str | None, *, quick: Mapping[str, Any], full: Mapping[str, Any],
          task_quick: Mapping[str, Any] | None = None, task_full: Mapping[str, Any] | None = None,
          default_seeds: Sequence[int] = (0,)):
    """A study's start: ``(args, hardware line, seeds, shared overrides)``; ``--quick`` picks the quick
    settings, ``--steps`` overrides the step count and ``--seeds`` the seeds."""
    args = parse_args(name, argv, doc)
    quiet()
    shared = dict(quick if args.quick else full)
    task_fields = task_quick if args.quick else task_full
    shared.update({f"task_config.{k}": v for k, v in (task_fields or {}).items()})
    if args.steps is not None:
        shared["steps"] = args.steps
    return args, hardware(), list(args.seeds or default_seeds), shared


def train_models(name: str, models, task: str, shared: Mapping[str, Any], seeds: Sequence[int], runs_dir: str,
                 *, metric: str, metric_label: str, full_eval, run_label=lambda label: label):
    """Train every ``(label, model, config, _)`` row of ``models`` at every seed on ``task`` and print
    ``metric`` of each run. Returns ``({label: [RunResult per seed]}, wall seconds)``."""
    began = time.perf_counter()
    results: dict[str, list[RunResult]] = {}
    for label, model, config, _ in models:
        overrides = {**shared, **{f"model_config.{k}": v for k, v in config.items()}}
        for seed in seeds:
            done = train_one(model, task, overrides, seed=seed, label=run_label(label), runs_dir=runs_dir,
                             full_eval=full_eval)
            results.setdefault(label, []).append(done)
            print(f"{name}: {label} seed {seed}: {metric_label} {done.metric(metric):.4f} "
                  f"({done.seconds:.0f} s)", flush=True)
    return results, time.perf_counter() - began


def publish(name: str, argv, out: str, *, title: str, seeds, wall: float, hardware_line: str,
            **fields) -> str:
    """Write the study's table to ``out/<name>.md`` (``write_table``'s header facts) and say where."""
    path = os.path.join(out, f"{name}.md")
    write_table(path, title=title, command=study_command(name, argv), seeds=seeds, wall_seconds=wall,
                hardware_line=hardware_line, **fields)
    print(f"{name}: wrote {path} ({wall:.0f} s)")
    return path


def study_command(name: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", f"experiments.studies.{name}", *args])


def quiet() -> None:
    """Keep absl/orbax INFO logs off the terminal, as the CLI does."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
