"""The grain input pipeline: TFDS ArrayRecord blocks -> shuffled, per-process, preprocessed,
negatively downsampled, fixed-shape batches, with an iterator state that can be saved and restored.

    source (blocks) -> [process_index::process_count] -> shuffle + repeat (train: a new order
    every epoch) -> per block: keep clicks and a `rate` fraction of non-clicks (weight 1/rate),
    preprocess -> rebatch to exactly `batch_size` rows

Every random choice is a function of (seed, position in the stream), so restoring the grain
iterator state resumes with exactly the batches that would have come next.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from multitower_jax import features as F
from multitower_jax.data import builders
from multitower_jax.data.preprocess import STATS_FILE, FeatureStats, Preprocessor, StatsError, compute_stats


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
    """Statistics of the train split of the first placement, cached in the workdir."""
    try:
        return FeatureStats.load(workdir)
    except StatsError:
        if Path(workdir, STATS_FILE).exists():  # present but unreadable: do not overwrite it
            raise
    placement = config.data.placements[0]
    source = data_source(config, placement, "train")
    stats = compute_stats(raw_blocks(source, progress="feature statistics"), spec, placement)
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

    def __post_init__(self):
        self._lock = threading.Lock()

    def __call__(self, index: int, example: Mapping) -> dict:
        block = builders.flatten_block(example)
        n = len(block["click"])
        if self.downsample_rate < 1.0:
            # `index` counts blocks across epochs, so each epoch keeps a different subset.
            rng = np.random.default_rng((self.seed, index))
            is_click = block["click"] == 1
            keep = is_click | (rng.random(n) < self.downsample_rate)
            weight = np.where(is_click, 1.0, 1.0 / self.downsample_rate) if self.importance_weights else np.ones(n)
            block = {k: v[keep] for k, v in block.items()}
            block["weight"] = weight[keep].astype(np.float32)
        with self._lock:  # the tokenizer caches and counters are shared between reader threads
            out = self.preprocessor(block)
        out["valid"] = np.ones(len(out["click"]), np.float32)
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


def make_dataset(config: ml_collections.ConfigDict, spec: F.FeatureSpec, stats: FeatureStats, *,
                 placement: str, split: str, train: bool, batch_size: int | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> Pipeline:
    """The per-process dataset of fixed-shape batches for one placement and split.

    ``batch_size`` is the global batch (default from the config); each process yields
    ``batch_size // process_count`` rows per batch. Training batches repeat forever; evaluation
    goes through the split once, the last batch padded (rows with ``valid == 0``).
    """
    data = config.data
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    global_batch = batch_size or (data.batch_size if train else data.eval_batch_size)
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    local_batch = global_batch // process_count

    ds = grain.MapDataset.source(data_source(config, placement, split))
    ds = ds[process_index::process_count]
    if train:
        ds = ds.shuffle(seed=data.shuffle_seed).repeat(None)
    processor = _BlockProcessor(
        Preprocessor(spec, placement, stats),
        downsample_rate=float(data.negative_downsample_rate) if train else 1.0,
        importance_weights=bool(data.importance_weights),
        seed=int(data.shuffle_seed),
    )
    ds = ds.map_with_index(processor)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.reader_threads, prefetch_buffer_size=8))
    it = grain.experimental.RebatchIterDataset(it, batch_size=local_batch, drop_remainder=train)
    if not train:
        it = it.map(lambda b: _pad_batch(b, local_batch))
    return Pipeline(it, processor.preprocessor)
