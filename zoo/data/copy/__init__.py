"""The copy task as a tfds builder: see ``zoo.data.copy.builder``."""

from zoo.data.copy.builder import Copy, CopyConfig, copy_example, copy_layout, make_task

__all__ = ["Copy", "CopyConfig", "copy_example", "copy_layout", "make_task"]
