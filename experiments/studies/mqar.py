"""Study 3: multi-query associative recall (MQAR) accuracy against state size, for the linear-attention,
SSM and delta-rule families: the state-size curve of Zoology and "Just read twice".

    .venv/bin/python -m experiments.studies.mqar            # the full setting
    .venv/bin/python -m experiments.studies.mqar --quick    # a smoke run of a few steps

Each model is trained at several widths; its recurrent state per sequence is the registry's formula,
``zoo.list_models()[name].state_size(d_model=..., **model_config)``, times the number of layers. Where a
model's state does not grow with ``d_model`` by itself (fixed head size or state width), ``WIDTH_CONFIG``
scales the head count or the state width with it. The reported number is the accuracy on the query
positions of every held-out example (``full_split_metrics``) after the last step.
Writes ``experiments/results/mqar.md``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import zoo
from experiments.studies import _runner as R

NAME = "mqar"
TASK = "mqar"

FAMILIES = {
    "linear attention": ("linear_transformer", "retnet", "gla"),
    "SSM": ("s4", "lru", "mamba", "mamba2"),
    "delta rule": ("deltanet", "gated_deltanet"),
}
# --quick trains one model per family at one width
QUICK_FAMILIES = {"linear attention": ("linear_transformer",), "SSM": ("lru",), "delta rule": ("deltanet",)}
# Models trained again with fields that differ from their defaults, as (row label, model, fields, what
# changed). The range of the per-head decay rate A at init: in probes at d_model 32, seed 0,
# gated_deltanet stayed at chance (held-out loss ln 32) with FLA's A in (0, 16] and learned recall with
# A in (0, 1] (0.73) or with A = 0.01 in every head (0.998); mamba2 reached 0.11 with mamba_ssm's
# [1, 16) and 0.37 with [0.01, 1). GLA and RetNet with FLA's short convolution (off by default in FLA
# and here), which deltanet and gated_deltanet have by default. The notes compare each variant with its model.
VARIANTS = {
    "linear attention": (("gla, short conv", "gla", {"use_short_conv": True}, "the short convolution"),
                         ("retnet, short conv", "retnet", {"use_short_conv": True}, "the short convolution")),
    "SSM": (("mamba2, A in [0.01, 1)", "mamba2", {"a_init_range": (0.01, 1.0)}, "the decay init"),),
    "delta rule": (("gated_deltanet, A in (0, 1]", "gated_deltanet", {"a_init_range": (0.0, 1.0)},
                    "the decay init"),),
}
WIDTHS = (16, 32, 64)
QUICK_WIDTHS = (8,)


def width_config(model: str, d_model: int) -> dict:
    """Model config fields that make the state grow with ``d_model`` (heads of a fixed size, LRU's width)."""
    if model in ("linear_transformer", "retnet"):
        return {"n_heads": max(1, d_model // 8)}        # d_head stays 8
    if model == "gated_deltanet":
        # deltanet's heads: 2, of key width d_model / 2. With heads of key width 8, both delta-rule
        # models stayed near chance at d_model 32 (seed 0, with the output gate: deltanet 0.12,
        # gated_deltanet 0.06).
        return {"n_heads": 2, "d_head": max(1, d_model // 2)}
    if model == "lru":
        return {"d_state": d_model}
    if model == "mamba":
        return {"d_state": 16}
    return {}


# Sized for 2 CPU cores: at 64 keys and values and 16 pairs, 1500 steps at lr 3e-3 left linear attention
# and RetNet near chance at every width (held-out accuracy 0.03-0.06, loss still falling), so the curve
# said nothing. At 8 pairs of 32 keys and values and lr 1e-2 (notebooks/04 uses 4 pairs of 8 at that lr)
# the delta rule learns recall within the budget and most others reach the 1/n_pairs plateau.
TASK_FULL = {"n_keys": 32, "n_values": 32, "n_pairs": 8, "query_length": 16, "train_size": 16384,
             "eval_size": 512}
FULL = {"n_layers": 2, "mlp_ratio": 2.0, "batch_size": 32, "steps": 1500, "learning_rate": 1e-2,
        "eval_every": 500, "eval_batches": 4, "log_every": 50}
TASK_QUICK = {"n_keys": 4, "n_values": 4, "n_pairs": 2, "query_length": 4, "train_size": 8, "eval_size": 4}
QUICK = {"n_layers": 1, "mlp_ratio": 1.0, "batch_size": 2, "steps": 2, "eval_every": 2, "eval_batches": 1,
         "log_every": 1}
SEEDS = (0,)

PAPERS_MD = (
    "PAPERS.md: MQAR is the recall probe of Zoology (\"origin of MQAR\", not in the paper list) and of "
    "\"Just read twice\"; \"the recall gap of fixed-state models is the papers' recurring theme\"; "
    "\"RNNs are not Transformers (Yet)\" [S]: RNNs provably cannot solve associative recall without "
    "retrieval help. The expected curve: recall accuracy rises with the state size, and at a given state "
    "size the models with a matrix (outer-product or delta-rule) state recall more than diagonal SSMs. "
    "PAPERS.md quotes no MQAR accuracies, so no figure is set beside ours."
)


def main(argv=None) -> str:
    args, hardware, seeds, shared = R.begin(NAME, argv, __doc__, quick=QUICK, full=FULL,
                                            task_quick=TASK_QUICK, task_full=TASK_FULL, default_seeds=SEEDS)
    task_fields = TASK_QUICK if args.quick else TASK_FULL
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    models = zoo.list_models()
    began = time.perf_counter()
    rows = []
    runs: list[tuple[str, R.RunResult]] = []       # (row label, run)
    families = QUICK_FAMILIES if args.quick else FAMILIES
    for family, names in families.items():
        variants = () if args.quick else VARIANTS.get(family, ())
        entries = [(model, model, {}) for model in names] + [v[:3] for v in variants]
        for label, model, fields in entries:
            for width in widths:
                config = {**width_config(model, width), **fields}
                state = models[model].state_size(d_model=width, **config) * shared["n_layers"]
                overrides = {**shared, "d_model": width,
                             **{f"model_config.{k}": v for k, v in config.items()}}
                run_label = f"{model}{run_suffix(fields)}-d{width}"
                done = [R.train_one(model, TASK, overrides, seed=seed, label=run_label,
                                    runs_dir=args.runs, full_eval=True) for seed in seeds]
                runs += [(label, r) for r in done]
                print(f"{NAME}: {label} d_model {width} (state {state}): accuracy "
                      f"{R.mean_std([r.metric('accuracy') for r in done])}", flush=True)
                rows.append([family, label, width, ", ".join(f"{k}={v}" for k, v in config.items()) or "—",
                             state, f"{done[0].params:,}", R.mean_std([r.metric("accuracy") for r in done]),
                             R.seconds_cell(done)])
    wall = time.perf_counter() - began
    variant_models = [(label, model, what) for family in families if not args.quick
                      for label, model, _, what in VARIANTS.get(family, ())]
    rows.sort(key=lambda row: (list(FAMILIES).index(row[0]), row[4]))
    columns = ["family", "model", "d_model", "model config", "state floats per sequence (all layers)",
               "params", "MQAR accuracy (queries, whole held-out split)", "wall s"]
    length = 2 * task_fields["n_pairs"] + task_fields["query_length"]
    setting = (
        f"Task `mqar`: {task_fields['n_pairs']} key-value pairs from {task_fields['n_keys']} keys and "
        f"{task_fields['n_values']} values, then every key queried once in a region of "
        f"{task_fields['query_length']} positions (sequences of {length}); {task_fields['train_size']} "
        f"training and {task_fields['eval_size']} held-out examples; chance "
        f"{1 / task_fields['n_values']:.3f}. "
        f"Models: `SequenceModel`, {shared['n_layers']} layers, widths {', '.join(map(str, widths))}, "
        f"MLP ratio {shared['mlp_ratio']}; AdamW, lr {shared.get('learning_rate', 1e-2)} warmup-cosine, "
        f"batch {shared['batch_size']}, {shared['steps']} steps. State size: "
        "`zoo.list_models()[name].state_size` per layer, times the layers."
    )
    if not args.quick:
        setting += (" The rows " + ", ".join(f"\"{label}\"" for v in VARIANTS.values() for label, *_ in v)
                    + " train that model again with one field changed, shown in the model config column: "
                    "the range that A, the decay rate of each head, is drawn from at init (the defaults "
                    "are FLA's (0, 16] for gated_deltanet and mamba_ssm's [1, 16) for mamba2), or the "
                    "short convolution of GLA and RetNet (FLA's `use_short_conv`, 4 taps, then SiLU, on q, "
                    "k and v).")
    if args.quick:
        setting += ("\n\n**--quick smoke setting: one model per family, a few steps of tiny models; the "
                    "numbers mean nothing.**")
    return R.publish(NAME, argv, args.out, title="MQAR: recall accuracy against state size",
                     seeds=seeds, wall=wall, hardware_line=hardware,
                     sections=[("Accuracy against state size", columns, rows)], setting=setting,
                     paper=PAPERS_MD, notes=notes(runs, task_fields["n_pairs"], len(seeds), variant_models),
                     runs=[r for _, r in runs])


def run_suffix(fields: dict) -> str:
    """The part of a variant's run folder name that its fields add: ``-a_init_range0.0_1.0``."""
    spelled = {k: "_".join(map(str, v if isinstance(v, tuple) else (v,))) for k, v in fields.items()}
    return "".join(f"-{k}{v}" for k, v in spelled.items())


def notes(labelled_runs, n_pairs: int, n_seeds: int, variant_models=()) -> str:
    """What the table shows, computed from the (row label, run) pairs: each row label's best accuracy
    and where, the runs near 1/n_pairs (the accuracy of a guess among the values the sequence holds),
    and for each (variant label, model, what changed) of ``variant_models`` the mean accuracy of both
    per width."""
    best: dict[str, R.RunResult] = {}
    for label, run in labelled_runs:
        if label not in best or run.metric("accuracy") > best[label].metric("accuracy"):
            best[label] = run
    plateau = 1 / n_pairs
    stuck_labelled = [(label, r) for label, r in labelled_runs if abs(r.metric("accuracy") - plateau) < 0.03]
    stuck_runs = [r for _, r in stuck_labelled]
    stuck = sorted({f"{label} d{r.overrides['d_model']}" for label, r in stuck_labelled})
    mean_loss = statistics.mean(r.metric("loss") for r in stuck_runs) if stuck_runs else math.nan
    stuck_loss = (f"; their held-out loss averages {mean_loss:.3f} nats, against ln {n_pairs} = "
                  f"{math.log(n_pairs):.3f} for a uniform guess among those values" if stuck_runs else "")
    lines = ["Best held-out accuracy of each model (over its widths and seeds): " + ", ".join(
        f"{m} {r.metric('accuracy'):.3f} (d_model {r.overrides['d_model']})"
        for m, r in sorted(best.items(), key=lambda kv: -kv[1].metric("accuracy"))) + ".",
        "",
        f"Runs within 0.03 of 1/n_pairs = {plateau:.3f}, the accuracy of a guess among the values the "
        f"sequence holds without recall of the key each was paired with: {', '.join(stuck) or 'none'}"
        f"{stuck_loss}."]
    for variant, model, what in variant_models:
        def mean_at(label: str, width: int) -> float | None:
            values = [r.metric("accuracy") for lab, r in labelled_runs
                      if lab == label and r.overrides["d_model"] == width]
            return statistics.mean(values) if values else None

        widths = sorted({r.overrides["d_model"] for lab, r in labelled_runs if lab == variant})
        pairs = [(w, mean_at(model, w), mean_at(variant, w)) for w in widths]
        changes = [f"d_model {w} {base:.3f} -> {changed:.3f}"
                   for w, base, changed in pairs if base is not None]
        lines += ["", f"Only {what} changed, mean accuracy {model} -> \"{variant}\": "
                  + ", ".join(changes) + "."]
    if n_seeds == 1:
        lines += ["", "One seed per point: on this task learning recall is a sudden transition late or "
                  "never within the step budget, so a single run can land either side of it; read single "
                  "points with care (`--seeds 0,1,2` for error bars)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
