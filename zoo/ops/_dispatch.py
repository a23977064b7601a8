"""Choosing between an engine's XLA modes and a Pallas kernel (``pallas_kernels``).

``implementation=`` on an engine takes "xla", "pallas", or an ordered list of them tried in turn;
None means: the kernel on GPU and TPU when the mode is "auto", XLA otherwise. ``mode="pallas"`` is
shorthand for ``implementation="pallas"`` (``pallas_mode``), with XLA's "auto" mode for what the
kernel does not cover. The choice happens at
trace time, from the platform and the inputs. A kernel that cannot take an input (an option it does
not implement, a dtype it does not support) is skipped with one warning per reason, and XLA runs:
never a silent wrong result, never an error for a supported call.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import jax

IMPLEMENTATIONS = ("xla", "pallas")
_warned: set[tuple[str, str]] = set()


def _as_list(who: str, implementation) -> list[str]:
    names = [implementation] if isinstance(implementation, str) else list(implementation)
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"{who}: implementation={implementation!r}; each entry must be one of "
                             f"{IMPLEMENTATIONS}")
    return names


def use_pallas(who: str, implementation, mode: str, unsupported: str | None) -> bool:
    """Whether to run the Pallas kernel. ``unsupported`` says why the kernel cannot take this call
    (None when it can); ``mode`` is the caller's mode before "auto" is resolved."""
    if implementation is None:
        if mode != "auto" or jax.default_backend() not in ("gpu", "tpu"):
            return False
        names = ["pallas"]
    else:
        names = _as_list(who, implementation)
    for name in names:
        if name == "xla":
            return False
        if unsupported is None:
            return True
        if (who, unsupported) not in _warned:
            _warned.add((who, unsupported))
            warnings.warn(f"{who}: the Pallas kernel does not support {unsupported}; running XLA instead",
                          stacklevel=3)
    return False


def pallas_mode(who: str, mode: str, implementation):
    """``(mode, implementation)`` with ``mode="pallas"`` read as ``implementation="pallas"`` and XLA's
    ``mode="auto"`` as the fallback; any other mode passes through unchanged."""
    if mode != "pallas":
        return mode, implementation
    if implementation not in (None, "pallas"):
        raise ValueError(f"{who}: mode='pallas' asks for the Pallas kernel, which implementation="
                         f"{implementation!r} contradicts; pass one of them")
    return "auto", "pallas"


# A hook that runs the diagonal, matrix and delta engines sequence-parallel (set by
# ``zoo.parallel.sequence.sharded_time``; zoo.ops imports nothing above it, so the hook is handed in).
# Read when an engine's ``apply`` is traced.
_sequence_hook: contextvars.ContextVar = contextvars.ContextVar("zoo_sequence_hook", default=None)


def sequence_hook():
    """The active sequence-parallel hook, ``hook(engine_name, *args, **kwargs)``, or None."""
    return _sequence_hook.get()


@contextlib.contextmanager
def using_sequence_hook(hook):
    """Within the block, engines' ``apply`` calls go to ``hook`` (None: to the engines themselves)."""
    token = _sequence_hook.set(hook)
    try:
        yield
    finally:
        _sequence_hook.reset(token)
