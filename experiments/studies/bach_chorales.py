"""Study 5: negative log-likelihood per frame on the Bach chorales (JSB-style piano rolls) for the tanh
RNN (elman), GRU, LSTM and the eight LSTM variants of "LSTM: A Search Space Odyssey".

    .venv/bin/python -m experiments.studies.bach_chorales --seeds 0,1,2   # the table (about 25 min)
    .venv/bin/python -m experiments.studies.bach_chorales --quick    # a smoke run of a few steps

Each model is the papers' network as a ``SequenceModel`` with ``block="plain"``: a linear input layer
over the 88 piano keys, one recurrent cell of width ``D_MODEL`` (no residual block, no norm, no MLP) and
88 logits read from its output. The first setting of this study wrapped the cell in zoo's residual block
(``x + cell(RMSNorm(x))``); the papers' cells are bare. Trained with
``zoo.data.bach_chorales.frame_loss`` (independent Bernoullis per key) on packed rows of the training
chorales. The loop evaluates on the validation split every ``EVAL_EVERY`` steps and keeps the model of
the lowest validation NLL (``keep_best``: early stopping, as both papers select their models); the
reported number is the NLL per frame of that model over every frame of the test split, evaluated once.
Writes ``experiments/results/bach_chorales.md``.
"""

from __future__ import annotations

import statistics
import sys

from experiments.studies import _runner as R

NAME = "bach_chorales"
TASK = "bach_chorales"
D_MODEL = 48
# 500 steps without early stopping (this study's first setting, with residual blocks) left GRU past its
# best validation NLL (8.99 at step 300, 9.05 at 500) and the tanh RNN still improving: the comparison
# depended on when training stopped. The bare cells learn more slowly than the residual blocks (best
# validation NLL of a vanilla LSTM: 9.61 in 1000 steps, 9.08 at step 2000 of 3000; tanh RNN 9.23 at step
# 1250 of 3000, lr 1e-2), so they get 3000 steps, and the model of the best validation NLL is kept.
STEPS = 3000
EVAL_EVERY = 100

# (label, registry name, model_config overrides, what the variant changes)
MODELS = [
    ("elman (tanh RNN)", "elman", {"activation": "tanh"}, "h = tanh(W x + U h + b)"),
    ("gru", "gru", {}, "Cho et al. gated recurrent unit"),
    ("lstm V (vanilla)", "lstm", {"variant": "vanilla"}, "forget gate and peepholes (Greff's V)"),
    ("lstm NIG", "lstm", {"variant": "nig"}, "no input gate"),
    ("lstm NFG", "lstm", {"variant": "nfg"}, "no forget gate"),
    ("lstm NOG", "lstm", {"variant": "nog"}, "no output gate"),
    ("lstm NIAF", "lstm", {"variant": "niaf"}, "no input activation"),
    ("lstm NOAF", "lstm", {"variant": "noaf"}, "no output activation"),
    ("lstm NP", "lstm", {"variant": "np"}, "no peepholes"),
    ("lstm CIFG", "lstm", {"variant": "cifg"}, "coupled input and forget gate"),
    ("lstm FGR", "lstm", {"variant": "fgr"}, "full gate recurrence"),
]

# --quick trains these rows only (a smoke test of the code path, not of every variant).
QUICK_MODELS = ("elman (tanh RNN)", "lstm V (vanilla)", "lstm NOAF")

# What /work/shared/PAPERS.md says about each row ([S]: the abstract's words; [K]: PAPERS.md's note from
# knowledge of the paper). PAPERS.md quotes no JSB NLL figure, so none is set beside ours.
CHUNG = "Chung et al. 2014"
GREFF = "Greff et al. 2017"
PAPER = {
    "elman": f'{CHUNG} [S]: gated units "better than more traditional recurrent units such as tanh units"',
    "gru": f'{CHUNG} [S]: "GRU to be comparable to LSTM"',
    "vanilla": f'{GREFF} [S]: "none of the variants can improve upon the standard LSTM architecture '
               'significantly"',
    "nfg": f'{GREFF} [S]: the forget gate is one of the "most critical components"; [K] NFG hurts most',
    "noaf": f'{GREFF} [S]: the output activation is one of the "most critical components"; [K] NOAF hurts '
            "most",
    "cifg": f"{GREFF} [K]: a safe simplification",
    "np": f"{GREFF} [K]: a safe simplification",
}
PAPER_DEFAULT = f"{GREFF} [S]: no variant improves on V significantly"

FULL = {
    "d_model": D_MODEL, "n_layers": 1, "mlp_ratio": 0.0, "block": "plain", "batch_size": 8, "steps": STEPS,
    "learning_rate": 1e-2, "eval_every": EVAL_EVERY, "eval_batches": 4, "log_every": 20,
    "task_config.pack": True,       # several chorales per 272-frame row, separated by reset flags
    "keep_best": "eval_nll_per_frame",
}
QUICK = {
    "d_model": 4, "n_layers": 1, "mlp_ratio": 0.0, "block": "plain", "batch_size": 2, "steps": 2,
    "eval_every": 1, "eval_batches": 1, "log_every": 1,
    "task_config.max_chorales": 2, "task_config.pack": True, "keep_best": "eval_nll_per_frame",
}
SEEDS = (0,)


PAPERS_TEXT = (
    f'{GREFF} ("LSTM: A Search Space Odyssey") [S]: "none of the variants can improve upon the '
    'standard LSTM architecture significantly"; "the forget gate and the output activation function" '
    'are "its most critical components". [K] NFG and NOAF hurt most; CIFG and NP are safe '
    f'simplifications.\n\n{CHUNG} ("Empirical Evaluation of Gated Recurrent Neural Networks on Sequence '
    'Modeling") [S]: gated units "better than more traditional recurrent units such as tanh units"; '
    '"GRU to be comparable to LSTM" on polyphonic music.\n\nPAPERS.md quotes no JSB NLL per frame '
    "from either paper, so the table sets their findings, not figures, beside ours. Our setting "
    "differs from theirs (music21's chorale files rather than the JSB pickle, small models, a fixed step "
    "budget, and at most a small grid of learning rates and widths where Greff et al. ran a random search "
    "of 200 trials per variant and dataset), so absolute numbers are not comparable."
)


def setting_text(shared: dict, *, width: str | None = None, learning_rate: str | None = None) -> str:
    """The table's setting: the task, the network, the training and the early stopping of ``shared``;
    ``width`` and ``learning_rate`` name them where they vary between runs."""
    width = width or str(shared["d_model"])
    learning_rate = learning_rate or f"lr {shared.get('learning_rate', 1e-2)}"
    return (
        f"Task `bach_chorales` (music21's Bach chorales as 88-key binary piano rolls, one frame per quarter "
        f"note, fixed train/valid/test split of the chorale files; the loop evaluates on valid, the table's "
        f"test column is every frame of the test split). Model: `SequenceModel` with "
        f"`block={shared['block']}`, one cell of width {width} between a linear input layer "
        f"over the 88 keys and 88 sigmoid "
        f"outputs; loss `zoo.data.bach_chorales.frame_loss` (sum over keys of the Bernoulli NLL, mean over "
        f"frames, nats). AdamW, {learning_rate} warmup-cosine, batch "
        f"{shared['batch_size']} packed rows of 272 frames, {shared['steps']} steps. Early stopping: "
        f"the validation NLL is evaluated every {shared['eval_every']} steps on {shared['eval_batches']} "
        f"batches, and the model of its lowest value (`--config.keep_best={shared['keep_best']}`) is the "
        f"one tested."
    )


def run_folder(label: str) -> str:
    """A row's run-folder name: its label without the parenthesis, dashed ("lstm V (vanilla)" -> "lstm-V")."""
    return label.split(" (")[0].replace(" ", "-")


def paper_claim(model: str, config: dict) -> str:
    return PAPER.get(config.get("variant", model), PAPER_DEFAULT)


def findings(by_label: dict[str, float]) -> list[str]:
    """The papers' findings, each checked against our test NLLs (computed, not asserted); a finding whose
    rows were not run (``--quick``) is left out."""
    tanh, gru, lstm = (by_label.get(k) for k in ("elman (tanh RNN)", "gru", "lstm V (vanilla)"))
    variants = {k: v for k, v in by_label.items() if k.startswith("lstm ") and k != "lstm V (vanilla)"}
    lines = []
    if None not in (tanh, gru, lstm):
        verdict = "yes" if max(gru, lstm) < tanh else "no" if min(gru, lstm) > tanh else "partly"
        lines += [
            f"- Gated units beat the tanh RNN: GRU {gru:.3f} and LSTM {lstm:.3f} against tanh RNN {tanh:.3f} "
            f"-> {verdict}.",
            f"- GRU comparable to LSTM: GRU - LSTM = {gru - lstm:+.3f} nats per frame.",
        ]
    if len(variants) >= 2:
        worst = sorted(variants, key=variants.get, reverse=True)[:2]
        lines.append(f"- The two variants that hurt most here: "
                     f"{', '.join(f'{w} ({variants[w]:.3f})' for w in worst)} (Greff et al.: NFG and NOAF).")
    if variants and lstm is not None:
        better = ", ".join(f"{k} ({v:.3f})" for k, v in variants.items() if v < lstm)
        lines.append(f"- Variants better than V: {better or 'none'}.")
    return lines


def main(argv=None) -> str:
    args, hardware, seeds, shared = R.begin(NAME, argv, __doc__, quick=QUICK, full=FULL,
                                            default_seeds=SEEDS)
    models = [row for row in MODELS if not args.quick or row[0] in QUICK_MODELS]
    results, wall = R.train_models(NAME, models, TASK, shared, seeds, args.runs, metric="nll_per_frame",
                                   metric_label="test NLL/frame", full_eval={"eval_split": "test"},
                                   run_label=run_folder)

    test = {label: statistics.mean(r.metric("nll_per_frame") for r in runs)
            for label, runs in results.items()}
    rows = []
    for label, model, config, what in models:
        runs = results[label]
        rows.append([
            label, what, f"{runs[0].params:,}", runs[0].steps,
            R.mean_std([r.best["eval_nll_per_frame"] for r in runs]),
            ", ".join(str(r.best["step"]) for r in runs),
            R.mean_std([r.metric("nll_per_frame") for r in runs]),
            f"{test[label] - test['lstm V (vanilla)']:+.3f}" if "lstm V (vanilla)" in test else "—",
            R.seconds_cell(runs),
            paper_claim(model, config),
        ])
    columns = ["model", "change", "params", "steps", "valid NLL/frame (kept model, 4 batches)",
               "kept step of each seed",
               "test NLL/frame (whole split)", "test Δ vs LSTM V", "wall s", "paper (PAPERS.md)"]
    setting = setting_text(shared)
    if args.quick:
        setting += ("\n\n**--quick smoke setting: three of the rows, a few steps on two chorales; the "
                    "numbers mean nothing.**")
    notes = "\n".join([
        "Findings, computed from the test column:",
        *findings(test),
        "",
        "The `lstm` rows are `zoo.get(\"lstm\", variant=...)` (zoo/models/lstm.py); `elman` is the tanh RNN. "
        "Each row is the bare cell between a linear input layer and the linear readout, as in the papers "
        "(`block=\"plain\"`: no residual connection, no norm).",
    ])
    return R.publish(NAME, argv, args.out,
                     title="Bach chorales: NLL per frame of tanh RNN, GRU, LSTM and its variants",
                     seeds=seeds, wall=wall, hardware_line=hardware,
                     sections=[("Results", columns, rows)], setting=setting, paper=PAPERS_TEXT, notes=notes,
                     runs=[r for runs in results.values() for r in runs])


if __name__ == "__main__":
    main(sys.argv[1:])
