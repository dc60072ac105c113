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
    return Mesh(np.asarray(devices).reshape(data, model), AXES)


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
