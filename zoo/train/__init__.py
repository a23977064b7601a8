"""Training: a jitted NNX/optax train step, masked losses, orbax checkpoints, a metrics JSONL, a PNG."""

from zoo.train.checkpoint import CheckpointError, restore_latest
from zoo.train.loop import TrainResult, evaluate, length_metric_key, make_eval_step, make_train_step, train
from zoo.train.losses import classification_loss, masked_accuracy, masked_cross_entropy
from zoo.train.metrics import plot_curves, read_records

__all__ = [
    "CheckpointError",
    "TrainResult",
    "classification_loss",
    "evaluate",
    "length_metric_key",
    "make_eval_step",
    "make_train_step",
    "masked_accuracy",
    "masked_cross_entropy",
    "plot_curves",
    "read_records",
    "restore_latest",
    "train",
]
