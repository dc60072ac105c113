"""The grain input pipeline: TFDS ArrayRecord blocks -> shuffled, per-process, preprocessed,
negatively downsampled, fixed-shape batches, with an iterator state that can be saved and restored.

    source (blocks) -> shard s: blocks [s::num_shards] -> shuffle + repeat (train: a new order
    every epoch) -> per block: keep clicks and a `rate` fraction of non-clicks (weight 1/rate),
    preprocess -> rebatch to exactly `batch_size / num_shards` rows
    -> each process concatenates the batches of its consecutive shards (its rows of the global batch)

The global batch is the concatenation of every shard's batch in shard order, whichever process
reads which shard, so with a fixed ``data.num_shards`` the same run sees the same global batches
on 1 process or on many. Evaluation shards are padded to one batch count (rows ``valid == 0``)
so every process runs the same number of collective steps. Evaluation batches also carry
``batch[HOST_IDS]``: the rows' int64 impression, user and ad ids, which never go to a device
(JAX holds 32-bit integers), for the predictions file, and whether the row's user and ad were
seen in the train split (`SEEN_COLUMNS`, 0 / 1, from the statistics pass), for the report's
seen / unseen segments.

Every random choice is a function of (seed, shard, position in the shard's stream), so
restoring the grain iterator state resumes with exactly the batches that would have come next.
The state is kept per shard, so it restores whichever process (or process count) wrote it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from multitower_jax import features as F
from multitower_jax.config import ConfigError
from multitower_jax.data import builders
from multitower_jax.data.preprocess import (STATS_FILE, FeatureStats, Preprocessor, StatsError, compute_stats,
                                            pool_stats)

HOST_IDS = "ids"  # evaluation batches: {column: int64[B]} of ID_COLUMNS and SEEN_COLUMNS, kept on the host
ID_COLUMNS = ("impression_id", "user_id", "ad_id")
SEEN_COLUMNS = ("seen_user", "seen_ad")  # 1: the row's user / ad is in the train split (no seen_user
                                         # with statistics written before they kept user ids)


def data_source(config: ml_collections.ConfigDict, placement: str, split: str):
    """Random-access source of raw blocks for one placement and split (TFDS ArrayRecord)."""
    builder = builders.open_dataset(config.data.dir, config.data.source, placement)
    if split not in builder.info.splits:
        raise ValueError(f"{builder.data_dir}: no split {split!r}; has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def raw_blocks(source, progress: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every block of a source in storage order, flattened (for statistics and export)."""
    for i in tqdm(range(len(source)), desc=progress, unit="block", disable=progress is None, leave=False):
        yield builders.flatten_block(source[i])


def load_or_compute_stats(config: ml_collections.ConfigDict, spec: F.FeatureSpec, workdir: str | os.PathLike) -> FeatureStats:
    """Statistics of the train splits of every placement, pooled (`pool_stats`), cached in the workdir.

    They keep each placement's ad impressions and clicks, from which `make_dataset` fills
    ``ad_log_q`` with q(ad) in that placement's downsampled stream (`FeatureStats.ad_log_q`).

    With several processes, each computes the same statistics in memory and only process 0
    writes them; a barrier after every process has looked for the file keeps a slow process
    from reading it while process 0 is still writing.
    """
    try:
        stats = FeatureStats.load(workdir)
    except StatsError:
        if (epath.Path(workdir) / STATS_FILE).exists():  # present but unreadable: do not overwrite it
            raise
        stats = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("feature statistics looked up")
    if stats is not None:
        return stats
    progress = "feature statistics" if jax.process_index() == 0 else None
    stats = pool_stats(compute_stats(raw_blocks(data_source(config, p, "train"), progress=progress), spec, p)
                       for p in config.data.placements)
    if jax.process_index() == 0:
        stats.save(workdir)
    return stats


@dataclasses.dataclass
class _BlockProcessor:
    """Flatten a decoded block, downsample negatives, preprocess. Thread-safe."""

    preprocessor: Preprocessor
    downsample_rate: float
    importance_weights: bool
    seed: int
    keep_ids: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # shared by a process's shards

    def for_shard(self, shard: int):
        """map_with_index function for one shard: its draws differ from every other shard's."""
        return lambda index, example: self(index, example, shard)

    def __call__(self, index: int, example: Mapping, shard: int = 0) -> dict:
        block = builders.flatten_block(example)
        n = len(block["click"])
        if self.downsample_rate < 1.0:
            # `index` counts blocks across epochs, so each epoch keeps a different subset.
            rng = np.random.default_rng((self.seed, shard, index))
            is_click = block["click"] == 1
            keep = is_click | (rng.random(n) < self.downsample_rate)
            weight = np.where(is_click, 1.0, 1.0 / self.downsample_rate) if self.importance_weights else np.ones(n)
            block = {k: v[keep] for k, v in block.items()}
            block["weight"] = weight[keep].astype(np.float32)
        with self.lock:  # the tokenizer caches and counters are shared between reader threads
            out = self.preprocessor(block)
        out["valid"] = np.ones(len(out["click"]), np.float32)
        if self.keep_ids:  # the full 64-bit ids, for the predictions file; they stay on the host
            out[HOST_IDS] = {k: np.asarray(block[k], np.int64) for k in ID_COLUMNS if k in block}
            stats = self.preprocessor.stats
            seen = {"seen_user": stats.seen_users(block["user_id"]), "seen_ad": stats.seen_ads(block["ad_id"])}
            out[HOST_IDS].update({k: v.astype(np.int64) for k, v in seen.items() if v is not None})
        return out


def _pad_batch(batch: dict, batch_size: int) -> dict:
    """Pad the last, short evaluation batch to the fixed shape; padded rows are `valid` 0, weight 0."""
    n = len(batch["click"])
    if n == batch_size:
        return batch
    return jax.tree.map(lambda x: np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)]), batch)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    dataset: grain.IterDataset  # iter(dataset) gives a checkpointable grain DatasetIterator
    preprocessor: Preprocessor  # its report() counts OOV ids and truncated texts

    def __iter__(self):
        return iter(self.dataset)


def num_shards(config: ml_collections.ConfigDict, process_count: int) -> int:
    """``config.data.num_shards`` (0: one per process), checked against the process count."""
    shards = int(config.data.get("num_shards", 0)) or process_count
    if shards < 1 or shards % process_count:
        raise ConfigError(f"config.data.num_shards: expected a positive multiple of the {process_count} "
                          f"processes (or 0 for one shard per process), got {config.data.num_shards}")
    return shards


def eval_batches_per_shard(source, shards: int, shard_batch: int) -> int:
    """Batches in the largest evaluation shard, the same on every process without communication.

    Every stored block is full except the last, so shard sizes follow from the block count,
    the block size and the last block's row count (two reads, not a pass over the split).
    """
    n = len(source)
    if n < shards:
        raise ConfigError(f"config.data.num_shards: an evaluation split has {n} blocks, fewer than the {shards} "
                          f"data shards (one per process by default); lower config.data.block_size")
    block_rows = len(source[0]["click"])  # stored blocks are padded to the block size
    rows = [len(range(s, n, shards)) * block_rows for s in range(shards)]
    rows[(n - 1) % shards] -= block_rows - int(source[n - 1]["num_rows"])
    return max(-(-r // shard_batch) for r in rows)


class _PadBatches(grain.IterDataset):
    """Exactly ``num_batches`` batches: the parent's, then all-padding copies (``valid`` 0)."""

    def __init__(self, parent: grain.IterDataset, num_batches: int):
        super().__init__(parent)
        self._num_batches = num_batches

    def __iter__(self) -> grain.DatasetIterator:
        return _PadBatchesIterator(self._parent.__iter__(), self._num_batches)


class _PadBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, num_batches: int):
        super().__init__(parent)
        self._num_batches, self._count, self._padding = num_batches, 0, None

    def __next__(self) -> dict:
        if self._count >= self._num_batches:
            raise StopIteration
        try:
            batch = next(self._parent)
            if self._padding is None:
                self._padding = jax.tree.map(np.zeros_like, batch)
        except StopIteration:
            batch = self._padding  # never None: every shard holds at least one block
        self._count += 1
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "count": self._count}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._count = state["count"]


def _concat_rows(batches: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


class ShardsIterDataset(grain.IterDataset):
    """This process's shards side by side: each batch concatenates one batch of every shard.

    Its iterator's state is kept per shard (`shard_states`), in a form that does not depend on
    which process reads the shard, so a checkpoint written by one process layout restores on
    another with the same ``num_shards`` (see `train.data_checkpoint.DataCheckpointHandler`).
    """

    def __init__(self, parents: list[grain.IterDataset], shards: list[int], num_shards: int):
        super().__init__(parents)
        self.shards, self.num_shards = list(shards), int(num_shards)

    def __iter__(self) -> ShardsIterator:
        return ShardsIterator([p.__iter__() for p in self._parents], self.shards, self.num_shards)


class ShardsIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], shards: list[int], num_shards: int):
        super().__init__(parents)
        self.shards, self.num_shards = list(shards), int(num_shards)

    def __next__(self) -> dict:
        batches = [next(p) for p in self._parents]  # (a generator would turn StopIteration into an error)
        return batches[0] if len(batches) == 1 else _concat_rows(batches)

    def shard_states(self) -> dict[int, dict]:
        """{shard index: that shard's grain iterator state}."""
        return {shard: p.get_state() for shard, p in zip(self.shards, self._parents)}

    def set_shard_states(self, states: Mapping[int, dict]) -> None:
        missing = [s for s in self.shards if s not in states]
        if missing:
            raise ValueError(f"no saved iterator state for data shard(s) {missing} of {self.num_shards}")
        for shard, p in zip(self.shards, self._parents):
            p.set_state(states[shard])

    def get_state(self) -> dict:
        return {"num_shards": self.num_shards,
                "shards": {str(s): state for s, state in self.shard_states().items()}}

    def set_state(self, state: dict) -> None:
        if int(state["num_shards"]) != self.num_shards:
            raise ConfigError(f"the iterator state is for config.data.num_shards={state['num_shards']}, "
                              f"this pipeline has num_shards={self.num_shards}")
        self.set_shard_states({int(s): v for s, v in state["shards"].items()})


def make_dataset(config: ml_collections.ConfigDict, spec: F.FeatureSpec, stats: FeatureStats, *,
                 placement: str, split: str, train: bool, batch_size: int | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> Pipeline:
    """The per-process dataset of fixed-shape batches for one placement and split.

    ``batch_size`` is the global batch (default from the config); each process yields
    ``batch_size // process_count`` rows per batch, the batches of its ``num_shards /
    process_count`` consecutive shards side by side. Training batches repeat forever; evaluation
    goes through the split once, shards padded to a common batch count (rows with ``valid == 0``).
    ``ad_log_q`` is log q(ad) in the stream the batches come from: this placement's train rows,
    downsampled at ``data.negative_downsample_rate`` for training and not at all for evaluation.
    """
    data = config.data
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    shards = num_shards(config, process_count)
    global_batch = batch_size or (data.batch_size if train else data.eval_batch_size)
    if global_batch % shards:
        raise ConfigError(f"batch size {global_batch} is not divisible by the {shards} data shards "
                          f"(config.data.num_shards, or the {process_count} processes)")
    shard_batch = global_batch // shards

    source = data_source(config, placement, split)
    rate = float(data.negative_downsample_rate) if train else 1.0
    processor = _BlockProcessor(
        Preprocessor(spec, placement, stats, downsample_rate=rate),  # ad_log_q: q(ad) in this stream
        downsample_rate=rate,
        importance_weights=bool(data.importance_weights),
        seed=int(data.shuffle_seed),
        keep_ids=not train,
    )
    eval_batches = None if train else eval_batches_per_shard(source, shards, shard_batch)
    per_process = shards // process_count
    parts, mine = [], range(process_index * per_process, (process_index + 1) * per_process)
    for shard in mine:
        ds = grain.MapDataset.source(source)[shard::shards]
        if train:
            ds = ds.shuffle(seed=data.shuffle_seed).repeat(None)
        ds = ds.map_with_index(processor.for_shard(shard))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.reader_threads, prefetch_buffer_size=8))
        it = grain.experimental.RebatchIterDataset(it, batch_size=shard_batch, drop_remainder=train)
        if not train:
            it = _PadBatches(it.map(lambda b: _pad_batch(b, shard_batch)), eval_batches)
        parts.append(it)
    return Pipeline(ShardsIterDataset(parts, list(mine), shards), processor.preprocessor)
