"""Multi-host start-up: ``jax.distributed.initialize()`` from command-line flags or the environment.

Three ways to run:

* one process (the default): nothing to do;
* ``--distributed``: plain ``jax.distributed.initialize()``, which finds the coordinator,
  process count and id itself on Cloud TPU (and under Slurm / Open MPI);
* explicit: ``--coordinator-address HOST:PORT --num-processes N --process-id I`` on every
  process, or the environment variables ``MULTITOWER_COORDINATOR_ADDRESS``,
  ``MULTITOWER_NUM_PROCESSES`` and ``MULTITOWER_PROCESS_ID`` (flags win).

On CPU, cross-process collectives go through gloo over TCP, so the multi-host code paths run
(and are tested) as several processes on one machine with fake devices.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_COORDINATOR = "MULTITOWER_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MULTITOWER_NUM_PROCESSES"
ENV_PROCESS_ID = "MULTITOWER_PROCESS_ID"


class DistributedError(ValueError):
    """Inconsistent or malformed multi-host settings (flags or environment)."""


@dataclass(frozen=True)
class Settings:
    """How this process joins the run. ``auto``: let JAX detect everything (Cloud TPU, Slurm)."""

    auto: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags of `multitower train` / `evaluate`."""
    group = parser.add_argument_group(
        "multi-host", f"run as one of several JAX processes (or set ${ENV_COORDINATOR}, "
                      f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() with auto-detected settings (Cloud TPU, Slurm)")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator service, the same on every process")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes in the run")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0 .. N-1")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name}={value!r}: expected an integer") from None


def settings_from(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve flags (first) and environment (second) into validated settings."""
    env = os.environ if env is None else env
    auto = bool(getattr(args, "distributed", False))
    address = getattr(args, "coordinator_address", None) or env.get(ENV_COORDINATOR) or None
    num = getattr(args, "num_processes", None)
    num = _env_int(env, ENV_NUM_PROCESSES) if num is None else num
    pid = getattr(args, "process_id", None)
    pid = _env_int(env, ENV_PROCESS_ID) if pid is None else pid
    if auto:
        # Explicit values still help detection (e.g. a coordinator address outside Cloud TPU).
        return Settings(True, address, num, pid)
    if address is None and num is None and pid is None:
        return Settings()
    missing = [flag for flag, v in (("--coordinator-address", address), ("--num-processes", num),
                                    ("--process-id", pid)) if v is None]
    if missing:
        raise DistributedError(f"multi-host settings are incomplete: {', '.join(missing)} missing (give all of "
                               f"--coordinator-address, --num-processes and --process-id, or --distributed)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(f"process id {pid} with {num} processes: expected 0 <= id < number of processes")
    return Settings(False, address, num, pid)


def initialize(settings: Settings) -> None:
    """Join the run described by ``settings`` (a no-op for a single process). Call before any JAX work."""
    if not settings.enabled:
        return
    import jax

    # Cross-process collectives on CPU (ignored on TPU / GPU, which bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes, process_id=settings.process_id)


def is_main() -> bool:
    """Process 0 writes logs, summaries and JSON reports; every process takes part in checkpoints."""
    import jax

    return jax.process_index() == 0
