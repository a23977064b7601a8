"""The JAX mLSTM reference kernels of ``mlstm_kernels`` 2.0.6, loaded by file path without importing it.

``import mlstm_kernels.jax`` runs ``mlstm_kernels/jax/__init__.py`` and the registries under it, which
import the Triton kernels and so ``jax_triton`` (whose import raises on a CPU machine) and ``triton``.
The native kernels themselves are plain jax + einops. This module finds the installed package with
``importlib.util.find_spec`` (no ``__init__`` runs), and executes only the native files, each under a
private synthetic package so that their relative imports (``from .fw import ...``) resolve to the
files loaded here. ``recurrent/native_sequence.py`` also imports ``.triton_step``; a stand-in module
takes its place (calling it raises). Each file's imports are checked first: only jax, einops, the
standard library and the sibling files loaded here are allowed.

Install (no dependencies: it declares torch and matplotlib, neither needed here)::

    pip install --no-deps mlstm_kernels==2.0.6

Usage in a test::

    ref = load_mlstm_kernels_reference()          # pytest.skip if jax, einops or the package is absent
    h, (c, n, m) = ref.mlstm_chunkwise(q, k, v, i, f, return_last_states=True, chunk_size=4)

Functions (all ``[B, NH, S, D]`` for q, k, v; gates ``[B, NH, S]``; ``i`` is the log input gate
(exponential gating, no activation applied), ``f`` the forget *preactivation*: every kernel uses
``log_sigmoid(f)`` as the log forget gate)::

    chunkwise/native/fw.py     mlstm_chunkwise_fw(matQ, matK, matV, vecI, vecF, matC_initial=None,
                                   vecN_initial=None, scaM_initial=None, qk_scale=None,
                                   return_last_states=False, return_all_states=False, chunk_size=64,
                                   eps=1e-6) -> (h, n_out, m_out, last_states | None, all | None)
                               mlstm_chunkwise(...same...) -> h or (h, (c, n, m))
    chunkwise/native/fwbw.py   mlstm_chunkwise__native_autograd(q, k, v, i, f, c_initial=None,
                                   n_initial=None, m_initial=None, return_last_states=False,
                                   eps=1e-6, chunk_size=64)    (the "chunkwise--native_autograd" kernel)
    parallel/native/fw.py      mlstm_parallel_fw(matQ, matK, matV, vecI, vecF, eps=1e-6) -> (h, n, m)
    parallel/native/fwbw.py    mlstm_parallel__native_autograd, mlstm_parallel__native_custbw
                                   (q, k, v, i, f, eps=1e-6): no initial or final states
    recurrent/native_step.py   mlstm_recurrent_step__native_fw(matC_state, vecN_state, scaM_state,
                                   vecQ, vecK, vecV, scaI, scaF, eps=1e-6) -> (h, (c, n, m))
                               mlstm_recurrent_step__native(q, k, v, i, f, c, n, m, eps=1e-6)
                                   (one step: q, k [B, NH, DHQK], v [B, NH, DHV], i, f, m [B, NH, 1])
    recurrent/native_sequence.py  mlstm_recurrent_sequence__native_fw(q, k, v, i, f, c_initial=None,
                                   n_initial=None, m_initial=None, return_last_states=False, eps=1e-6)

What they compute (line numbers in mlstm_kernels 2.0.6's jax/ folder), with
``F_t = log_sigmoid(f_t)``, m the max-stabiliser, C [DHQK, DHV], n [DHQK]::

    m_t = max(F_t + m_{t-1}, i_t)
    C_t = exp(F_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_tᵀ        (keys not scaled)
    n_t = exp(F_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = (s q_t)ᵀ C_t / (max(|(s q_t)ᵀ n_t|, exp(-m_t)) + eps)          s = qk_scale

* the scale s multiplies q, in the numerator and in the normaliser alike: recurrent/native_step.py:58
  (fixed at DHQK^-1/2), parallel/native/fw.py:44 (fixed, on q kᵀ, which also feeds the normaliser
  row sum at :47-48), chunkwise/native/fw.py:243 and :249 (``qk_scale``, default DHQK^-1/2 at :77 and
  :340; only the chunkwise kernel lets it be changed). Keys are never scaled (fw.py:125).
* eps is added to the normaliser after the max: native_step.py:73, chunkwise fw.py:261-265,
  parallel fw.py:47-51 (``C̃ / (max(...) + eps)``). Default 1e-6 everywhere. With the unstabilised
  C̃ = e^{m} C, ñ = e^{m} n the output is ``s qᵀC̃ / (max(|s qᵀñ|, 1) + eps·exp(m_t))``: eps weighs
  in proportion to exp(m_t), so two implementations whose stabilisers differ (m_0 = 0 or -inf, a
  chunk-level m) differ by about eps·|exp(m_t) - exp(m'_t)| / max(|s qᵀñ|, 1) relative: below
  1e-6 on random data, but an m far above the running max (say a large m_0 carried in a state)
  inflates eps by exp(m - m_true).
* conditioning: with large input gates (i around +8) exp(-m_t) is tiny, |qᵀn| can cancel, and every
  float32 kernel here (chunkwise, parallel, recurrent) differs from a float64 loop by 3e-4 to 6e-4
  of max|h|. With i around 0 they agree with it to ~2e-7. Test data for 1e-5 must keep the
  normaliser away from cancellation.
* the initial m when none is given is 0 in the chunkwise kernel (fw.py:97-101) and in the recurrent
  sequence (native_sequence.py:85), with C = 0 and n = 0. The parallel kernel has no initial state:
  its m_t is the row max over j <= t of ``i_j + F_{j+1} + ... + F_t`` (parallel fw.py:39), i.e. the
  recurrent one started from m_0 = -inf. The two differ when every such term is below
  ``F_1 + ... + F_t`` (all input gates strongly negative), and then only through eps (by less than
  eps relative: 4e-7 measured with input gates around -30).
* the chunkwise kernel asserts S % chunk_size == 0 (fw.py:328-330) and returns m as [B, NH]; the
  recurrent step and sequence return m as [B, NH, 1].
* Bug: ``mlstm_recurrent_sequence__native_fw`` with initial states fails (native_sequence.py:73 calls
  ``scaM_initial.axis()``, which jax arrays lack). Loop ``mlstm_recurrent_step__native_fw`` instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

import pytest

from tests.refs.fla_reference import check_imports, package_dir

# synthetic package -> (folder under mlstm_kernels/jax/, files in load order)
PACKAGES = {
    "chunkwise_native": ("chunkwise/native", ["fw", "fwbw"]),
    "parallel_native": ("parallel/native", ["fw", "bw", "fwbw"]),
    "recurrent": ("recurrent", ["native_step", "triton_step", "native_sequence"]),
}
# files replaced by a stand-in instead of being executed: they import jax_triton and triton
STAND_INS = {("recurrent", "triton_step"): ["mlstm_recurrent_step__triton_fw"]}
EXPORTS = {
    "chunkwise_native": ["mlstm_chunkwise_fw", "mlstm_chunkwise", "mlstm_chunkwise__native_autograd"],
    "parallel_native": ["mlstm_parallel_fw", "mlstm_parallel__native_autograd",
                        "mlstm_parallel__native_custbw"],
    "recurrent": ["mlstm_recurrent_step__native_fw", "mlstm_recurrent_step__native",
                  "mlstm_recurrent_sequence__native_fw"],
}
ALLOWED_IMPORTS = {"jax", "einops", "collections", "typing", "math", "functools", "__future__"}
PRIVATE_ROOT = "_zoo_mlstm_kernels_reference"


def _stand_in(name: str, functions: list[str]) -> types.ModuleType:
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in: the Triton kernels are not loaded on this machine")

    for function in functions:
        setattr(module, function, unavailable)
    return module


def _load_package(jax_dir: str, package: str, folder: str, files: list[str]) -> types.ModuleType:
    """Load ``files`` of ``folder`` as submodules of a synthetic package (registered in sys.modules,
    which relative imports resolve through)."""
    full_name = f"{PRIVATE_ROOT}.{package}"
    pkg = types.ModuleType(full_name)
    pkg.__path__ = []
    sys.modules[full_name] = pkg
    siblings = {"." + f for f in files}
    for file in files:
        name = f"{full_name}.{file}"
        if (package, file) in STAND_INS:
            module = _stand_in(name, STAND_INS[package, file])
        else:
            path = os.path.join(jax_dir, folder, file + ".py")
            check_imports(path, ALLOWED_IMPORTS | siblings)
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        sys.modules[name] = module
        setattr(pkg, file, module)
    return pkg


@functools.cache
def _load(mlstm_dir: str) -> types.SimpleNamespace:
    jax_dir = os.path.join(mlstm_dir, "jax")
    if PRIVATE_ROOT not in sys.modules:
        root = types.ModuleType(PRIVATE_ROOT)
        root.__path__ = []
        sys.modules[PRIVATE_ROOT] = root
    functions = {}
    for package, (folder, files) in PACKAGES.items():
        pkg = _load_package(jax_dir, package, folder, files)
        for name in EXPORTS[package]:
            found = [getattr(m, name) for m in vars(pkg).values()
                     if isinstance(m, types.ModuleType) and hasattr(m, name)]
            if not found:
                raise RuntimeError(f"mlstm_kernels/jax/{folder} has no {name} (expected version 2.0.6)")
            functions[name] = found[0]
    return types.SimpleNamespace(**functions)


def load_mlstm_kernels_reference() -> types.SimpleNamespace:
    """The native JAX kernels named in ``EXPORTS``; skips the calling test if they cannot be had."""
    pytest.importorskip("jax")
    pytest.importorskip("einops")
    mlstm_dir = package_dir("mlstm_kernels")
    if mlstm_dir is None:
        pytest.skip("mlstm_kernels is not installed (pip install --no-deps mlstm_kernels==2.0.6)")
    return _load(mlstm_dir)
