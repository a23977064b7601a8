"""Study 1c: the counter task of "Neural Networks and the Chomsky Hierarchy" (Delétang et al., ICLR 2023)
over seeds, scored per test length as the paper scores it.

    .venv/bin/python -m experiments.studies.chomsky_counter           # 3 seeds, ~25-50 min a run on 2 cores
    .venv/bin/python -m experiments.studies.chomsky_counter --quick   # a smoke run of a few steps

The paper claims that "LSTMs can solve regular and counter-language tasks". In ``chomsky_regular`` the
paper's network and recipe (the bare LSTM of width 256 under a linear readout, Adam at a constant 1e-3,
gradient norm clipped to 1, batch 128, 10k steps) solved cycle_navigation and modular_arithmetic, and in
one seed fitted bucket_sort (training accuracy 1.0 on lengths 1-40) without generalising (0.373 on
41-500). bucket_sort needs only a count of each of its five symbols, not a stack or a tape, so it is the
counter task of the set. This study trains the same network on it over ``SEEDS``, and one seed again
for each of ``LONG_STEPS`` (the longer arms), and reports two scores for each run:

* the paper's: the accuracy at each test length (every output position of every example at that
  length), averaged over every length of the test range (``training/range_evaluation.py`` of
  google-deepmind/neural_networks_chomsky_hierarchy evaluates every length separately). Here the
  accuracy is measured at the lengths ``EVAL_LENGTHS``, each with ``eval_batches`` held-out batches,
  interpolated linearly to every length from the first to the last, and averaged
  (``mean_over_every_length``); the measured curve is printed beside it;
* zoo's ``chomsky_regular`` score: the accuracy over every output position of the held-out split
  (lengths drawn uniformly from 41-500), which weights each length by its number of outputs, so that
  the long lengths count most.

Writes ``experiments/results/chomsky_counter.md``. ``run_per_length_study`` is the study for any model
and task; ``chomsky_rnn_modular`` runs it for the paper's RNN on modular_arithmetic.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from experiments.studies import _runner as R
from experiments.studies.chomsky import PAPER_LENGTHS, PAPER_MODELS, SOLVED, TASK_FULL, TASK_QUICK
from experiments.studies.chomsky_regular import (
    FULL,
    PAPER_NET_FULL,
    PAPER_NET_QUICK,
    QUICK,
    fresh_examples,
    paper_net_overrides,
)
from zoo.train import length_metric_key

NAME = "chomsky_counter"
MODEL, TASK = "lstm", "bucket_sort"
SEEDS = (0, 1, 2)
# Longer arms: the paper's score rose from 0.34-0.38 at step 5k to 0.48-0.49 at 10k in every seed, so
# one seed trains two and four times as long (~55 and ~110 min on 2 cores) to show whether it keeps
# climbing.
LONG_STEPS = (20000, 40000)
LONG_SEEDS = (0,)
# Test lengths for the per-length curve: the paper's range is 41-500; denser at the short end, where a
# counter that drifts with length would first show.
EVAL_LENGTHS = (41, 50, 60, 80, 100, 150, 200, 300, 400, 500)
QUICK_EVAL_LENGTHS = (5, 6)


def length_key(length: int) -> str:
    """The loop's evaluation key of the accuracy at one test length."""
    return length_metric_key(length, "accuracy")


def per_length(run: R.RunResult, lengths) -> list[float]:
    """The run's accuracy at each of ``lengths`` (after its last step)."""
    return [run.final[length_key(n)] for n in lengths]


def curves_by_step(run: R.RunResult, lengths) -> dict[int, list[float]]:
    """The run's accuracy at each of ``lengths`` at every evaluation after step 0, from its
    ``metrics.jsonl``: how far the generalisation reaches as training goes on."""
    return {r["step"]: [r[length_key(n)] for n in lengths] for r in run.records()
            if length_key(lengths[0]) in r and r["step"] > 0}


def reach(lengths, accuracies, bar: float = SOLVED) -> int | None:
    """The longest of ``lengths`` up to which every measured accuracy is at least ``bar`` (None if the
    first is below it)."""
    longest = None
    for length, accuracy in zip(lengths, accuracies, strict=True):
        if accuracy < bar:
            break
        longest = length
    return longest


def mean_over_every_length(lengths, accuracies) -> float:
    """The paper's score from a sampled curve: ``accuracies`` at the increasing ``lengths``, interpolated
    linearly to every integer length from the first to the last, then averaged. ``EVAL_LENGTHS`` are
    denser at the short end, so their plain mean would weight the short lengths (where a model that
    generalises a little does best) more than the paper does."""
    every = np.arange(lengths[0], lengths[-1] + 1)
    return float(np.mean(np.interp(every, lengths, accuracies)))


@dataclasses.dataclass(frozen=True)
class PerLengthStudy:
    """The paper's network (chomsky_regular's ``PAPER_NET_FULL``) trained on one task over seeds and
    scored per test length; optionally longer arms (each of ``long_steps``, at ``long_seeds``) that show
    whether the score still climbs after the main runs' steps."""

    name: str
    model: str
    task: str
    title: str
    task_text: str                  # what the task asks, for the table's setting
    seeds: tuple[int, ...]
    long_steps: tuple[int, ...] = ()
    long_seeds: tuple[int, ...] = ()
    quick_long_steps: tuple[int, ...] = (4,)    # the longer arm of --quick (whose main runs take 2 steps)


def run_label(run: R.RunResult, main_steps: int) -> str:
    """A run's name in the tables: its seed, and its steps where they differ from the main runs'."""
    return f"seed {run.seed}" if run.steps == main_steps else f"seed {run.seed}, {run.steps} steps"


def run_per_length_study(study: PerLengthStudy, argv, doc: str | None) -> str:
    """Train ``study``'s runs (each loaded instead if finished by the same command before) and write its
    table: the paper's score and the whole split's per run, the accuracy at each test length, and the
    paper's score and reach at every evaluation."""
    args, hardware, seeds, shared = R.begin(study.name, argv, doc, quick=QUICK, full=FULL,
                                            task_quick=TASK_QUICK, task_full=TASK_FULL,
                                            default_seeds=study.seeds)
    if args.quick and args.seeds is None:
        seeds = [0]                             # the smoke run: one seed
    lengths = QUICK_EVAL_LENGTHS if args.quick else EVAL_LENGTHS
    overrides = paper_net_overrides({**shared, **(PAPER_NET_QUICK if args.quick else PAPER_NET_FULL)},
                                    study.model)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if not args.quick:
        # The same command line as chomsky_regular's paper's-network run of this model and task, plus
        # the per-length evaluations (which change what is logged, not the run).
        overrides = fresh_examples(overrides)
    overrides["eval_lengths"] = lengths
    label = f"{study.model}-papernet-{study.task}"
    arms = [(label, overrides, seeds)]
    long_seeds = [0] if args.quick else list(study.long_seeds)
    for long_steps in study.quick_long_steps if args.quick else study.long_steps:
        if not long_seeds or long_steps == overrides["steps"]:     # --steps may already train that long
            continue
        longer = {**overrides, "steps": long_steps}
        if not args.quick:
            longer = fresh_examples(longer)     # fresh examples again: steps x batch
        arms.append((f"{label}-{long_steps}steps", longer, long_seeds))
    began = time.perf_counter()
    runs: list[R.RunResult] = []
    for arm_label, arm_overrides, arm_seeds in arms:
        for seed in arm_seeds:
            done = R.train_one(study.model, study.task, arm_overrides, seed=seed, label=arm_label,
                               runs_dir=args.runs, full_eval=True)
            runs.append(done)
            print(f"{study.name}: {arm_label} seed {seed}: mean over every length "
                  f"{mean_over_every_length(lengths, per_length(done, lengths)):.4f}, every output of the "
                  f"split {done.metric('accuracy'):.4f} ({done.seconds:.0f} s)", flush=True)
    wall = time.perf_counter() - began
    main_steps = overrides["steps"]
    main_runs = [run for run in runs if run.steps == main_steps]

    def score(run: R.RunResult) -> float:
        return mean_over_every_length(lengths, per_length(run, lengths))

    def row(run: R.RunResult) -> list[str]:
        return [run_label(run, main_steps), f"{score(run):.4f}", f"{run.metric('accuracy'):.4f}",
                f"{run.train_tail('accuracy'):.4f}", f"{run.seconds:.0f}"]

    summary = [row(run) for run in main_runs]
    summary.append(["mean ± sd", R.mean_std([score(r) for r in main_runs]),
                    R.mean_std([r.metric("accuracy") for r in main_runs]),
                    R.mean_std([r.train_tail("accuracy") for r in main_runs]), R.seconds_cell(main_runs)])
    summary += [row(run) for run in runs if run.steps != main_steps]
    curve = [[f"{n}", *(f"{run.final[length_key(n)]:.4f}" for run in runs)] for n in lengths]
    task_lengths = TASK_QUICK if args.quick else PAPER_LENGTHS
    train_top = task_lengths["max_train_length"]
    sections = [
        ("Test accuracy per run", ["run",
                                   f"mean over every length {lengths[0]}–{lengths[-1]} (the paper's score)",
                                   "every output of the held-out split (chomsky_regular's score)",
                                   f"train accuracy (last 100 steps, lengths 1–{train_top})",
                                   "wall s"], summary),
        ("Accuracy at each test length", ["length", *(run_label(run, main_steps) for run in runs)], curve),
    ]
    cell = "bare LSTM (`block=plain`, variant np, haiku's LSTM)" if study.model == "lstm" else \
        "bare tanh RNN (`block=plain`, haiku's VanillaRNN)"
    setting = (
        f"Task: {study.task} (`zoo.data.TASKS`: {study.task_text}), trained on input lengths 1–{train_top} "
        f"with a training split of {overrides.get('task_config.train_size', 'the default'):,} examples "
        "(steps x batch: no example repeats, as the paper samples fresh ones). Model: the paper's network, "
        f"as in chomsky_regular's \"{study.model}, paper's network\" row: the {cell} of width "
        f"{overrides['d_model']} under a linear readout; Adam at a constant lr "
        f"{overrides['learning_rate']:g}, gradients clipped to norm {overrides['clip_norm']:g}, batch "
        f"{overrides['batch_size']}, {main_steps} steps; seeds {', '.join(map(str, seeds))} (each "
        f"seeds the parameters and the data). Held-out lengths: {', '.join(map(str, lengths))}, "
        f"{overrides['eval_batches']} batches of {overrides['batch_size']} examples at each (the estimate "
        "of the paper's score interpolates between them to every length and averages), and the whole "
        f"held-out split (lengths {task_lengths['min_eval_length']}–"
        f"{task_lengths['max_eval_length']}, each example once)."
    )
    if len(arms) > 1:
        setting += (f" Longer arms train seed(s) {', '.join(map(str, long_seeds))} for "
                    + ", ".join(f"{longer['steps']} steps (a training split of "
                                f"{longer.get('task_config.train_size', 'the default'):,})"
                                for _, longer, _ in arms[1:])
                    + ", so again no example repeats; their data differ from the main run of the same seed.")
    if args.quick:
        setting += "\n\n**--quick smoke setting: a few steps at tiny lengths; the numbers mean nothing.**"
    paper = (
        'Delétang et al. [S] (PAPERS.md): "RNNs and Transformers fail to generalize on non-regular tasks, '
        'LSTMs can solve regular and counter-language tasks", from '
        f"{PAPER_MODELS} trained models; a (model, task) counts as solved by its best hyperparameters and "
        "seed (the paper's sweep: several learning rates and 10 seeds per cell). PAPERS.md quotes no "
        "per-task accuracies."
    )
    best = max(main_runs, key=score)

    def reach_text(accuracies) -> str:
        longest = reach(lengths, accuracies)
        return "none" if longest is None else str(longest)

    def progress(run: R.RunResult) -> str:
        curves = sorted(curves_by_step(run, lengths).items())
        return ", ".join(f"step {step}: {mean_over_every_length(lengths, acc):.3f} (reach {reach_text(acc)})"
                         for step, acc in curves)

    notes = (
        f"Best seed {best.seed}: {score(best):.3f} averaged over every test length "
        f"({'solved' if score(best) >= SOLVED else 'not solved'} at the {SOLVED} bar); "
        f"{sum(score(r) >= SOLVED for r in main_runs)} of {len(main_runs)} seeds reach it. "
        f"At the shortest test length ({lengths[0]}) the seeds score "
        f"{', '.join(f'{run.final[length_key(lengths[0])]:.3f}' for run in main_runs)}; at the longest "
        f"({lengths[-1]}) {', '.join(f'{run.final[length_key(lengths[-1])]:.3f}' for run in main_runs)}.\n\n"
        f"Reach, the longest measured length up to which every measured length scores ≥ {SOLVED} (training "
        f"stops at {train_top}): "
        + "; ".join(f"{run_label(run, main_steps)} {reach_text(per_length(run, lengths))}" for run in runs)
        + ". The paper's score and the reach at each evaluation of each run: "
        + "; ".join(f"{run_label(run, main_steps)}: {progress(run)}" for run in runs) + "."
    )
    return R.publish(study.name, argv, args.out, title=study.title, seeds=seeds, wall=wall,
                     hardware_line=hardware, sections=sections, setting=setting, paper=paper, notes=notes,
                     runs=runs)


STUDY = PerLengthStudy(
    name=NAME, model=MODEL, task=TASK, seeds=SEEDS, long_steps=LONG_STEPS, long_seeds=LONG_SEEDS,
    title="Chomsky hierarchy, the counter task bucket_sort: the paper's LSTM over seeds, per test length",
    task_text="a string over 5 symbols, then as many blanks, at which the model outputs the string sorted")


def main(argv=None) -> str:
    return run_per_length_study(STUDY, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
