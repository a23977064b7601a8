"""Study 1b: the regular tasks of "Neural Networks and the Chomsky Hierarchy" (Delétang et al., ICLR 2023)
for the paper's recurrent baselines, swept over seeds and learning rates and reported as the paper
reports them: the best run per (model, task) beside the mean.

    .venv/bin/python -m experiments.studies.chomsky_regular          # the full sweep (~2 h on 2 cores)
    .venv/bin/python -m experiments.studies.chomsky_regular --quick    # a smoke run of a few steps

The single-seed grid of ``experiments.studies.chomsky`` (2000 steps, one learning rate) leaves the
paper's claim that RNNs and LSTMs solve the regular tasks open: an LSTM fitted parity on lengths 1–40
in one probe and still failed 41–500. The paper scores every (model, task) by the best of its seeds
and learning rates (PAPERS.md: "20'910 models"). This study trains each of ``MODELS`` on each of
``TASKS`` for every seed in ``--seeds`` and every rate in ``LEARNING_RATES``, with more steps than the
grid, and prints per cell the best and the mean test accuracy over the runs (lengths 41–500, every
eval example, after the last step). even_pairs is left out: elman, lstm and gru all generalise on it
in the grid already. Each model runs in two arms: inside zoo's residual block with its MLP (the
grid's architecture) and without the MLP (``mlp_ratio=0``), nearer the paper's recurrent core with
a linear readout. A third arm trains the no-MLP cells left unsolved 4x longer (``LONG_RUNS``). A
fourth arm trains the paper's own network and recipe (``PAPER_NET_RUNS``), also on bucket_sort, the
counter task of the set, for the paper's claim that LSTMs solve counter-language tasks.
Writes ``experiments/results/chomsky_regular.md``.
"""

from __future__ import annotations

import sys
import time

from experiments.studies import _runner as R
from experiments.studies.chomsky import FULL as GRID_FULL
from experiments.studies.chomsky import PAPER_LENGTHS, PAPER_MODELS, SOLVED, TASK_FULL, TASK_QUICK
from zoo.data.chomsky import TASKS as SPECS

NAME = "chomsky_regular"
MODELS = ("elman", "lstm")                     # the paper's "RNN" and "LSTM"
TASKS = ("parity_check", "modular_arithmetic", "cycle_navigation")
LEARNING_RATES = (1e-3,)                       # the paper's example script's rate
SEEDS = (0, 1, 2, 3, 4)
FULL = {**GRID_FULL, "steps": 10000, "eval_every": 5000}
# Fresh examples at every step, as the paper samples them: the training split holds steps x batch
# examples (set in main, after --steps), so no example repeats. With the grid's 16384 examples an
# LSTM reached training accuracy 1.0 on parity at 10k steps (20 epochs) and 0.59 on 41-500.
QUICK = {"d_model": 8, "n_layers": 1, "mlp_ratio": 1.0, "batch_size": 2, "steps": 2, "eval_every": 2,
         "eval_batches": 1, "log_every": 1}
QUICK_MODELS = ("lstm",)
QUICK_TASKS = ("parity_check",)
QUICK_LEARNING_RATES = (1e-3, 3e-3)
# The paper's networks are the recurrent core and a linear readout. A second arm of each model drops
# the MLP of zoo's residual block (mlp_ratio 0; embedding, RMSNorm and residual stay): with the MLP an
# LSTM fitted parity on lengths 1-40 and failed 41-500 in every seed, without it two probe seeds
# reached 1.0 at every length. Fewer seeds for this arm keep the study near an hour.
NO_MLP = ", no MLP"
NO_MLP_SEEDS = (0, 1)
# A third arm trains the no-MLP cells that 10k steps left unsolved 4x longer (one seed, the same rate;
# fresh examples again, so 4x the training split): modular_arithmetic was still climbing (training
# accuracy 0.24 -> 0.36 for elman and 0.25 -> 0.39 for lstm over the ten 1k-step windows), and an LSTM
# fitted cycle_navigation without generalising.
LONG = ", no MLP, 4x steps"
LONG_FACTOR = 4
LONG_RUNS = (("elman", "modular_arithmetic"), ("lstm", "modular_arithmetic"), ("lstm", "cycle_navigation"))
QUICK_LONG_RUNS = (("lstm", "parity_check"),)
LONG_SEEDS = (0,)
# A fourth arm trains the paper's own network and recipe (its example script, experiments/example.py of
# google-deepmind/neural_networks_chomsky_hierarchy): the bare cell of width 256 under a linear readout
# (``block="plain"``; haiku's LSTM has no peepholes and a forget bias of 1, zoo's "np" variant), Adam at a
# constant 1e-3 with the gradient clipped to norm 1, batch 128, 10k steps. Embedding and padding stay
# zoo's. The cells where every residual-block arm failed: cycle_navigation (zoo's residual LSTM fits
# the training lengths and fails the test lengths; this recipe: 1.000 on 41-500) and modular_arithmetic
# (no arm even fitted the training lengths). ~26 min per run on 2 cores.
PAPER_NET = ", paper's network"
# bucket_sort is the one counter task of the set: sorting a string over five symbols needs only the count
# of each symbol (five counters), not a stack or a tape. It tests the paper's claim that LSTMs solve
# counter-language tasks, with the recipe that solved cycle_navigation (~2x a regular run: the output
# half doubles the sequence).
PAPER_NET_RUNS = (("lstm", "cycle_navigation"), ("lstm", "modular_arithmetic"),
                  ("elman", "modular_arithmetic"), ("lstm", "bucket_sort"))
QUICK_PAPER_NET_RUNS = (("lstm", "parity_check"),)
PAPER_NET_SEEDS = (0,)
PAPER_NET_FULL = {"d_model": 256, "block": "plain", "mlp_ratio": 0.0, "batch_size": 128, "steps": 10000,
                  "optimizer": "adam", "schedule": "constant", "learning_rate": 1e-3, "clip_norm": 1.0,
                  "model_config.variant": "np"}
PAPER_NET_QUICK = {"d_model": 8, "block": "plain", "mlp_ratio": 0.0, "batch_size": 2, "steps": 2,
                   "optimizer": "adam", "schedule": "constant", "learning_rate": 1e-3, "clip_norm": 1.0,
                   "model_config.variant": "np"}

# A fifth arm asks which part of that recipe matters. It starts from the "lstm, no MLP" arm (zoo's
# residual block, width 64, AdamW warmup-cosine, batch 32: fits cycle_navigation's training lengths
# and fails 41-500) and changes one factor at a time to the paper's value. Each row differs from
# "lstm, no MLP" in its one factor only; the paper's network changes all of them at once.
ABLATION_TASK = "cycle_navigation"
ABLATIONS = (                   # (the factor as the row names it, its run-folder name, its overrides)
    ("bare cell", "plain", {"block": "plain"}),
    ("variant np", "np", {"model_config.variant": "np"}),
    ("paper's optimizer", "adam", {"optimizer": "adam", "schedule": "constant", "clip_norm": 1.0}),
    ("batch 128", "b128", {"batch_size": 128}),
    ("width 256", "d256", {"d_model": 256}),
)
QUICK_ABLATIONS = ABLATIONS[:1]
ABLATION_SEEDS = (0,)


def arm_labels(models) -> list[str]:
    """The row labels of the two arms: each model with zoo's residual MLP, then without it."""
    return [*models, *(f"{m}{NO_MLP}" for m in models)]


def long_labels(long_runs) -> list[str]:
    """The row labels of the longer-training arm, each model once, in the order of ``long_runs``."""
    return list(dict.fromkeys(f"{m}{LONG}" for m, _ in long_runs))


def paper_net_labels(paper_runs) -> list[str]:
    """The row labels of the paper's-network arm, each model once, in the order of ``paper_runs``."""
    return list(dict.fromkeys(f"{m}{PAPER_NET}" for m, _ in paper_runs))


def fresh_examples(overrides: dict) -> dict:
    """``overrides`` with a training split of steps x batch examples, so that no example repeats (the
    paper samples fresh examples at every step). An existing split size keeps its place in the dict,
    and so in the run's command line, which keys the cache of finished runs."""
    return {**overrides, "task_config.train_size": overrides["steps"] * overrides["batch_size"]}


def ablation_label(factor: str) -> str:
    """The row label of the ablation that changes ``factor`` in the "lstm, no MLP" arm."""
    return f"lstm{NO_MLP} + {factor}"


def paper_net_overrides(overrides: dict, model: str) -> dict:
    """The paper's recipe for ``model``; the LSTM variant applies only to the LSTM (elman is a VanillaRNN)."""
    if model == "lstm":
        return overrides
    return {k: v for k, v in overrides.items() if k != "model_config.variant"}


def main(argv=None) -> str:
    args, hardware, seeds, shared = R.begin(NAME, argv, __doc__, quick=QUICK, full=FULL,
                                            task_quick=TASK_QUICK, task_full=TASK_FULL, default_seeds=SEEDS)
    if args.quick and args.seeds is None:
        seeds = [0]                             # the smoke run: one seed at each of two rates
    if not args.quick:
        shared = fresh_examples(shared)
    base_models = QUICK_MODELS if args.quick else MODELS
    no_mlp_seeds = seeds if args.quick else [s for s in NO_MLP_SEEDS if s in seeds] or seeds[:1]
    arms = [(m, m, {}, seeds) for m in base_models]
    arms += [(f"{m}{NO_MLP}", m, {"mlp_ratio": 0.0}, no_mlp_seeds) for m in base_models]
    models = arm_labels(base_models)
    tasks = QUICK_TASKS if args.quick else TASKS
    rates = QUICK_LEARNING_RATES if args.quick else LEARNING_RATES
    began = time.perf_counter()
    results: dict[tuple[str, str], list[tuple[float, int, R.RunResult]]] = {}

    def train(label: str, model: str, task: str, overrides: dict, seed: int, run_label: str) -> None:
        rate = overrides["learning_rate"]
        done = R.train_one(model, task, overrides, seed=seed, label=run_label, runs_dir=args.runs,
                           full_eval=True)
        results.setdefault((label, task), []).append((rate, seed, done))
        print(f"{NAME}: {label} on {task} lr {rate:g} seed {seed}: test accuracy "
              f"{done.metric('accuracy'):.4f} ({done.seconds:.0f} s)", flush=True)

    for task in tasks:
        for label, model, extra, arm_seeds in arms:
            for rate in rates:
                for seed in arm_seeds:
                    train(label, model, task, {**shared, **extra, "learning_rate": rate}, seed,
                          run_label=f"{model}{'-nomlp' if extra else ''}-{task}-lr{rate:g}")
    long_runs = QUICK_LONG_RUNS if args.quick else LONG_RUNS
    long_steps = shared["steps"] * LONG_FACTOR
    long_overrides = {**shared, "mlp_ratio": 0.0, "steps": long_steps, "learning_rate": rates[0],
                      "eval_every": shared["eval_every"] * LONG_FACTOR}
    if not args.quick:
        long_overrides = fresh_examples(long_overrides)
    for model, task in long_runs:
        for seed in LONG_SEEDS if not args.quick else seeds:
            train(f"{model}{LONG}", model, task, long_overrides, seed,
                  run_label=f"{model}-nomlp-x{LONG_FACTOR}-{task}")
    paper_runs = QUICK_PAPER_NET_RUNS if args.quick else PAPER_NET_RUNS
    paper_overrides = {**shared, **(PAPER_NET_QUICK if args.quick else PAPER_NET_FULL)}
    if not args.quick:
        paper_overrides = fresh_examples(paper_overrides)
    for model, task in paper_runs:
        for seed in PAPER_NET_SEEDS if not args.quick else seeds:
            train(f"{model}{PAPER_NET}", model, task, paper_net_overrides(paper_overrides, model), seed,
                  run_label=f"{model}-papernet-{task}")
    ablations = QUICK_ABLATIONS if args.quick else ABLATIONS
    ablation_task = tasks[0] if args.quick else ABLATION_TASK
    for factor, slug, change in ablations:
        overrides = {**shared, "mlp_ratio": 0.0, "learning_rate": rates[0], **change}
        if not args.quick:
            overrides = fresh_examples(overrides)
        for seed in ABLATION_SEEDS if not args.quick else seeds:
            train(ablation_label(factor), "lstm", ablation_task, overrides, seed,
                  run_label=f"lstm-nomlp-{slug}-{ablation_task}")
    models = models + long_labels(long_runs) + paper_net_labels(paper_runs)
    models += [ablation_label(factor) for factor, _, _ in ablations]
    tasks = tuple(dict.fromkeys([*tasks, *(t for _, t in paper_runs)]))     # the counter task last
    cells = [(task, model) for task in tasks for model in models if (model, task) in results]
    wall = time.perf_counter() - began

    def tests(model: str, task: str) -> list[float]:
        return [r.metric("accuracy") for _, _, r in results[(model, task)]]

    def best(model: str, task: str) -> tuple[float, int, R.RunResult]:
        return max(results[(model, task)], key=lambda run: run[2].metric("accuracy"))

    def best_cell(model: str, task: str) -> str:
        rate, seed, run = best(model, task)
        return (f"{run.metric('accuracy'):.4g} (lr {rate:g}, seed {seed}; "
                f"train {run.train_tail('accuracy'):.3g})")

    summary = [[task, f"{1 / SPECS[task].n_classes:.3g}", model, best_cell(model, task),
                R.mean_std(tests(model, task)), f"{sum(v >= SOLVED for v in tests(model, task))} of "
                f"{len(tests(model, task))}"]
               for task, model in cells]
    by_rate = [[task, model, f"{rate:g}",
                R.mean_std([r.metric("accuracy") for lr, _, r in results[(model, task)] if lr == rate]),
                R.mean_std([r.train_tail("accuracy") for lr, _, r in results[(model, task)] if lr == rate])]
               for task, model in cells for rate in rates
               if any(lr == rate for lr, _, _ in results[(model, task)])]
    every = [[model, task, f"{rate:g}", seed, f"{run.metric('accuracy'):.4g}",
              f"{run.train_tail('accuracy'):.4g}", f"{run.seconds:.0f}"]
             for (model, task), runs in results.items() for rate, seed, run in runs]
    sections = [
        ("Best and mean test accuracy (lengths 41–500) over seeds and learning rates",
         ["task", "chance", "model", "best run (its lr, seed; its training accuracy)", "mean ± sd over runs",
          f"runs ≥ {SOLVED}"], summary),
        ("Per learning rate: mean over seeds", ["task", "model", "lr", "test accuracy 41–500",
                                                 "train accuracy (last 100 steps, lengths 1–40)"], by_rate),
        ("Every run", ["model", "task", "lr", "seed", "test accuracy 41–500",
                       "train accuracy (last 100 steps)", "wall s"], every),
    ]
    lengths = TASK_QUICK if args.quick else PAPER_LENGTHS
    train_top, test_low, test_top = (lengths[k] for k in ("max_train_length", "min_eval_length",
                                                          "max_eval_length"))
    setting = (
        f"Tasks: {', '.join(tasks)} (`zoo.data.TASKS`), trained on input lengths 1–{train_top} and tested "
        f"on every eval example of lengths {test_low}–{test_top}; "
        f"the training split holds {shared['task_config.train_size']:,} examples, so that no example repeats "
        "(the paper samples fresh examples at every step). "
        f"Models: {', '.join(base_models)}, `SequenceModel` with {shared['n_layers']} layer(s) of width "
        f"{shared['d_model']}, MLP ratio {shared['mlp_ratio']}, and each again as \"<model>{NO_MLP}\" with "
        "MLP ratio 0 (the paper's networks are the recurrent core and a linear readout; embedding, RMSNorm "
        "and residual stay); AdamW warmup-cosine at learning rates "
        f"{', '.join(f'{r:g}' for r in rates)}, batch {shared['batch_size']}, {shared['steps']} steps; "
        f"seeds {', '.join(map(str, seeds))} with the MLP and {', '.join(map(str, no_mlp_seeds))} without "
        "(each seeds the parameters and the data). "
        f"The rows \"<model>{LONG}\" train {', '.join(f'{m} on {t}' for m, t in long_runs)} without the MLP "
        f"for {long_steps} steps (training split {long_overrides.get('task_config.train_size', 'as above')}, "
        f"lr {rates[0]:g}, seed(s) {', '.join(map(str, LONG_SEEDS if not args.quick else seeds))}). "
        f"The rows \"<model>{PAPER_NET}\" train {', '.join(f'{m} on {t}' for m, t in paper_runs)} as the "
        "paper's example script does: the bare cell (`block=plain`; for lstm the variant np, haiku's LSTM; "
        "elman is a tanh RNN like haiku's VanillaRNN) of width "
        f"{paper_overrides['d_model']} under a linear readout, Adam at a constant lr "
        f"{paper_overrides['learning_rate']:g}, gradients clipped to norm {paper_overrides['clip_norm']:g}, "
        f"batch {paper_overrides['batch_size']}, {paper_overrides['steps']} steps (seed(s) "
        f"{', '.join(map(str, PAPER_NET_SEEDS if not args.quick else seeds))})."
    )
    setting += (
        f" The rows \"lstm{NO_MLP} + <factor>\" train lstm on {ablation_task} as the \"lstm{NO_MLP}\" arm "
        "does, with one factor changed to the paper's value: "
        + "; ".join(f"{factor} ({', '.join(f'{k}={v}' for k, v in change.items())})"
                    for factor, _, change in ablations)
        + f" (seeds {', '.join(map(str, ABLATION_SEEDS if not args.quick else seeds))}; the training split "
        "grows with the batch, so that no example repeats)."
    )
    if args.quick:
        setting += "\n\n**--quick smoke setting: a few steps at tiny lengths; the numbers mean nothing.**"
    paper = (
        'Delétang et al. [S] (PAPERS.md): "LSTMs can solve regular and counter-language tasks"; its '
        f"conclusions rest on {PAPER_MODELS} trained models, and a (model, task) counts as solved by its "
        "best hyperparameters and seed. PAPERS.md quotes no per-task accuracies."
    )
    solved = [f"{m} on {t} ({best(m, t)[2].metric('accuracy'):.3f})" for t, m in cells
              if best(m, t)[2].metric("accuracy") >= SOLVED]
    unsolved = [f"{m} on {t} (best {best(m, t)[2].metric('accuracy'):.3f}, train "
                f"{best(m, t)[2].train_tail('accuracy'):.3f})" for t, m in cells
                if best(m, t)[2].metric("accuracy") < SOLVED]
    counts = sorted({len(v) for v in results.values()})
    n_runs = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    notes = (f"Computed from the runs ({n_runs} per cell). Best run generalised (test ≥ {SOLVED}): "
             f"{', '.join(solved) or 'none'}. Not solved by any run: {', '.join(unsolved) or 'none'}.")
    return R.publish(NAME, argv, args.out, title="Chomsky hierarchy, regular tasks and a counter task: RNN "
                     "and LSTM over seeds and learning rates", seeds=seeds, wall=wall, hardware_line=hardware,
                     sections=sections, setting=setting, paper=paper, notes=notes,
                     runs=[run for runs in results.values() for _, _, run in runs])


if __name__ == "__main__":
    main(sys.argv[1:])
