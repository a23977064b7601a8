"""Bach chorales as binary piano rolls: see ``zoo.data.bach_chorales.builder``; the loss is ``frame_nll``."""

from zoo.data.bach_chorales.builder import (
    VOICES,
    BachChorales,
    BachChoralesConfig,
    chorale_example,
    chorale_paths,
    make_task,
    piano_roll,
    split_paths,
)
from zoo.data.bach_chorales.losses import frame_loss, frame_nll

__all__ = ["VOICES", "BachChorales", "BachChoralesConfig", "chorale_example", "chorale_paths", "frame_loss",
           "frame_nll", "make_task", "piano_roll", "split_paths"]
