"""Generated tasks as deterministic streams of numpy batches (``inputs``, ``targets``, ``mask``,
``reset``). ``task.batch(step, split)`` depends on the step alone, so resumed runs see the same data."""

from zoo.data.parity import RunningParity, segmented_parity
from zoo.data.task import SPLITS, Batch, Task, batch_rng


def tfds_task(package: str):
    """``zoo.data.<package>.make_task``, imported on first call (tensorflow_datasets is slow to import)."""
    def make_task(**kwargs):
        import importlib

        return importlib.import_module(f"zoo.data.{package}").make_task(**kwargs)

    make_task.__name__ = make_task.__qualname__ = f"make_{package}_task"
    return make_task


TASKS = {
    "running_parity": RunningParity,
    "copy": tfds_task("copy"),
    "selective_copy": tfds_task("selective_copy"),
    "mqar": tfds_task("mqar"),
}

__all__ = ["SPLITS", "TASKS", "Batch", "RunningParity", "Task", "batch_rng", "segmented_parity"]
