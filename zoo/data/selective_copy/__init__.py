"""The selective copying task as a tfds builder: see ``zoo.data.selective_copy.builder``."""

from zoo.data.selective_copy.builder import (
    SelectiveCopy,
    SelectiveCopyConfig,
    make_task,
    selective_copy_example,
)

__all__ = ["SelectiveCopy", "SelectiveCopyConfig", "make_task", "selective_copy_example"]
