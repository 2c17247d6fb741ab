"""Multi-process (multi-host) setup: join the run, know who is primary, wait for everyone.

Call `initialize(config.distributed)` before anything touches a JAX device. Each process then sees all
global devices in `jax.devices()`, feeds its own rows of every batch (lm.sharding.global_batch) and takes
part in every checkpoint save.
"""
from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def initialize(cfg) -> bool:
    """Start `jax.distributed` when configured; returns whether it was started.

    cfg fields (config values win over the environment):
      coordinator_address: "host:port" of process 0 ("" -> $JAX_COORDINATOR_ADDRESS; still "" -> see auto).
      num_processes: number of processes (<= 0 -> $JAX_NUM_PROCESSES).
      process_id: this process's index (< 0 -> $JAX_PROCESS_ID).
      auto: without an address, let JAX detect the cluster (TPU pods, SLURM, ...); else run single-process.
    """
    address = cfg.coordinator_address or os.environ.get(ENV_ADDRESS, "")
    if not address:
        if cfg.auto:
            jax.distributed.initialize()
            return True
        return False
    count = cfg.num_processes if cfg.num_processes > 0 else int(os.environ.get(ENV_COUNT, "0"))
    index = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get(ENV_ID, "-1"))
    if count <= 0 or not 0 <= index < count:
        raise ValueError(f"distributed: coordinator {address} needs distributed.num_processes (or ${ENV_COUNT}) > 0 "
                         f"and 0 <= distributed.process_id (or ${ENV_ID}) < it; got {count} and {index}")
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    return True


def is_primary() -> bool:
    """True on the process that writes logs and single-writer files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
