"""Study 1c: the counter task of "Neural Networks and the Chomsky Hierarchy" (Delétang et al., ICLR 2023)
over seeds, scored per test length as the paper scores it.

    .venv/bin/python -m experiments.studies.chomsky_counter           # 3 seeds, ~25-50 min a run on 2 cores
    .venv/bin/python -m experiments.studies.chomsky_counter --quick   # a smoke run of a few steps

The paper claims that "LSTMs can solve regular and counter-language tasks". In ``chomsky_regular`` the
paper's network and recipe (the bare LSTM of width 256 under a linear readout, Adam at a constant 1e-3,
gradient norm clipped to 1, batch 128, 10k steps) solved cycle_navigation and modular_arithmetic, and in
one seed fitted bucket_sort (training accuracy 1.0 on lengths 1-40) without generalising (0.373 on
41-500). bucket_sort needs only a count of each of its five symbols, not a stack or a tape, so it is the
counter task of the set. This study trains the same network on it over ``SEEDS`` and reports two
scores for each run:

* the paper's: the accuracy at each test length (every output position of every example at that
  length), averaged over every length of the test range (``training/range_evaluation.py`` of
  google-deepmind/neural_networks_chomsky_hierarchy evaluates every length separately). Here the
  accuracy is measured at the lengths ``EVAL_LENGTHS``, each with ``eval_batches`` held-out batches,
  interpolated linearly to every length from the first to the last, and averaged
  (``mean_over_every_length``); the measured curve is printed beside it;
* zoo's ``chomsky_regular`` score: the accuracy over every output position of the held-out split
  (lengths drawn uniformly from 41-500), which weights each length by its number of outputs, so that
  the long lengths count most.

Writes ``experiments/results/chomsky_counter.md``.
"""

from __future__ import annotations

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
)
from zoo.train import length_metric_key

NAME = "chomsky_counter"
MODEL, TASK = "lstm", "bucket_sort"
SEEDS = (0, 1, 2)
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


def main(argv=None) -> str:
    args, hardware, seeds, shared = R.begin(NAME, argv, __doc__, quick=QUICK, full=FULL,
                                            task_quick=TASK_QUICK, task_full=TASK_FULL, default_seeds=SEEDS)
    if args.quick and args.seeds is None:
        seeds = [0]                             # the smoke run: one seed
    lengths = QUICK_EVAL_LENGTHS if args.quick else EVAL_LENGTHS
    overrides = {**shared, **(PAPER_NET_QUICK if args.quick else PAPER_NET_FULL)}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if not args.quick:
        # The same command line as chomsky_regular's "lstm, paper's network" run on bucket_sort, plus
        # the per-length evaluations (which change what is logged, not the run).
        overrides = fresh_examples(overrides)
    overrides["eval_lengths"] = lengths
    began = time.perf_counter()
    runs = []
    for seed in seeds:
        done = R.train_one(MODEL, TASK, overrides, seed=seed, label=f"{MODEL}-papernet-{TASK}",
                           runs_dir=args.runs, full_eval=True)
        runs.append(done)
        print(f"{NAME}: seed {seed}: mean over every length "
              f"{mean_over_every_length(lengths, per_length(done, lengths)):.4f}, "
              f"every output of the split {done.metric('accuracy'):.4f} ({done.seconds:.0f} s)", flush=True)
    wall = time.perf_counter() - began

    def mean_over_lengths(run: R.RunResult) -> float:
        return mean_over_every_length(lengths, per_length(run, lengths))

    summary = [[f"{run.seed}", f"{mean_over_lengths(run):.4f}", f"{run.metric('accuracy'):.4f}",
                f"{run.train_tail('accuracy'):.4f}", f"{run.seconds:.0f}"] for run in runs]
    summary.append(["mean ± sd", R.mean_std([mean_over_lengths(r) for r in runs]),
                    R.mean_std([r.metric("accuracy") for r in runs]),
                    R.mean_std([r.train_tail("accuracy") for r in runs]), R.seconds_cell(runs)])
    curve = [[f"{n}", *(f"{run.final[length_key(n)]:.4f}" for run in runs)] for n in lengths]
    task_lengths = TASK_QUICK if args.quick else PAPER_LENGTHS
    train_top = task_lengths["max_train_length"]
    sections = [
        ("Test accuracy per run", ["seed",
                                   f"mean over every length {lengths[0]}–{lengths[-1]} (the paper's score)",
                                   "every output of the held-out split (chomsky_regular's score)",
                                   f"train accuracy (last 100 steps, lengths 1–{train_top})",
                                   "wall s"], summary),
        ("Accuracy at each test length", ["length", *(f"seed {run.seed}" for run in runs)], curve),
    ]
    setting = (
        f"Task: {TASK} (`zoo.data.TASKS`: a string over 5 symbols, then as many blanks, at which the model "
        f"outputs the string sorted), trained on input lengths 1–{train_top} with "
        f"a training split of {overrides.get('task_config.train_size', 'the default'):,} examples (steps x "
        "batch: no example repeats, as the paper samples fresh ones). Model: the paper's network, as in "
        "chomsky_regular's \"lstm, paper's network\" row: the bare LSTM (`block=plain`, variant np, "
        f"haiku's LSTM) of width {overrides['d_model']} under a linear readout; Adam at a constant lr "
        f"{overrides['learning_rate']:g}, gradients clipped to norm {overrides['clip_norm']:g}, batch "
        f"{overrides['batch_size']}, {overrides['steps']} steps; seeds {', '.join(map(str, seeds))} (each "
        f"seeds the parameters and the data). Held-out lengths: {', '.join(map(str, lengths))}, "
        f"{overrides['eval_batches']} batches of {overrides['batch_size']} examples at each (the estimate "
        "of the paper's score interpolates between them to every length and averages), and the whole "
        f"held-out split (lengths {task_lengths['min_eval_length']}–"
        f"{task_lengths['max_eval_length']}, each example once)."
    )
    if args.quick:
        setting += "\n\n**--quick smoke setting: a few steps at tiny lengths; the numbers mean nothing.**"
    paper = (
        'Delétang et al. [S] (PAPERS.md): "LSTMs can solve regular and counter-language tasks", from '
        f"{PAPER_MODELS} trained models; a (model, task) counts as solved by its best hyperparameters and "
        "seed (the paper's sweep: several learning rates and 10 seeds per cell). PAPERS.md quotes no "
        "per-task accuracies."
    )
    best = max(runs, key=mean_over_lengths)

    def reach_text(accuracies) -> str:
        longest = reach(lengths, accuracies)
        return "none" if longest is None else str(longest)

    def progress(run: R.RunResult) -> str:
        curves = sorted(curves_by_step(run, lengths).items())
        return ", ".join(f"step {step}: {mean_over_every_length(lengths, acc):.3f} (reach {reach_text(acc)})"
                         for step, acc in curves)

    notes = (
        f"Best seed {best.seed}: {mean_over_lengths(best):.3f} averaged over every test length "
        f"({'solved' if mean_over_lengths(best) >= SOLVED else 'not solved'} at the {SOLVED} bar); "
        f"{sum(mean_over_lengths(r) >= SOLVED for r in runs)} of {len(runs)} seeds reach it. "
        f"At the shortest test length ({lengths[0]}) the seeds score "
        f"{', '.join(f'{run.final[length_key(lengths[0])]:.3f}' for run in runs)}; at the longest "
        f"({lengths[-1]}) {', '.join(f'{run.final[length_key(lengths[-1])]:.3f}' for run in runs)}.\n\n"
        f"Reach, the longest measured length up to which every measured length scores ≥ {SOLVED} (training "
        f"stops at {train_top}): "
        + "; ".join(f"seed {run.seed} {reach_text(per_length(run, lengths))}" for run in runs)
        + ". The paper's score and the reach at each evaluation of each run: "
        + "; ".join(f"seed {run.seed}: {progress(run)}" for run in runs) + "."
    )
    return R.publish(NAME, argv, args.out, title="Chomsky hierarchy, the counter task bucket_sort: the "
                     "paper's LSTM over seeds, per test length", seeds=seeds, wall=wall,
                     hardware_line=hardware, sections=sections, setting=setting, paper=paper, notes=notes,
                     runs=runs)


if __name__ == "__main__":
    main(sys.argv[1:])
