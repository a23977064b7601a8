"""The model registry: ``zoo.get(name, **config)`` and ``zoo.list_models()``.

A model module registers itself with ``@register(...)`` on its ``build(config) -> Recurrence``
function. Every module under ``zoo/models`` is imported on first use, so a new model joins the
registry (and the shared conformance harness) by existing.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from zoo.contract import Recurrence

_REGISTRY: dict[str, ModelInfo] = {}
_LOADED = False


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What ``zoo.list_models()`` says about one model."""

    name: str
    paper: str
    engine: str
    modes: tuple[str, ...]
    config: type
    build: Callable[[Any], Recurrence] = dataclasses.field(repr=False)
    state_size_fn: Callable[[Any], int] = dataclasses.field(repr=False)

    def make_config(self, **overrides):
        valid = [f.name for f in dataclasses.fields(self.config)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(
                f"zoo.get({self.name!r}): unknown config key(s) {unknown}; valid keys are {valid}"
            )
        return self.config(**overrides)

    def state_size(self, **config) -> int:
        """Floats of state per sequence for this config (defaults for keys not given)."""
        return int(self.state_size_fn(self.make_config(**config)))

    def defaults(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config())


def register(name: str, *, config: type, paper: str, engine: str, modes: tuple[str, ...],
             state_size: Callable[[Any], int]):
    """Decorator for ``build(config) -> Recurrence`` that adds it to the registry."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register({name!r}): config must be a dataclass")

    def decorate(build: Callable[[Any], Recurrence]):
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"register: a model named {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name=name, paper=paper, engine=engine, modes=tuple(modes),
                                    config=config, build=build, state_size_fn=state_size)
        return build

    return decorate


def _load_models() -> None:
    global _LOADED
    if _LOADED:
        return
    import zoo.models as models_pkg

    for module in pkgutil.iter_modules(models_pkg.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"zoo.models.{module.name}")
    _LOADED = True


def list_models() -> dict[str, ModelInfo]:
    """Every registered model: name -> ModelInfo(paper, engine, modes, state_size(**config))."""
    _load_models()
    return dict(sorted(_REGISTRY.items()))


def info(name: str) -> ModelInfo:
    _load_models()
    if name not in _REGISTRY:
        raise ValueError(f"zoo.get: unknown model {name!r}; registered models are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get(name: str, **config) -> Recurrence:
    """Build the named model. Every config key has a default; unknown keys raise ``TypeError``."""
    model = info(name)
    return model.build(model.make_config(**config))
