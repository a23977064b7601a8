"""Study 5b: the Bach chorales comparison of ``bach_chorales`` with each model at its best learning rate
and width, chosen on the validation split, as "LSTM: A Search Space Odyssey" compares its variants.

    .venv/bin/python -m experiments.studies.bach_chorales_search          # the grid (~1 h on 2 cores)
    .venv/bin/python -m experiments.studies.bach_chorales_search --quick  # a smoke run of a few steps

``bach_chorales`` trains every model at one setting (width 48, lr 1e-2) and finds NFG and NOAF no
worse than the vanilla LSTM, against Greff et al.'s finding that the forget gate and the output
activation are the LSTM's most critical components. Greff et al. compare each variant at the
hyperparameters of a random search of its own (learning rate, hidden size, momentum, input noise), so
a variant that needs another learning rate or width is not judged at the vanilla LSTM's. This study
trains the models that the papers' findings name (the tanh RNN, GRU, the vanilla LSTM, NFG and NOAF,
and the two "safe simplifications" NP and CIFG as controls) at every ``LEARNING_RATES`` x ``WIDTHS``,
keeps for each model the setting of the lowest validation NLL, and reports that setting's NLL per frame
on the test split, which the choice never saw. Training, early stopping and the network are
``bach_chorales``'s (``FULL``). Writes ``experiments/results/bach_chorales_search.md``.
"""

from __future__ import annotations

import sys
import time

from experiments.studies import _runner as R
from experiments.studies.bach_chorales import (
    FULL,
    MODELS,
    PAPERS_TEXT,
    QUICK,
    TASK,
    findings,
    paper_claim,
    run_folder,
    setting_text,
)

NAME = "bach_chorales_search"
SEARCH_MODELS = ("elman (tanh RNN)", "gru", "lstm V (vanilla)", "lstm NFG", "lstm NOAF", "lstm NP",
                 "lstm CIFG")
LEARNING_RATES = (3e-3, 1e-2, 3e-2)     # Adam's usual range, around bach_chorales' 1e-2
WIDTHS = (48, 128)                      # bach_chorales' width and a wider cell (Greff et al.: up to 200)
QUICK_MODELS = ("lstm V (vanilla)", "lstm NOAF")
QUICK_LEARNING_RATES = (1e-2, 3e-2)
QUICK_WIDTHS = (4,)
SEEDS = (0,)
VALID = "eval_nll_per_frame"            # the kept model's validation NLL, the choice's criterion


def setting_name(learning_rate: float, width: int) -> str:
    return f"lr {learning_rate:g}, width {width}"


def run_label(label: str, learning_rate: float, width: int) -> str:
    """The run's folder name: the model's, as in bach_chorales, and its setting."""
    return f"{run_folder(label)}-lr{learning_rate:g}-d{width}"


def main(argv=None) -> str:
    args, hardware, seeds, shared = R.begin(NAME, argv, __doc__, quick=QUICK, full=FULL, default_seeds=SEEDS)
    names = QUICK_MODELS if args.quick else SEARCH_MODELS
    models = [row for row in MODELS if row[0] in names]
    grid = [(lr, width) for width in (QUICK_WIDTHS if args.quick else WIDTHS)
            for lr in (QUICK_LEARNING_RATES if args.quick else LEARNING_RATES)]
    began = time.perf_counter()
    runs: dict[tuple[str, float, int], list[R.RunResult]] = {}
    # Settings outermost: a search stopped part-way has every model at the settings it finished.
    for learning_rate, width in grid:
        for label, model, config, _ in models:
            overrides = {**shared, "learning_rate": learning_rate, "d_model": width,
                         **{f"model_config.{k}": v for k, v in config.items()}}
            for seed in seeds:
                done = R.train_one(model, TASK, overrides, seed=seed, runs_dir=args.runs,
                                   label=run_label(label, learning_rate, width),
                                   full_eval={"eval_split": "test"})
                runs.setdefault((label, learning_rate, width), []).append(done)
                print(f"{NAME}: {label}, {setting_name(learning_rate, width)}, seed {seed}: valid "
                      f"{done.best[VALID]:.4f}, test {done.metric('nll_per_frame'):.4f} "
                      f"({done.seconds:.0f} s)", flush=True)
    wall = time.perf_counter() - began

    def mean_of(label, lr, width, pick) -> float:
        found = runs[(label, lr, width)]
        return sum(pick(r) for r in found) / len(found)

    def valid(label, lr, width) -> float:
        return mean_of(label, lr, width, lambda r: r.best[VALID])

    def test(label, lr, width) -> float:
        return mean_of(label, lr, width, lambda r: r.metric("nll_per_frame"))

    chosen = {label: min(grid, key=lambda setting, label=label: valid(label, *setting))
              for label, *_ in models}
    chosen_test = {label: test(label, *chosen[label]) for label in chosen}
    vanilla = chosen_test.get("lstm V (vanilla)")
    selected = []
    for label, model, config, what in models:
        lr, width = chosen[label]
        found = runs[(label, lr, width)]
        selected.append([label, what, setting_name(lr, width), f"{found[0].params:,}",
                         R.mean_std([r.best[VALID] for r in found]),
                         R.mean_std([r.metric("nll_per_frame") for r in found]),
                         "—" if vanilla is None else f"{chosen_test[label] - vanilla:+.3f}",
                         paper_claim(model, config)])
    every = [[label, *(f"{test(label, *setting):.3f} ({valid(label, *setting):.3f})" for setting in grid)]
             for label, *_ in models]
    sections = [
        ("Each model at its setting of the lowest validation NLL",
         ["model", "change", "chosen setting", "params", "valid NLL/frame (kept model, 4 batches)",
          "test NLL/frame (whole split)", "test Δ vs LSTM V", "paper (PAPERS.md)"], selected),
        ("Test NLL/frame (validation NLL/frame) at every setting",
         ["model", *(setting_name(*setting) for setting in grid)], every),
    ]
    rates = ", ".join(f"{lr:g}" for lr in dict.fromkeys(lr for lr, _ in grid))
    widths = ", ".join(str(w) for w in dict.fromkeys(w for _, w in grid))
    setting = (setting_text(shared, width=f"{widths} (the grid's)", learning_rate="lr (the grid's)")
               + f" The grid: learning rates {rates} x widths {widths}, {len(grid)} settings per model; each "
               "model's chosen setting is the one of the lowest validation NLL (mean over seeds), and its "
               "test NLL is the reported one.")
    if args.quick:
        setting += ("\n\n**--quick smoke setting: two models, a few steps on two chorales; the numbers mean "
                    "nothing.**")
    notes = "\n".join(["Findings, computed from the chosen settings' test NLLs:", *findings(chosen_test)])
    return R.publish(NAME, argv, args.out, title="Bach chorales: each model at its best learning rate and "
                     "width",
                     seeds=seeds, wall=wall, hardware_line=hardware, sections=sections, setting=setting,
                     paper=PAPERS_TEXT, notes=notes, runs=[r for found in runs.values() for r in found])


if __name__ == "__main__":
    main(sys.argv[1:])
