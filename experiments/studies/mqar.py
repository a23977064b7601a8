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
WIDTHS = (16, 32, 64)
QUICK_WIDTHS = (8,)


def width_config(model: str, d_model: int) -> dict:
    """Model config fields that make the state grow with ``d_model`` (heads of a fixed size, LRU's width)."""
    if model in ("linear_transformer", "retnet", "gated_deltanet"):
        return {"n_heads": max(1, d_model // 8)}        # d_head stays 8
    if model == "lru":
        return {"d_state": d_model}
    if model == "mamba":
        return {"d_state": 16}
    return {}


TASK_FULL = {"n_keys": 64, "n_values": 64, "n_pairs": 16, "query_length": 32, "train_size": 16384,
             "eval_size": 512}
FULL = {"n_layers": 2, "mlp_ratio": 2.0, "batch_size": 32, "steps": 1500, "learning_rate": 3e-3,
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
    runs: list[R.RunResult] = []
    families = QUICK_FAMILIES if args.quick else FAMILIES
    for family, names in families.items():
        for model in names:
            for width in widths:
                config = width_config(model, width)
                state = models[model].state_size(d_model=width, **config) * shared["n_layers"]
                overrides = {**shared, "d_model": width,
                             **{f"model_config.{k}": v for k, v in config.items()}}
                done = [R.train_one(model, TASK, overrides, seed=seed, label=f"{model}-d{width}",
                                    runs_dir=args.runs, full_eval=True) for seed in seeds]
                runs += done
                print(f"{NAME}: {model} d_model {width} (state {state}): accuracy "
                      f"{R.mean_std([r.metric('accuracy') for r in done])}", flush=True)
                rows.append([family, model, width, ", ".join(f"{k}={v}" for k, v in config.items()) or "—",
                             state, f"{done[0].params:,}", R.mean_std([r.metric("accuracy") for r in done]),
                             R.seconds_cell(done)])
    wall = time.perf_counter() - began
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
    if args.quick:
        setting += ("\n\n**--quick smoke setting: one model per family, a few steps of tiny models; the "
                    "numbers mean nothing.**")
    return R.publish(NAME, argv, args.out, title="MQAR: recall accuracy against state size",
                     seeds=seeds, wall=wall, hardware_line=hardware,
                     sections=[("Accuracy against state size", columns, rows)], setting=setting,
                     paper=PAPERS_MD, runs=runs)


if __name__ == "__main__":
    main(sys.argv[1:])
