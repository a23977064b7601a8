"""mamba_ssm's pure-PyTorch reference functions, loaded from its installed source without importing it.

``import mamba_ssm`` needs CUDA pieces (``selective_scan_cuda``, triton) that a CPU machine does
not have, but its reference functions are plain torch + einops. So this module finds the installed
package with ``importlib.util.find_spec`` (which locates it without executing ``__init__``), parses
the few source files that hold the references, and executes only the named top-level functions in a
namespace that provides ``torch``, ``F``, ``math``, ``rearrange`` and ``repeat``.

Install (CPU, no CUDA build, no dependencies; pure Python)::

    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation mamba-ssm

Usage in a test::

    ref = load_mamba_reference()          # pytest.skip if torch or mamba-ssm is absent
    y = ref.selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_softplus=True)
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
import os
import types

import pytest

# source file (relative to the package) -> reference functions taken from it
_SOURCES = {
    "ops/selective_scan_interface.py": ["selective_scan_ref"],
    "ops/triton/selective_state_update.py": ["selective_state_update_ref"],
    "modules/ssd_minimal.py": ["segsum", "ssd_minimal_discrete"],
    "ops/triton/ssd_chunk_state.py": ["chunk_state_ref"],
    "ops/triton/ssd_state_passing.py": ["state_passing_ref"],
    "ops/triton/ssd_chunk_scan.py": ["chunk_scan_ref"],
    "ops/triton/ssd_combined.py": ["ssd_chunk_scan_combined_ref"],
    "ops/triton/layernorm_gated.py": ["rms_norm_ref"],
}


def _package_dir() -> str | None:
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _function_sources(path: str, names: list[str]) -> list[str]:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    found = {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name in names}
    missing = sorted(set(names) - set(found))
    if missing:
        raise RuntimeError(f"mamba_ssm reference functions {missing} not found in {path}")
    return [found[name] for name in names]


@functools.cache
def _load(package_dir: str) -> types.SimpleNamespace:
    import torch
    import torch.nn.functional as F
    from einops import rearrange, repeat

    namespace = {"torch": torch, "F": F, "math": math, "rearrange": rearrange, "repeat": repeat}
    for relative, names in _SOURCES.items():
        for source in _function_sources(os.path.join(package_dir, relative), names):
            exec(compile(source, os.path.join(package_dir, relative), "exec"), namespace)  # noqa: S102
    return types.SimpleNamespace(**{n: namespace[n] for names in _SOURCES.values() for n in names})


def load_mamba_reference() -> types.SimpleNamespace:
    """The reference functions (see ``_SOURCES``); skips the calling test if torch or mamba-ssm is absent."""
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    package_dir = _package_dir()
    if package_dir is None:
        pytest.skip("mamba-ssm is not installed (see tests/refs/mamba_ssm_reference.py for the command)")
    return _load(package_dir)
