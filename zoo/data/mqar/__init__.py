"""Multi-query associative recall as a tfds builder: see ``zoo.data.mqar.builder``."""

from zoo.data.mqar.builder import Mqar, MqarConfig, make_task, mqar_example

__all__ = ["Mqar", "MqarConfig", "make_task", "mqar_example"]
