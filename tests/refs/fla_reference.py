"""FLA's pure-PyTorch ``naive`` reference functions, loaded from fla-core's source without importing ``fla``.

Any ``import fla`` (even of ``fla.ops.gla.naive``) runs ``fla/__init__.py``, which needs triton (~1 GB)
and packaging. The naive references themselves are plain torch + einops. So this module finds the
installed package with ``importlib.util.find_spec("fla")`` (which locates it without executing
``__init__``) and executes each reference file on its own, under a private module name, after
checking that the file imports nothing but torch, einops and the standard library.

Install (no dependencies; fla-core declares only einops, which zoo already pins)::

    pip install --no-deps fla-core==0.6.0

Usage in a test::

    ref = load_fla_reference()            # pytest.skip if torch, einops or fla-core is absent
    o, final = ref.naive_recurrent_simple_gla(q, k, v, g, initial_state=s0, output_final_state=True)

Layouts and conventions of fla-core 0.6.0 (check them before comparing):

* ``[B, T, H, K]`` (q, k; v ``[B, T, H, V]``; scalar gates ``[B, T, H]``): ``naive_recurrent_gla``
  (gk ``[B, T, H, K]``; the scale is fixed at K^-1/2, no ``scale`` argument),
  ``naive_recurrent_simple_gla``, ``naive_chunk_simple_gla``, ``naive_parallel_simple_gla`` (returns
  ``(o, A)``, no initial state), ``naive_recurrent_linear_attn``, ``naive_chunk_linear_attn`` (returns
  ``o`` only; T must be a multiple of 64; no initial state), ``naive_recurrent_gated_delta_rule``,
  ``naive_chunk_gated_delta_rule`` (note its argument order ``(q, k, v, g, beta)`` against the
  recurrent one's ``(q, k, v, beta, g)``).
* ``[B, H, T, K]``: ``naive_recurrent_rwkv6`` (w is the log decay ``[B, H, T, K]``, u ``[H, K]``),
  ``naive_chunk_rwkv6`` (T a multiple of ``chunk_size``; no initial state), ``naive_retention`` (and
  it returns ``o`` only, with the fixed decays ``1 - 2^(-5-h)``), ``delta_rule_recurrence``,
  ``delta_rule_chunkwise``, ``delta_rule_parallel`` (T a multiple of the chunk sizes).
* ``[B, T, D]``: ``naive_recurrent_hgrn``, ``naive_chunk_hgrn`` (which only works when T equals its
  ``chunk_size``: it reshapes g to ``[B, chunk_size, D]``).

Gates are logarithms (``exp(g)`` multiplies the state); states are ``[B, H, K, V]``; outputs come back
in the input dtype but are computed in float32 (use float64 inputs where the reference itself
should not limit the comparison: most functions cast to float32 internally, so they cannot).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import types

import pytest

# source file (relative to fla/) -> reference functions taken from it
SOURCES = {
    "ops/gla/naive.py": ["naive_recurrent_gla"],
    "ops/simple_gla/naive.py": ["naive_recurrent_simple_gla", "naive_chunk_simple_gla",
                                "naive_parallel_simple_gla"],
    "ops/retention/naive.py": ["naive_retention"],
    "ops/hgrn/naive.py": ["naive_recurrent_hgrn", "naive_chunk_hgrn"],
    "ops/linear_attn/naive.py": ["naive_recurrent_linear_attn", "naive_chunk_linear_attn"],
    "ops/rwkv6/recurrent_naive.py": ["naive_recurrent_rwkv6"],
    "ops/rwkv6/chunk_naive.py": ["naive_chunk_rwkv6"],
    "ops/delta_rule/naive.py": ["delta_rule_recurrence", "delta_rule_chunkwise", "delta_rule_parallel"],
    "ops/gated_delta_rule/naive.py": ["naive_recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule"],
}

# What a reference file may import: if a later fla-core makes one import fla itself, loading it
# standalone would fail in a confusing way (or pull triton), so refuse it with a clear message.
ALLOWED_IMPORTS = {"torch", "einops", "math", "typing", "__future__", "functools"}


def package_dir(name: str = "fla") -> str | None:
    """The installed package's directory, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def check_imports(path: str, allowed=ALLOWED_IMPORTS) -> None:
    """RuntimeError if the file at ``path`` imports a top-level package outside ``allowed``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = ["." * node.level + (node.module or "")] if node.level else [node.module.split(".")[0]]
        else:
            continue
        bad = [r for r in roots if r not in allowed]
        if bad:
            raise RuntimeError(f"{path} imports {bad}; only {sorted(allowed)} can be loaded without "
                               f"importing its package")


def load_file(path: str, module_name: str) -> types.ModuleType:
    """Execute one source file as a standalone module called ``module_name`` (not put in sys.modules)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load(fla_dir: str) -> types.SimpleNamespace:
    functions = {}
    for relative, names in SOURCES.items():
        path = os.path.join(fla_dir, relative)
        if not os.path.exists(path):
            raise RuntimeError(f"fla-core has no {relative} (expected version 0.6.0 at {fla_dir})")
        check_imports(path)
        private_name = "_zoo_fla_reference." + relative.removesuffix(".py").replace("/", ".")
        module = load_file(path, private_name)
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise RuntimeError(f"fla-core's {relative} has no {missing}")
        functions.update({n: getattr(module, n) for n in names})
    return types.SimpleNamespace(**functions)


def load_fla_reference() -> types.SimpleNamespace:
    """The reference functions named in ``SOURCES``; skips the calling test if they cannot be had."""
    pytest.importorskip("torch", reason="the FLA references need torch (the refs extra)")
    pytest.importorskip("einops")
    fla_dir = package_dir("fla")
    if fla_dir is None:
        pytest.skip("fla-core is not installed (pip install --no-deps fla-core==0.6.0)")
    return _load(fla_dir)
