"""The device mesh, logical-axis rules and sharded batches (jax.jit + NamedSharding; no pmap).

Parameters carry logical axis names (e.g. an embedding table is ("vocab", "embed")); the
rules in ``config.sharding.rules`` map each name to a mesh axis or to None (replicated), so
sharding a large table along "model" is a config change.

The batch is split over every device, ``("data", "model")`` together (`BATCH_AXES`): no
device repeats another's rows, so the dense compute is never duplicated, whatever the mesh.
The device order comes from `mesh_utils.create_device_mesh` (neighbours on the TPU torus are
neighbours in the mesh); with several processes, each process's devices form one contiguous
block of the mesh (`create_hybrid_device_mesh` with a process per granule), so each feeds
consecutive rows of the global batch and gathers come back in process order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
BATCH_AXES = ("data", "model")  # the batch's rows are split over every device
# How the row-sharded large tables lie in device memory (``sharding.large_table_layout``, one of
# `config.LARGE_TABLE_LAYOUTS`): as the backend chooses ("default"), or pinned row-major (a row
# contiguous, as lookups and row updates read and write it) or column-major. A TPU keeps an
# [N, 64] float32 array column-major (no padding of 64 to its 128 lanes), and a step then copies
# each large table to row-major and back.
MAJOR_TO_MINOR = {"row_major": (0, 1), "column_major": (1, 0)}
# The layouts pinned: those, and SparseCore's (row-major in tiles of 8 rows, what its lookup and
# update read; with any other layout each call copies the whole table shard: `train.sparsecore`).
LAYOUTS = {**{name: Layout(major_to_minor=order) for name, order in MAJOR_TO_MINOR.items()},
           "sparsecore": Layout(major_to_minor=(0, 1), tiling=((8,),))}


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh; ``config.mesh.data = -1`` takes every device not used by "model"."""
    devices = list(jax.devices() if devices is None else devices)
    model = int(config.mesh.model)
    data = int(config.mesh.data)
    if data == -1:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"config.mesh: data={config.mesh.data} x model={model} does not match "
                         f"the {len(devices)} devices")
    # Every data replica's model devices on one process (checked on the devices in process
    # order, before mesh_utils arranges them within each process).
    by_process = sorted(devices, key=lambda d: d.process_index)
    check_replicas_within_processes(np.asarray(by_process, dtype=object).reshape(data, model))
    grid = device_grid(data, model, devices)
    check_replicas_within_processes(grid)
    return Mesh(grid, AXES)


def device_grid(data: int, model: int, devices: list) -> np.ndarray:
    """The (data, model) device array from `mesh_utils`: on one process `create_device_mesh`;
    on several, each process's devices are one block of ``data / processes`` rows, laid out by
    `create_device_mesh` within the process (`create_hybrid_device_mesh`, a process per granule)."""
    processes = sorted({d.process_index for d in devices})
    if len(processes) == 1:
        return mesh_utils.create_device_mesh((data, model), devices, allow_split_physical_axes=True)
    if data % len(processes):
        per_process = len(devices) // len(processes)
        raise ValueError(f"config.mesh: data={data} must be a multiple of the {len(processes)} processes, so each "
                         f"process's {per_process} devices hold whole data replicas (mesh.model={model} must "
                         f"divide {per_process})")
    return mesh_utils.create_hybrid_device_mesh((data // len(processes), model), (len(processes), 1), devices,
                                                process_is_granule=True, allow_split_physical_axes=True)


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


def state_shardings(abstract_state: Any, mesh: Mesh, rules, large_table_bytes: int = 0) -> Any:
    """NamedShardings for a (boxed) state pytree: logical names -> mesh axes, the rest replicated.

    With `large_table_bytes` > 0, every array whose first logical axis is "vocab" (an embedding
    table, and so also its optimizer moments, which carry the same names) and that holds at
    least that many bytes is row-sharded over *every* device (`BATCH_AXES`) whatever the rules
    say, when its rows divide evenly (pad them with ``model.vocab_multiple``). Each chip then
    holds, updates and reduces only its 1/N of a large table; smaller tables follow the rules.
    Per-row optimizer state of a large table (a "vocab"-first array with its row count) goes with it."""
    specs = nn.get_partition_spec(abstract_state)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    if not large_table_bytes:
        return shardings
    leaves = nn.unbox(abstract_state)
    is_spec = lambda x: isinstance(x, P) or x is None  # noqa: E731

    def vocab_first(leaf, spec) -> bool:
        return isinstance(spec, P) and len(spec) > 0 and spec[0] == "vocab" and hasattr(leaf, "shape")

    # The row counts of the large tables: their per-row optimizer state ([rows], e.g. row-wise
    # Adagrad's accumulator, also "vocab"-first) is row-sharded with them whatever its own size.
    large_rows: set[int] = set()

    def note_large(leaf, spec):
        if vocab_first(leaf, spec) and int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize >= large_table_bytes:
            large_rows.add(int(leaf.shape[0]))

    jax.tree.map(note_large, leaves, specs, is_leaf=is_spec)

    def choose(leaf, spec, sharding):
        if vocab_first(leaf, spec) and leaf.shape[0] in large_rows and leaf.shape[0] % mesh.devices.size == 0:
            return NamedSharding(mesh, P(BATCH_AXES, *([None] * (len(leaf.shape) - 1))))
        return sharding

    return jax.tree.map(choose, leaves, specs, shardings, is_leaf=is_spec)


def pin_large_tables(shardings: Any, abstract_state: Any, layout: str) -> Any:
    """`shardings` (of `state_shardings`) with every 2-D array row-sharded over every device (the
    large tables, their moving average and same-shaped optimizer moments) pinned to `layout`
    (`LAYOUTS`; "default" pins nothing): a `Format` of that layout and its sharding, which
    `jax.jit` and `jax.device_put` take where they take a sharding."""
    if layout not in LAYOUTS:
        return shardings
    row_sharded = P(BATCH_AXES, None)

    def pin(leaf, sharding):
        if len(leaf.shape) == 2 and isinstance(sharding, NamedSharding) and sharding.spec == row_sharded:
            return Format(LAYOUTS[layout], sharding)
        return sharding

    return jax.tree.map(pin, nn.unbox(abstract_state), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every device of the mesh (`BATCH_AXES`), in the mesh's row-major device order."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Mapping, mesh: Mesh) -> Any:
    """This process's rows -> one global jax.Array per leaf, sharded over every device."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
