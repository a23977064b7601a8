"""Study 2: selective copying. The time-invariant S4 fails and the selective models (mamba, mingru,
minlstm) solve it: the claim of the Mamba paper (§4.1.1) and of "Were RNNs All We Needed?".

    .venv/bin/python -m experiments.studies.selective_copy            # the full setting (about 15 min)
    .venv/bin/python -m experiments.studies.selective_copy --quick    # a smoke run of a few steps

Each model is a two-layer ``SequenceModel`` (as the Mamba paper's two-layer models) of the same width,
trained on ``selective_copy`` (``zoo.data.selective_copy``: ``n_tokens`` tokens scattered at random among
noise, to be reproduced in order after a marker). The reported number is the accuracy on the answer
positions of every held-out example (``full_split_metrics``), after the last step.
Writes ``experiments/results/selective_copy.md``.
"""

from __future__ import annotations

import statistics
import sys

from experiments.studies import _runner as R

NAME = "selective_copy"
TASK = "selective_copy"

# (label, registry name, model_config overrides, kind)
MODELS = [
    ("s4", "s4", {"d_state": 16}, "time-invariant (LTI convolution kernel)"),
    ("mamba", "mamba", {"d_state": 16}, "selective SSM (S6): Δ, B, C from the input"),
    ("mingru", "mingru", {}, "input-dependent gate, diagonal linear recurrence"),
    ("minlstm", "minlstm", {}, "input-dependent gates, diagonal linear recurrence"),
]

QUICK_MODELS = ("s4", "mingru")      # --quick trains these only

TASK_FULL = {"n_symbols": 8, "n_tokens": 8, "n_noise": 32, "train_size": 16384, "eval_size": 512}
FULL = {
    "d_model": 64, "n_layers": 2, "mlp_ratio": 2.0, "batch_size": 32, "steps": 1000,
    "learning_rate": 5e-3, "eval_every": 250, "eval_batches": 4, "log_every": 25,
}
TASK_QUICK = {"n_symbols": 4, "n_tokens": 2, "n_noise": 3, "train_size": 8, "eval_size": 4}
QUICK = {
    "d_model": 8, "n_layers": 1, "mlp_ratio": 1.0, "batch_size": 2, "steps": 2,
    "eval_every": 2, "eval_batches": 1, "log_every": 1,
}
SEEDS = (0,)

PAPERS_MD = (
    'PAPERS.md (Mamba, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"): selective '
    'copying is "[K] Mamba paper\'s motivating task"; the abstract [S] says "letting the SSM parameters be '
    'functions of the input" addresses the weakness of time-invariant models at content-based reasoning. '
    'PAPERS.md (minGRU/minLSTM, "Were RNNs All We Needed?") [S]: they "match recent sequence models". '
    "PAPERS.md quotes no selective-copying accuracy (the Mamba paper's Table 1 figures are not in it), so "
    "the paper column gives the claim, not a number."
)
PAPER = {
    "s4": "fails (Mamba paper: LTI S4 cannot select by content)",
    "mamba": "solves (Mamba paper)",
    "mingru": "solves (Were RNNs All We Needed?)",
    "minlstm": "solves (Were RNNs All We Needed?)",
}


def main(argv=None) -> str:
    args, hardware, seeds, shared = R.begin(NAME, argv, __doc__, quick=QUICK, full=FULL,
                                            task_quick=TASK_QUICK, task_full=TASK_FULL, default_seeds=SEEDS)
    task_fields = TASK_QUICK if args.quick else TASK_FULL
    models = [row for row in MODELS if not args.quick or row[0] in QUICK_MODELS]
    results, wall = R.train_models(NAME, models, TASK, shared, seeds, args.runs, metric="accuracy",
                                   metric_label="held-out accuracy", full_eval=True)

    chance = 1 / task_fields["n_symbols"]
    rows = []
    for label, _, _, kind in models:
        runs = results[label]
        rows.append([
            label, kind, f"{runs[0].params:,}", runs[0].steps,
            R.mean_std([r.metric("accuracy") for r in runs]),
            R.mean_std([r.metric("loss") for r in runs]),
            R.seconds_cell(runs), PAPER[label],
        ])
    columns = ["model", "kind", "params", "steps", "held-out accuracy (answer tokens, whole split)",
               "held-out loss (nats)", "wall s", "paper's claim"]
    length = 2 * task_fields["n_tokens"] + task_fields["n_noise"] + 1
    setting = (
        f"Task `selective_copy`: {task_fields['n_tokens']} tokens from {task_fields['n_symbols']} symbols at "
        f"random positions among {task_fields['n_noise']} noise tokens, then a marker and "
        f"{task_fields['n_tokens']} answer positions (sequences of {length}); {task_fields['train_size']} "
        f"training and {task_fields['eval_size']} held-out examples; chance accuracy {chance:.3f}. The Mamba "
        "paper's setting is 16 tokens from 16 symbols in sequences of 4096; ours is scaled down to fit 2 CPU "
        f"cores. Models: `SequenceModel`, {shared['n_layers']} layers of width {shared['d_model']}, MLP "
        f"ratio {shared['mlp_ratio']}; AdamW, lr {shared.get('learning_rate', 1e-2)} warmup-cosine, batch "
        f"{shared['batch_size']}, {shared['steps']} steps. Accuracy is per answer token over every held-out "
        "example after the last step."
    )
    if args.quick:
        setting += ("\n\n**--quick smoke setting: two of the models, a few steps of tiny models; the numbers "
                    "mean nothing.**")
    selective = {k: statistics.mean(r.metric("accuracy") for r in results[k])
                 for k in ("mamba", "mingru", "minlstm") if k in results}
    s4 = statistics.mean(r.metric("accuracy") for r in results["s4"])
    best = max(selective, key=selective.get)
    notes = (
        f"Computed from the table: S4 {s4:.3f} against the best selective model, {best}, "
        f"{selective[best]:.3f} (chance {chance:.3f}). Not tuned: one learning rate and step budget for "
        "every model."
    )
    return R.publish(NAME, argv, args.out, title="Selective copying: S4 against selective models",
                     seeds=seeds, wall=wall, hardware_line=hardware,
                     sections=[("Results", columns, rows)], setting=setting, paper=PAPERS_MD, notes=notes,
                     runs=[r for runs in results.values() for r in runs])


if __name__ == "__main__":
    main(sys.argv[1:])
