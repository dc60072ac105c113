"""The train iterator's position in an orbax checkpoint, one JSON file per data shard.

Used as ``ocp.args.Composite(..., data=DataSave(iterator))`` / ``DataRestore(iterator)``; see
`train.trainer.Trainer.save` and `restore`.
"""

from __future__ import annotations

import dataclasses
import json
import re

import orbax.checkpoint as ocp
from etils import epath

from multitower_jax import config as config_lib
from multitower_jax.data import pipeline

_SHARD_STATE = re.compile(r"shard_(\d+)-of-(\d+)\.json")


class DataCheckpointHandler(ocp.CheckpointHandler):
    """The train iterator's position, one JSON file per data shard: ``shard_<s>-of-<n>.json``.

    Each process writes the files of the shards it reads and restores its shards' files,
    whichever process wrote them, so a checkpoint resumes on any number of processes that
    divides ``config.data.num_shards`` (grain's own handler keys the state by process index
    and count, so it restores only on the process layout that wrote it).
    """

    def save(self, directory: epath.Path, args: DataSave) -> None:
        it: pipeline.ShardsIterator = args.item
        for shard, state in it.shard_states().items():
            (directory / f"shard_{shard}-of-{it.num_shards}.json").write_text(json.dumps(state, indent=1))

    def restore(self, directory: epath.Path, args: DataRestore) -> pipeline.ShardsIterator:
        it: pipeline.ShardsIterator = args.item
        paths = {shard: directory / f"shard_{shard}-of-{it.num_shards}.json" for shard in it.shards}
        missing = [shard for shard, path in paths.items() if not path.exists()]
        if missing:
            saved = sorted({int(m.group(2)) for p in directory.iterdir() if (m := _SHARD_STATE.fullmatch(p.name))})
            if saved:
                raise config_lib.ConfigError(
                    f"the checkpoint in {directory.parent} was written with config.data.num_shards={saved[0]}, "
                    f"this run has {it.num_shards} data shards: resume with --config.data.num_shards={saved[0]} "
                    f"(the iterator position is saved per shard; 0 means one shard per process)")
            raise FileNotFoundError(
                f"{directory}: no data iterator state for data shard(s) {missing} of {it.num_shards} (found "
                f"{sorted(p.name for p in directory.iterdir())}; a checkpoint from before per-shard states "
                "restores only with trainer.restore(manager) without the iterator)")
        it.set_shard_states({shard: json.loads(path.read_text()) for shard, path in paths.items()})
        it.start_prefetch()
        return it


@ocp.args.register_with_handler(DataCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: pipeline.ShardsIterator


@ocp.args.register_with_handler(DataCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: pipeline.ShardsIterator
