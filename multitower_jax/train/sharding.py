"""The device mesh, logical-axis rules and sharded batches (jax.jit + NamedSharding; no pmap).

Parameters carry logical axis names (e.g. an embedding table is ("vocab", "embed")); the
rules in ``config.sharding.rules`` map each name to a mesh axis or to None (replicated), so
sharding a large table along "model" is a config change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh; ``config.mesh.data = -1`` takes every device not used by "model"."""
    devices = jax.devices() if devices is None else devices
    model = int(config.mesh.model)
    data = int(config.mesh.data)
    if data == -1:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"config.mesh: data={config.mesh.data} x model={model} does not match "
                         f"the {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    check_replicas_within_processes(grid)
    return Mesh(grid, AXES)


def check_replicas_within_processes(grid: np.ndarray) -> None:
    """Each row of the (data, model) device grid is one data replica; its ``model`` devices must
    belong to one process, since every process feeds only its own rows of the batch."""
    for row, replica in enumerate(grid):
        processes = sorted({d.process_index for d in replica})
        if len(processes) > 1:
            per_process = sum(d.process_index == processes[0] for d in grid.flat)
            raise ValueError(
                f"config.mesh: data replica {row} (mesh.model={grid.shape[1]} devices "
                f"{[d.id for d in replica]}) spans processes {processes}; the model devices of a replica must "
                f"belong to one process, so mesh.model must divide the {per_process} devices of each process "
                "(and each process's devices must be consecutive in the device list)")


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    return tuple((str(name), axis) for name, axis in config.sharding.rules)


def state_shardings(abstract_state: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (boxed) state pytree: logical names -> mesh axes, the rest replicated."""
    specs = nn.get_partition_spec(abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Mapping, mesh: Mesh) -> Any:
    """This process's rows -> one global jax.Array per leaf, sharded along "data"."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
