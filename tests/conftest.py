"""Shared test set-up: import zoo from this checkout, eight CPU devices, float32 matmuls at full
precision, no YNNPACK fusions in XLA:CPU, JAX's persistent compilation cache, and a fixture that
compiles without XLA's optimisation passes."""

import gc
import os
import sys

# XLA:CPU's experimental YNNPACK fusions (jaxlib 0.10.2) can leave a process whose next compile
# aborts or segfaults, after some vmapped and differentiated programs (seen with zoo.ops.ssd and in
# the harness); without them it does not. Set before jax creates its CPU backend.
NO_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type="
# Eight CPU devices, so that the sharding and sequence-parallel tests (tests/parallel) run in the
# default suite. Programs that are not sharded still run on one device; measured on 2 cores, the
# extra devices change the time of single-device tests by less than the noise (~4%).
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} {EIGHT_DEVICES}"
os.environ["XLA_FLAGS"] = f"{flags} {NO_YNN_FUSIONS}".strip()

# JAX's persistent compilation cache, in the checkout's .pytest_cache: the two xdist workers and the
# processes the tests start (notebook kernels, the train CLI runs) compile many of the same programs,
# and each compiles once. Measured on the harness's lstm/gru/mamba cases (2 cores): 115 s without it,
# 102 s with an empty cache, 48 s with the cache of an earlier run. Keys hash the program, the jax
# version and the compile options, so an entry is never used for another program. Set
# ZOO_TEST_COMPILATION_CACHE to another folder, or to "off".
CACHE_DIR = os.environ.get("ZOO_TEST_COMPILATION_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compilation-cache"))
if CACHE_DIR != "off":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The harness compares modes at 1e-5; keep XLA from choosing reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def quick_compile():
    """XLA's optimisation passes off while a module runs (restored afterwards). For tests that check
    arithmetic on small shapes, not XLA's code quality or memory use: compiling unoptimised takes
    about half the time, and compiling is most of what those tests spend."""
    previous = jax.config.values.get("jax_disable_most_optimizations", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# Every compiled XLA:CPU program holds its own memory mappings, and the shared caches of the test
# modules keep thousands of programs alive in one process. Linux refuses mappings past
# vm.max_map_count (65530 by default), and XLA then segfaults in its next compile (seen in the
# harness once it covered ~30 models). So when a process nears the limit, the caches are dropped and
# programs are compiled again as needed.
MAX_MAPPINGS = int(os.environ.get("ZOO_TEST_MAX_MAPPINGS", 40_000))
cache_clearers = []       # test modules register their own caches' ``cache_clear`` here


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:       # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True)
def _stay_below_the_mapping_limit():
    yield
    if _mappings() > MAX_MAPPINGS:
        for clear in cache_clearers:
            clear()
        jax.clear_caches()
        gc.collect()
