"""The fifteen tasks of Delétang et al., "Neural Networks and the Chomsky Hierarchy" (ICLR 2023),
as pure numpy example generators.

``TASKS[name]`` is a ``TaskSpec``: ``generate(rng, length)`` returns one example (``inputs``,
``targets``, ``mask``, int32/int32/bool, all of length ``sequence_length(length)``), and
``vocab_size`` / ``n_classes`` size the model. ``collate`` pads examples into a [B, T] batch and
``ChomskyTask`` wraps a spec as a zoo ``Task`` stream. See ``_common`` for the example layout and the
train (1..40) / test (41..500) length regime.
"""

from zoo.data.chomsky import context_free, context_sensitive, regular
from zoo.data.chomsky._common import (
    TEST_MAX_LENGTH,
    TEST_MIN_LENGTH,
    TRAIN_MAX_LENGTH,
    TRAIN_MIN_LENGTH,
    Example,
    TaskSpec,
    collate,
    sample_length,
)
from zoo.data.chomsky.stream import ChomskyTask

TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in regular.SPECS + context_free.SPECS + context_sensitive.SPECS
}
VOCAB_SIZES: dict[str, int] = {name: spec.vocab_size for name, spec in TASKS.items()}
N_CLASSES: dict[str, int] = {name: spec.n_classes for name, spec in TASKS.items()}
LEVELS: dict[str, str] = {name: spec.level for name, spec in TASKS.items()}

__all__ = [
    "LEVELS",
    "N_CLASSES",
    "TASKS",
    "TEST_MAX_LENGTH",
    "TEST_MIN_LENGTH",
    "TRAIN_MAX_LENGTH",
    "TRAIN_MIN_LENGTH",
    "VOCAB_SIZES",
    "ChomskyTask",
    "Example",
    "TaskSpec",
    "collate",
    "sample_length",
]
