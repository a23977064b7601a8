"""``initialize()``: join the processes of a multi-host job with ``jax.distributed.initialize``.

Call it first thing in every process, before any JAX computation (JAX refuses to initialize after
its backend has started). Where the coordinator, the process count and this process's id come from,
first match wins:

1. the keyword arguments;
2. zoo's environment variables ``ZOO_COORDINATOR`` ("host:port" of process 0's coordinator service),
   ``ZOO_NUM_PROCESSES`` and ``ZOO_PROCESS_ID`` (0 .. num_processes - 1);
3. the names in JAX's style, ``JAX_COORDINATOR_ADDRESS`` (which ``jax.distributed`` itself reads),
   ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

With none of them set, on a TPU host (``on_tpu``) ``jax.distributed.initialize()`` is called with no
arguments and finds all three itself (from the TPU metadata or GKE's environment);
``ZOO_CLUSTER_AUTODETECT=1`` asks for JAX's auto-detection elsewhere (Slurm, Open MPI, Kubernetes).
Otherwise, and whenever the process count is 1 (a TPU slice whose ``TPU_WORKER_HOSTNAMES`` lists one
host included), it does nothing: a single process needs no coordinator.

On CPU the collectives between processes need an implementation: set
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` before calling this
(ENV-NOTES §11); TPU and GPU need nothing.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import jax

COORDINATOR_VARS = ("ZOO_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
NUM_PROCESSES_VARS = ("ZOO_NUM_PROCESSES", "JAX_NUM_PROCESSES")
PROCESS_ID_VARS = ("ZOO_PROCESS_ID", "JAX_PROCESS_ID")
AUTODETECT_VAR = "ZOO_CLUSTER_AUTODETECT"
# Set on Cloud TPU VMs and GKE TPU pods; JAX's own cluster detection reads them too.
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, env: Mapping[str, str] | None = None, **kwargs) -> bool:
    """Start ``jax.distributed`` for this process; returns whether it did (False: single process).

    Extra ``kwargs`` (``local_device_ids``, ``initialization_timeout``, ...) go to
    ``jax.distributed.initialize``. Calling it again once initialized does nothing and returns False.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return False
    coordinator_address = coordinator_address or _first(env, COORDINATOR_VARS)
    if num_processes is None:
        num_processes = _int_var(env, NUM_PROCESSES_VARS)
    if process_id is None:
        process_id = _int_var(env, PROCESS_ID_VARS)

    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if all(value is None for value in given.values()):
        hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
        if hosts and "," not in hosts:
            return False                              # a single-host TPU slice: one process
        if env.get(AUTODETECT_VAR, "") not in ("", "0") or on_tpu(env):
            jax.distributed.initialize(**kwargs)      # JAX's cluster detection finds all three
            return True
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"initialize: num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        described = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"initialize: got {described}; a multi-process run needs all three (missing "
                         f"{missing}); set them as arguments or through {COORDINATOR_VARS[0]}, "
                         f"{NUM_PROCESSES_VARS[0]} and {PROCESS_ID_VARS[0]}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"initialize: process_id must be in [0, num_processes) = [0, {num_processes}), "
                         f"got {process_id}")
    if ":" not in coordinator_address:
        raise ValueError(f"initialize: coordinator_address must be 'host:port', got {coordinator_address!r}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    return True


def on_tpu(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is a TPU host, judged without starting JAX's backend (which must wait until after
    ``jax.distributed.initialize``): TPU environment variables, ``JAX_PLATFORMS`` naming tpu, or TPU
    chips on the PCI bus (the check JAX itself makes before loading libtpu)."""
    env = os.environ if env is None else env
    if any(env.get(name) for name in TPU_ENV_VARS) or "tpu" in env.get("JAX_PLATFORMS", "").lower():
        return True
    try:
        from jax._src import hardware_utils  # private: guarded, with /dev/accel* as the fallback

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return bool(glob.glob("/dev/accel[0-9]*"))


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if env.get(name):
            return env[name]
    return None


def _int_var(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if env.get(name):
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"initialize: the environment variable {name}={env[name]!r} is not an "
                                 f"integer") from None
    return None
