"""ListOps (the Long Range Arena generator) as a tfds builder: see ``zoo.data.listops.builder``."""

from zoo.data.listops.builder import ListOps, ListOpsConfig, listops_example, make_task

__all__ = ["ListOps", "ListOpsConfig", "listops_example", "make_task"]
