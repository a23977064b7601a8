"""Train any registered model on any task from the command line; rerun the same command to resume.

    python -m experiments.train --model lstm --task running_parity
    python -m experiments.train --model gru --task running_parity --config.steps=400 \\
        --config.task_config.length=16 --config.eval_lengths='(32, 64, 128)'
    python -m experiments.train --model mamba --task copy --config.model_config.d_state=8 --config.d_model=32
    python -m experiments.train --model lru --task running_parity --helpfull     # every --config.* field

``--model`` is any name of ``zoo.list_models()`` and ``--task`` any name of ``zoo.data.TASKS`` (an
unknown name is an error that lists the choices). Everything else is a field of the
``ml_collections.ConfigDict`` that ``default_config(model, task)`` returns, set on the command line
with ``--config.<field>=<value>``:

* ``model_config``: the chosen model's own config fields (its registry dataclass, ``zoo.get``'s
  keywords) except ``d_model``; ``d_model``, ``n_layers``, ``mlp_ratio`` and ``block`` shape the
  ``SequenceModel`` around it (embedding, residual blocks, norm, per-step linear head; ``block=plain``
  with ``mlp_ratio=0``: the cells stacked under a linear head, as in the classic RNN papers).
* ``task_config``: the chosen task's keyword arguments except ``batch_size`` and ``seed``, which
  ``batch_size`` and ``seed`` set (``seed`` seeds both the initial parameters and the data).
* ``optimizer`` (adamw, adam, sgd), ``learning_rate``, ``schedule`` (warmup_cosine, constant),
  ``warmup_steps`` (default steps // 20), ``weight_decay``, ``clip_norm`` (0: no clipping), ``steps``.
* ``eval_every``, ``eval_batches``, ``eval_lengths`` (extra held-out evaluations at these sequence
  lengths, for tasks that support them: ``zoo.train.loop``), ``log_every``, ``progress``.
* ``output_dir`` (default ``runs/<model>-<task>``), ``checkpoint_dir`` (default
  ``<output_dir>/checkpoints``; "" for none), ``checkpoint_every`` (default ``eval_every``).
* ``keep_best`` (an evaluation metric such as ``eval_loss``; default none) and ``keep_best_mode`` ("min"
  or "max"): leave the model of the best evaluation at the end, early stopping on the held-out split
  (``zoo.train.train``); ``final.json`` then has ``best`` = its step and metrics.

The task decides the loss and the reported metrics (``TASK_LOSSES``, ``loss_fn_for``): masked
cross-entropy and accuracy (``zoo.train.losses.classification_loss``) unless it names another, such as
``bach_chorales`` (negative log-likelihood per frame of independent Bernoullis, ``nll_per_frame``) and
``char_lm`` (cross-entropy and ``bits_per_character``) and ``linear_regression`` (mean squared error at
the query steps). A task of float vector inputs (a task with an
``input_dim``: ``bach_chorales``, ``sequential_digits`` with ``view=rows``) is read through a linear input
layer instead of a token embedding.

The run writes ``metrics.jsonl`` (one record per step), ``curves.png``, ``lengths.png`` (accuracy at
each of ``eval_lengths``), ``config.json`` and ``final.json`` into ``output_dir``, shows a progress bar
and prints the final metrics. Rerunning the same command after a kill (even SIGKILL) resumes from the
latest checkpoint and logs exactly the losses an uninterrupted run logs: batch ``k`` is a pure function
of ``k``, the checkpoint holds the model, the optimizer and the step, and nothing else is random. A
checkpoint that is corrupt, that does not fit the model, or that another configuration wrote stops the
run with a ``zoo.train.checkpoint.CheckpointError`` naming it (fields that only change what is
logged, ``NOT_IN_RUN``, may differ).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import time
import typing
from collections.abc import Callable
from typing import Any

from ml_collections import config_dict

DEFAULT_MODEL, DEFAULT_TASK = "lstm", "running_parity"
MODEL_FIELDS_SET_ELSEWHERE = ("d_model",)            # config.d_model
TASK_FIELDS_SET_ELSEWHERE = ("batch_size", "seed")   # config.batch_size, config.seed
# Fields that change what is logged or written, not the sequence of updates: a resumed run may change them.
NOT_IN_RUN = ("eval_every", "eval_batches", "eval_lengths", "log_every", "checkpoint_every", "output_dir",
              "checkpoint_dir", "progress")
SCHEDULES = ("warmup_cosine", "constant")


def char_lm_loss(model, batch):
    """``classification_loss`` plus ``bits_per_character``, the metric of ``char_lm`` (nats / ln 2)."""
    from zoo.data.char_lm import bits_per_character
    from zoo.train.losses import classification_loss

    loss, metrics = classification_loss(model, batch)
    return loss, {**metrics, "bits_per_character": bits_per_character(loss)}


# The loss_fn of the tasks that are not per-step classification with accuracy, as a function or as
# "module:function" (imported when a run of that task starts). Every other task:
# zoo.train.losses.classification_loss.
TASK_LOSSES = {
    "bach_chorales": "zoo.data.bach_chorales:frame_loss",   # multi-hot targets: NLL per frame
    "char_lm": char_lm_loss,                                # cross-entropy, accuracy, bits per character
    "linear_regression": "zoo.data.linear_regression:regression_loss",   # masked MSE at the queries
}


def loss_fn_for(task: str):
    """The ``loss_fn(model, batch) -> (loss, metrics)`` that a run of ``task`` trains and evaluates with."""
    import importlib

    from zoo.train.losses import classification_loss

    task_factory(task)
    loss = TASK_LOSSES.get(task, classification_loss)
    if isinstance(loss, str):
        module, name = loss.split(":")
        loss = getattr(importlib.import_module(module), name)
    return loss


def choose(kind: str, name: str, choices) -> None:
    if name not in choices:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")


def model_info(name: str):
    import zoo

    models = zoo.list_models()
    choose("model", name, models)
    return models[name]


def task_factory(name: str) -> Callable[..., Any]:
    from zoo.data import TASKS

    choose("task", name, TASKS)
    return TASKS[name]


def _scalar_type(annotation) -> type | None:
    """The type an override of a field annotated ``annotation`` parses to (``int | None`` -> int)."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if candidate in (bool, int, float, str):
            return candidate
        if candidate is tuple or typing.get_origin(candidate) is tuple:
            return tuple
        if candidate is os.PathLike:
            return str
    return None


def _type_hints(obj) -> dict[str, Any]:
    target = getattr(obj, "func", obj)      # functools.partial: its function
    try:
        return typing.get_type_hints(target)
    except Exception:       # an annotation that does not resolve (tfds' BuilderConfig has some): one by one
        return _annotations_one_by_one(target)


def _annotations_one_by_one(target) -> dict[str, Any]:
    """The annotations of ``target`` (and of its base classes) that resolve, each on its own, so that one
    unresolvable annotation (tfds' ``Version``) costs only its own field, which then takes its default's
    type (``max_chorales: int | None = None`` must still accept ``--config.task_config.max_chorales=2``)."""
    import sys

    hints: dict[str, Any] = {}
    for owner in reversed(getattr(target, "__mro__", (target,))):
        annotations = (owner.__dict__.get("__annotations__", {}) if isinstance(owner, type)
                       else getattr(owner, "__annotations__", {}))
        module = sys.modules.get(getattr(owner, "__module__", ""), None)
        namespace = dict(vars(module)) if module is not None else {}
        for name, annotation in annotations.items():
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, namespace)     # noqa: S307 - the class's own annotation
                except Exception:
                    continue
            hints[name] = annotation
    return hints


def _field(value, annotation):
    """A ConfigDict entry: the default, typed by the annotation (None -> a typed placeholder)."""
    kind = _scalar_type(annotation)
    if value is None:
        return config_dict.placeholder(kind or str)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)     # `x: float = 1` must still accept --config....x=0.5
    return value


def model_defaults(name: str) -> config_dict.ConfigDict:
    """The model's config fields with their defaults (``d_model`` excluded: ``config.d_model`` sets it)."""
    info = model_info(name)
    hints = _type_hints(info.config)
    return config_dict.ConfigDict({
        key: _field(value, hints.get(key)) for key, value in info.defaults().items()
        if key not in MODEL_FIELDS_SET_ELSEWHERE})


@functools.cache
def task_parameters(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults, annotations) of the keyword arguments the task's factory takes.

    From the factory's signature; a factory that takes ``**kwargs`` (the tfds tasks, imported on
    first use) is called once with no arguments and its fields are read off the task it builds.
    """
    factory = task_factory(name)
    signature = inspect.signature(factory)
    defaults = {p.name: p.default for p in signature.parameters.values()
                if p.default is not p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    hints = _type_hints(factory)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        built = factory()
        built_defaults, built_hints = _built_task_fields(built)
        defaults = {**built_defaults, **defaults}
        hints = {**built_hints, **hints}
    return defaults, hints


def _built_task_fields(task) -> tuple[dict[str, Any], dict[str, Any]]:
    """A built task's constructor fields; a ``TfdsTask``'s dataset config fields come flat, as its factory
    takes them."""
    from zoo.data.tfds_task import TfdsTask, task_fields

    if not dataclasses.is_dataclass(task):
        return {}, {}
    defaults = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.init}
    hints = _type_hints(type(task))
    if isinstance(task, TfdsTask):
        for key in ("builder_cls", "config"):
            defaults.pop(key)
        defaults.update(task_fields(task.config))
        hints.update(_type_hints(type(task.config)))
    return defaults, hints


def task_defaults(name: str) -> config_dict.ConfigDict:
    """The task's keyword arguments with their defaults (``batch_size`` and ``seed`` are set elsewhere)."""
    defaults, hints = task_parameters(name)
    return config_dict.ConfigDict({key: _field(value, hints.get(key)) for key, value in defaults.items()
                                   if key not in TASK_FIELDS_SET_ELSEWHERE})


def default_config(model: str = DEFAULT_MODEL, task: str = DEFAULT_TASK) -> config_dict.ConfigDict:
    """Every setting of a run with its default; ``model_config``/``task_config`` are those of the names."""
    cfg = config_dict.ConfigDict()
    cfg.model = model
    cfg.model_config = model_defaults(model)
    cfg.d_model = 64
    cfg.n_layers = 1
    cfg.mlp_ratio = 4.0
    cfg.block = "residual"
    cfg.task = task
    cfg.task_config = task_defaults(task)
    cfg.batch_size = 32
    cfg.seed = 0
    cfg.steps = 1000
    cfg.optimizer = "adamw"
    cfg.learning_rate = 1e-2
    cfg.schedule = "warmup_cosine"
    cfg.warmup_steps = config_dict.placeholder(int)
    cfg.weight_decay = 1e-4
    cfg.clip_norm = 1.0
    cfg.eval_every = 100
    cfg.eval_batches = 4
    cfg.eval_lengths = ()
    cfg.log_every = 10
    cfg.checkpoint_every = config_dict.placeholder(int)
    cfg.output_dir = config_dict.placeholder(str)
    cfg.checkpoint_dir = config_dict.placeholder(str)
    cfg.progress = True
    cfg.keep_best = config_dict.placeholder(str)
    cfg.keep_best_mode = "min"
    return cfg


def make_optimizer(cfg):
    """The optax transformation: optional global-norm clipping, then the optimizer on the schedule."""
    import optax

    choose("schedule", cfg.schedule, SCHEDULES)
    if cfg.schedule == "constant":
        schedule = cfg.learning_rate
    else:
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(cfg.steps // 20, 1)
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
            decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.learning_rate / 10)
    optimizers = {
        "adamw": lambda: optax.adamw(schedule, weight_decay=cfg.weight_decay),
        "adam": lambda: optax.adam(schedule),
        "sgd": lambda: optax.sgd(schedule, momentum=0.9),
    }
    choose("optimizer", cfg.optimizer, optimizers)
    transform = optimizers[cfg.optimizer]()
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), transform)
    return transform


def build_task(cfg):
    defaults, _ = task_parameters(cfg.task)
    kwargs = dict(cfg.task_config.to_dict(), batch_size=cfg.batch_size)
    if "seed" in defaults:
        kwargs["seed"] = cfg.seed
    return task_factory(cfg.task)(**kwargs)


def model_inputs(task) -> dict[str, int]:
    """How the model reads the task's inputs: ``{"d_input": n}`` for float vectors [B, T, n] (a task with an
    ``input_dim``, as ``zoo.data.vectors.VectorTask``), else ``{"vocab_size": n}`` for integer tokens."""
    d_input = getattr(task, "input_dim", None)
    return {"d_input": d_input} if d_input is not None else {"vocab_size": task.vocab_size}


def build_model(cfg, task):
    from flax import nnx

    from zoo.nn import SequenceModel

    model_info(cfg.model)
    return SequenceModel(cfg.model, **model_inputs(task), d_model=cfg.d_model, n_layers=cfg.n_layers,
                         d_output=task.n_classes, mixer_config=cfg.model_config.to_dict(),
                         mlp_ratio=cfg.mlp_ratio, block=cfg.block, rngs=nnx.Rngs(cfg.seed))


def as_json(cfg) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as it reads back from a checkpoint."""
    return json.loads(cfg.to_json())


def run_description(cfg) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: every field that changes the updates."""
    return {key: value for key, value in as_json(cfg).items() if key not in NOT_IN_RUN}


def plot_lengths(final: dict[str, float], lengths, path: str, title: str) -> None:
    """Held-out accuracy (the loss, for a task without one) against sequence length as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from zoo.train import length_metric_key

    metric = "accuracy" if length_metric_key(lengths[0], "accuracy") in final else "loss"
    fig = Figure(figsize=(5, 3.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(lengths, [final[length_metric_key(n, metric)] for n in lengths], "o-", color="tab:orange")
    limits = {"ylim": (-0.02, 1.02)} if metric == "accuracy" else {}
    ax.set(xlabel="sequence length", ylabel=f"held-out {metric}", title=title, **limits)
    ax.grid(alpha=0.3)
    fig.savefig(path)


def write_json(path: str, value) -> None:
    """``value`` as JSON at ``path``, atomically: a kill mid-write leaves the old file or none."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


class Run(typing.NamedTuple):
    """What ``train_model`` leaves: the summary ``run`` returns, and the trained model, its task and loss."""

    summary: dict[str, Any]
    model: Any
    task: Any
    loss_fn: Callable


def run(cfg) -> dict[str, Any]:
    """Train as ``cfg`` says; return ``{"start_step", "steps", "params", "final", "seconds"}`` (also in
    final.json)."""
    return train_model(cfg).summary


def train_model(cfg) -> Run:
    """``run``, keeping the trained model, its task and its loss_fn (for evaluations after training)."""
    from flax import nnx

    from zoo.nn import count_params
    from zoo.train import train

    began = time.perf_counter()
    model_info(cfg.model)
    task_factory(cfg.task)
    output_dir = cfg.output_dir or os.path.join("runs", f"{cfg.model}-{cfg.task}")
    checkpoint_dir = (os.path.join(output_dir, "checkpoints") if cfg.checkpoint_dir is None
                      else cfg.checkpoint_dir or None)
    os.makedirs(output_dir, exist_ok=True)
    task = build_task(cfg)
    loss_fn = loss_fn_for(cfg.task)
    model = build_model(cfg, task)
    n_params = count_params(model)
    optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
    config_path = os.path.join(output_dir, "config.json")
    if not os.path.exists(config_path):     # else after training: a rejected resume must not overwrite it
        write_json(config_path, as_json(cfg))
    print(f"experiments.train: {cfg.model} ({n_params:,} params, {cfg.n_layers} layer(s), "
          f"d_model {cfg.d_model}) on {cfg.task}, {cfg.steps} steps of {cfg.batch_size}; "
          f"output {output_dir}, checkpoints {checkpoint_dir}", flush=True)

    lengths = tuple(cfg.eval_lengths)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    plot_path = os.path.join(output_dir, "curves.png")
    title = f"{cfg.model} on {cfg.task}"
    result = train(model, optimizer, task, steps=cfg.steps, eval_every=cfg.eval_every,
                   eval_batches=cfg.eval_batches, eval_lengths=lengths, loss_fn=loss_fn,
                   checkpoint_dir=checkpoint_dir,
                   checkpoint_every=cfg.checkpoint_every, metrics_path=metrics_path, plot_path=plot_path,
                   log_every=cfg.log_every, progress=cfg.progress, description=title,
                   run=run_description(cfg), keep_best=cfg.keep_best or None,
                   keep_best_mode=cfg.keep_best_mode)
    if lengths:
        plot_lengths(result.final, lengths, os.path.join(output_dir, "lengths.png"), title)
    summary = {"start_step": result.start_step, "steps": cfg.steps, "params": n_params, "final": result.final,
               "seconds": time.perf_counter() - began}
    if result.best is not None:
        summary["best"] = result.best
    write_json(config_path, as_json(cfg))
    write_json(os.path.join(output_dir, "final.json"), summary)
    resumed = (f"resumed from the checkpoint at step {result.start_step}"
               if result.start_step else "from scratch")
    print(f"trained steps {result.start_step}..{cfg.steps} ({resumed}) in {result.seconds:.1f} s")
    print("final metrics: " + ", ".join(f"{key} {value:.4f}" for key, value in result.final.items()))
    if result.best is not None:
        print(f"kept the model of step {result.best['step']}, the best {cfg.keep_best} "
              f"({cfg.keep_best_mode}): {result.best[cfg.keep_best]:.4f}")
    print(f"metrics: {metrics_path}\ncurves:  {plot_path}")
    return Run(summary, model, task, loss_fn)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags in two passes: ``--model``/``--task`` first, so that ``--config`` holds their fields."""
    from absl import flags
    from ml_collections import config_flags

    names = flags.FlagValues()     # a private set of flags, so the first pass ignores everything else
    for flag_values in (names, flags.FLAGS):
        flags.DEFINE_string("model", DEFAULT_MODEL, "a registered model: zoo.list_models()",
                            flag_values=flag_values)
        flags.DEFINE_string("task", DEFAULT_TASK, "a task: zoo.data.TASKS", flag_values=flag_values)
    names(argv, known_only=True)
    try:
        cfg = default_config(names.model, names.task)
    except ValueError as error:
        raise SystemExit(f"experiments.train: {error}") from None
    try:    # DEFINE_config_dict already applies the --config.* overrides it finds on the command line
        config_flags.DEFINE_config_dict("config", cfg, "the run's settings: experiments/train.py")
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:     # ml_collections' answer to --config.<no such field>
        field = str(error).strip("'\" ")
        raise SystemExit(f"experiments.train: no config field {field!r} for --model {names.model} --task "
                         f"{names.task}; the fields are:\n{cfg}") from None
    if (cfg.model, cfg.task) != (names.model, names.task):
        raise SystemExit("experiments.train: choose the model and the task with --model and --task (the "
                         "fields of config.model_config and config.task_config depend on them), not with "
                         "--config.model or --config.task")
    return rest


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    from zoo.train.checkpoint import CheckpointError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:    # orbax logs every save at INFO: keep the terminal for the bar
        logging.set_verbosity(logging.WARNING)
    try:
        run(flags.FLAGS.config)
    except CheckpointError as error:
        raise SystemExit(f"experiments.train: {type(error).__name__}: {error}") from None


if __name__ == "__main__":
    from absl import app

    app.run(main, flags_parser=parse_flags)
