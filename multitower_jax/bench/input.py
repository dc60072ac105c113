"""`multitower bench input`: examples/s per process through the whole input pipeline.

Reads TFDS ArrayRecord blocks, shuffles, downsamples, tokenizes, normalizes and rebatches to
fixed shapes, exactly as training does; nothing is sent to a device.
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.data import builders, pipeline
from multitower_jax.data.generate import generate


def run(config: ml_collections.ConfigDict, workdir: str, json_path: str | None = None,
        num_batches: int = 300) -> dict:
    spec = F.parse_spec(config.features)
    placement = config.data.placements[0]
    if not config.data.dir:
        config.data.dir = str(Path(workdir) / "data")
    if not builders.dataset_dir(config.data.dir, config.data.source, placement).exists():
        print(f"no dataset at {config.data.dir}: generating the synthetic world there first")
        generate(config, config.data.dir)
    stats = pipeline.load_or_compute_stats(config, spec, workdir)
    pipe = pipeline.make_dataset(config, spec, stats, placement=placement, split="train", train=True)
    it = iter(pipe)
    # The first epoch tokenizes every distinct text once (later epochs hit the cache), so it is
    # timed on its own; the headline figure is the steady state after it.
    epoch_batches = max(1, pipe.preprocessor.stats.num_rows // int(config.data.batch_size))
    start = time.perf_counter()
    for _ in range(epoch_batches):
        next(it)
    first_epoch = epoch_batches * int(config.data.batch_size) / (time.perf_counter() - start)
    rows = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        rows += len(next(it)["click"])
    seconds = time.perf_counter() - start
    figures = {
        "placement": placement,
        "batch_size": int(config.data.batch_size),
        "block_size": int(config.data.block_size),
        "reader_threads": int(config.data.reader_threads),
        "negative_downsample_rate": float(config.data.negative_downsample_rate),
        "examples_per_sec_first_epoch": first_epoch,
        "batches": num_batches,
        "seconds": round(seconds, 3),
        "examples_per_sec": rows / seconds,
    }
    bench.report("input pipeline (one process)", figures, json_path)
    return figures
