"""Running launchers (`python -m experiments.X`) as a user does, for the kill / preemption / resume tests."""
import os
import subprocess
import sys
import time

from lm.logging_utils import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(module, workdir, *extra, env):
    """Start a launcher; its output goes to WORKDIR.log (a pipe nobody reads could fill up and block it)."""
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    log = open(workdir + ".log", "a")
    cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *extra]
    # One core: XLA:CPU's multi-threaded kernels may differ in the last bit from call to call (jax-ml/jax#39741),
    # which would hide what these tests check, that resuming reproduces the run exactly.
    cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    return proc


def finish(proc, returncode=0):
    """Wait for a launcher and check its exit status (its log's end in the message otherwise)."""
    proc.wait(timeout=600)
    with open(proc.log_path) as f:
        assert proc.returncode == returncode, f.read()[-3000:]


def signal_after(proc, workdir, step, sig):
    """Send `sig` to a launcher once its metrics.jsonl has logged `step`; returns its exit status."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None and not any(r["step"] >= step for r in read_metrics(metrics)):
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be signalled after step {step}"
    os.kill(proc.pid, sig)  # taskset execs the launcher: the same process
    return proc.wait(timeout=600)


def cache_env(tmp_path):
    """The environment with a persistent compilation cache shared by a test's launches."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
