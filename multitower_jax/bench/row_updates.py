"""`multitower bench rows`: the train step that updates the large tables through the batch's rows
(``optim.sparse_row_updates``, `train.batch_rows`) against the plain row-wise Adagrad step.

Both are the real jitted step (`Trainer.train_step`) of the same config, on the same random
batches, each from its own initial state; the steps alternate (the order flips every step), so a
neighbour's load slows both alike. The config must give some embedding tables row-wise Adagrad
(``optim.large_table_optimizer = "rowwise_adagrad"``, ``optim.large_table_bytes``); the larger
the tables against the batch, the more the plain step's pass over every row costs.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.config_checks import ConfigError
from multitower_jax.data import fake
from multitower_jax.train import sharding
from multitower_jax.train.optim import param_names
from multitower_jax.train.trainer import Trainer

WAYS = ("batch_rows", "plain")


def _with(config: ml_collections.ConfigDict, sparse: bool) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config.to_dict())
    out.optim.sparse_row_updates = sparse
    return out


def run(config: ml_collections.ConfigDict, json_path: str | None = None, steps: int = 10) -> dict:
    spec = F.parse_spec(config.features)
    trainers = {way: Trainer(_with(config, way == "batch_rows"), workdir=None) for way in WAYS}
    rows = trainers["batch_rows"].batch_rows
    if rows is None:
        raise ConfigError("bench rows: the config gives no embedding table row-wise Adagrad; set "
                          "--config.optim.large_table_optimizer=rowwise_adagrad and --config.optim.large_table_bytes "
                          "to a size that selects the large tables")
    placement, batch_size = config.data.placements[0], int(config.data.batch_size)
    mesh = trainers["plain"].mesh
    batches = [sharding.shard_batch(fake.random_batch(spec, placement, batch_size, seed=i), mesh)
               for i in range(steps + 1)]
    states = {way: t.init_state() for way, t in trainers.items()}
    for way, t in trainers.items():  # compile and warm up
        states[way], metrics = t.train_step(states[way], batches[0])
        jax.block_until_ready(metrics)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for i, batch in enumerate(batches[1:]):
        for way in (WAYS if i % 2 == 0 else WAYS[::-1]):
            start = time.perf_counter()
            states[way], metrics = trainers[way].train_step(states[way], batch)
            jax.block_until_ready((states[way], metrics))
            seconds[way].append(time.perf_counter() - start)
    large = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(states["plain"]["params"])[0]
             if param_names(path) in rows.large]
    median = {way: 1000 * float(np.median(s)) for way, s in seconds.items()}
    figures = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch_size": batch_size,
        "steps": steps,
        "large_tables": len(large),
        "large_table_bytes": sum(leaf.nbytes for leaf in large),
        **{f"{way}_step_ms": 1000 * float(np.min(seconds[way])) for way in WAYS},
        **{f"{way}_step_ms_median": median[way] for way in WAYS},
        "speedup_median": median["plain"] / median["batch_rows"],
    }
    bench.report("train step: large tables through the batch's rows against the plain row-wise step", figures,
                 json_path)
    return figures
