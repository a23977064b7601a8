"""Generated tasks as deterministic streams of numpy batches (``inputs``, ``targets``, ``mask``,
``reset``). ``task.batch(step, split)`` depends on the step alone, so resumed runs see the same data."""

from zoo.data.parity import RunningParity, segmented_parity
from zoo.data.task import SPLITS, Batch, Task, batch_rng

TASKS = {"running_parity": RunningParity}

__all__ = ["SPLITS", "TASKS", "Batch", "RunningParity", "Task", "batch_rng", "segmented_parity"]
