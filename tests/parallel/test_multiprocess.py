"""A real two-process run on localhost: two OS processes joined by ``zoo.parallel.distributed.initialize``
(``jax.distributed`` with gloo collectives on CPU, two CPU devices each, as a host of a pod has several)
run a train step, data parallel across the processes and FSDP over each one's devices, each feeding
half of the global batch; they must give the losses and params of one process training on the whole
batch (ENV-NOTES §11). Also: how ``initialize`` reads its settings from the environment.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from zoo.parallel import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
LOCAL_DEVICES = 2     # per process
TIMEOUT_S = 120       # for both processes; they take ~20 s on 2 quiet cores, ~45 s at load average 8
TOL = 1e-5            # the gradient all-reduce sums two halves in another order than one device does


def load_worker():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(port: int, process_id: int) -> dict[str, str]:
    env = dict(os.environ)
    # LOCAL_DEVICES CPU devices per process, in place of the 8 that tests/conftest.py sets for this one.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               ZOO_COORDINATOR=f"127.0.0.1:{port}", ZOO_NUM_PROCESSES="2", ZOO_PROCESS_ID=str(process_id))
    for name in ("JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


def start_two_processes(log_dir) -> list[tuple[subprocess.Popen, str]]:
    """Both workers, each writing its output to a file (a pipe nobody reads could fill and block it)."""
    port = free_port()
    started = []
    for pid in range(2):
        log_path = os.path.join(log_dir, f"process_{pid}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, WORKER], cwd=ROOT, env=child_env(port, pid),
                                    stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log_path))
    return started


def stop(started) -> None:
    for proc, _ in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def collect(started) -> list[dict]:
    """Each process's RESULT. If one fails the other is killed at once (it would wait for its peer
    until JAX's heartbeat timeout); a failure shows both outputs."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(proc.poll() is None for proc, _ in started) and time.monotonic() < deadline:
        if any(proc.poll() not in (None, 0) for proc, _ in started):
            break
        time.sleep(0.2)
    failed = any(proc.poll() not in (None, 0) for proc, _ in started)
    timed_out = not failed and any(proc.poll() is None for proc, _ in started)
    stop(started)
    outputs = []
    for _, log_path in started:
        with open(log_path) as log:
            outputs.append(log.read())
    results = []
    for pid, ((proc, _), out) in enumerate(zip(started, outputs, strict=True)):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or len(lines) != 1:
            why = (f"did not finish in {TIMEOUT_S} s" if timed_out
                   else "did not both succeed (-9: stopped here)")
            pytest.fail(f"the two processes {why}: process {pid} exited with {proc.returncode}; outputs:\n"
                        + "\n".join(f"--- process {i} ---\n{o[-3000:]}" for i, o in enumerate(outputs)))
        results.append(json.loads(lines[0][len("RESULT "):]))
    return results


def single_process_run(worker):
    """The whole global batch on one device, with the loop's own (unsharded) jitted step."""
    from zoo.train import make_train_step

    model, optimizer = worker.model_and_optimizer()
    step = make_train_step()
    losses = [float(step(model, optimizer, batch)["loss"]) for batch in worker.global_batches()]
    return losses, worker.param_digest(model)


@pytest.mark.usefixtures("quick_compile")     # tests/conftest.py; the workers set the same
def test_two_process_sharded_train_step_equals_one_process(tmp_path):
    worker = load_worker()
    started = start_two_processes(tmp_path)
    try:
        want_losses, want_digest = single_process_run(worker)     # while the two processes start
    except BaseException:
        stop(started)
        raise
    results = collect(started)
    for pid, result in enumerate(results):
        layout = (result["process"], result["processes"], result["devices"], result["local_devices"])
        assert layout == (pid, 2, 2 * LOCAL_DEVICES, LOCAL_DEVICES)
        assert result["fsdp_sharded_params"] > 0
        np.testing.assert_allclose(result["losses"], want_losses, rtol=0, atol=TOL, err_msg=f"process {pid}")
        np.testing.assert_allclose(result["digest"], want_digest, rtol=TOL, err_msg=f"process {pid}")
    # Not a vacuous comparison: the model learns, so the losses differ from step to step.
    assert len(set(np.round(want_losses, 4))) == len(want_losses)


@pytest.fixture
def recorded_initialize(monkeypatch):
    """``jax.distributed.initialize`` replaced by a recorder (this process must not join a job)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_initialize_reads_zoo_then_jax_environment_variables(recorded_initialize):
    env = {"ZOO_COORDINATOR": "10.0.0.1:1234", "ZOO_NUM_PROCESSES": "4", "ZOO_PROCESS_ID": "3"}
    assert distributed.initialize(env=env) is True
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
           "ZOO_PROCESS_ID": "1"}
    assert distributed.initialize(env=env, initialization_timeout=5) is True
    assert recorded_initialize == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        {"coordinator_address": "10.0.0.2:99", "num_processes": 2, "process_id": 1,
         "initialization_timeout": 5},
    ]


def test_initialize_is_a_no_op_for_one_process_and_autodetects_on_tpu(recorded_initialize):
    assert distributed.initialize(env={}) is False or distributed.on_tpu({})   # this CPU host: no-op
    assert distributed.initialize(env={"ZOO_NUM_PROCESSES": "1"}) is False
    assert distributed.initialize(num_processes=1, env={}) is False
    assert distributed.initialize(env={"TPU_WORKER_HOSTNAMES": "t1v-0"}) is False        # one TPU host
    n_before = len(recorded_initialize)
    assert distributed.initialize(env={"TPU_ACCELERATOR_TYPE": "v5p-64"}) is True
    assert distributed.initialize(env={"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}) is True
    assert distributed.initialize(env={"ZOO_CLUSTER_AUTODETECT": "1"}) is True
    assert recorded_initialize[n_before:] == [{}, {}, {}]      # no arguments: JAX's cluster detection


@pytest.mark.parametrize(("env", "message"), [
    ({"ZOO_NUM_PROCESSES": "2", "ZOO_PROCESS_ID": "0"}, r"missing \['coordinator_address'\]"),
    ({"ZOO_COORDINATOR": "h:1", "ZOO_NUM_PROCESSES": "2", "ZOO_PROCESS_ID": "2"}, r"process_id must be in"),
    ({"ZOO_COORDINATOR": "h:1", "ZOO_NUM_PROCESSES": "two", "ZOO_PROCESS_ID": "0"},
     r"ZOO_NUM_PROCESSES='two'"),
    ({"ZOO_COORDINATOR": "h", "ZOO_NUM_PROCESSES": "2", "ZOO_PROCESS_ID": "0"}, r"'host:port', got 'h'"),
])
def test_initialize_rejects_incomplete_or_bad_settings(recorded_initialize, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(env=env)
    assert recorded_initialize == []
