"""TFDS builders writing impressions as ArrayRecord (no TensorFlow), one dataset per placement.

Records are *columnar blocks* of ``block_size`` impressions, not single impressions: decoding a
tf.Example costs tens of microseconds in Python whatever its size, so one record per block
amortizes that over the block and lets every later step stay vectorized (>= 100k
examples/s per process). The last block of a split is padded; ``num_rows`` says how many rows
are real. Layout: ``<data_dir>/<builder>/<placement>/<version>/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from multitower_jax import features as F
from multitower_jax import fileio
from multitower_jax.data import schema

SPLITS = ("train", "validation", "test")
VERSION = "1.0.0"
SHUFFLE_BUFFER_ROWS = 65_536

ChunkSource = Callable[[str], Iterator[Mapping[str, np.ndarray]]]


def storage_dtype(dtype: np.dtype, shape: tuple[int, ...]) -> np.dtype:
    """Dense vectors (pre-trained embeddings) are stored as float16: they are most of the bytes,
    and halving them halves read time; the preprocessor casts them back to float32."""
    return np.dtype(np.float16) if dtype == np.float32 and shape else dtype


def _tensor(dtype: np.dtype, shape: tuple[int, ...], block_size: int) -> tfds.features.Tensor:
    dtype = storage_dtype(dtype, shape)
    if dtype == np.dtype(object):
        return tfds.features.Tensor(shape=(block_size, *shape), dtype=np.object_)
    return tfds.features.Tensor(shape=(block_size, *shape), dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def block_features(columns: Mapping[str, tuple[np.dtype, tuple[int, ...]]], block_size: int) -> tfds.features.FeaturesDict:
    """Nested FeaturesDict: meta columns at the top, ``<tower>.<name>`` columns under their tower."""
    nested: dict = {"num_rows": tfds.features.Scalar(dtype=np.int64)}
    for name, (dtype, shape) in columns.items():
        tower, _, fname = name.rpartition(".")
        target = nested.setdefault(tower, {}) if tower else nested
        target[fname] = _tensor(dtype, shape, block_size)
    return tfds.features.FeaturesDict(nested)


def flatten_block(example: Mapping) -> dict[str, np.ndarray]:
    """Decoded block -> flat ``{column: array}`` with the padding rows cut off."""
    n = int(example["num_rows"])
    flat = {}
    for key, value in example.items():
        if key == "num_rows":
            continue
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v[:n] for k, v in value.items()})
        else:
            flat[key] = value[:n]
    return flat


def _nest(block: Mapping[str, np.ndarray], num_rows: int) -> dict:
    nested: dict = {"num_rows": num_rows}
    for name, value in block.items():
        tower, _, fname = name.rpartition(".")
        (nested.setdefault(tower, {}) if tower else nested)[fname] = value
    return nested


def shuffle_rows(chunks: Iterator[Mapping[str, np.ndarray]], buffer_rows: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Permute rows within consecutive windows of ``buffer_rows`` (bounded memory, seeded).

    Logs and the synthetic world come in time order; without this, each stored block would
    hold impressions from the same few minutes, and so would every batch built from it.
    """
    rng = np.random.default_rng(seed)
    pending: list[Mapping[str, np.ndarray]] = []
    pending_rows = 0

    def flush():
        merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
        order = rng.permutation(pending_rows)
        return {k: v[order] for k, v in merged.items()}

    for chunk in chunks:
        pending.append(chunk)
        pending_rows += len(chunk["click"])
        if pending_rows >= buffer_rows:
            yield flush()
            pending, pending_rows = [], 0
    if pending_rows:
        yield flush()


def to_blocks(chunks: Iterator[Mapping[str, np.ndarray]], columns: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
              block_size: int) -> Iterator[tuple[int, dict]]:
    """Regroup chunks of any length into padded blocks of exactly ``block_size`` rows."""
    pending: list[Mapping[str, np.ndarray]] = []
    pending_rows = 0
    index = 0

    def emit(parts, rows):
        block = {}
        for name, (dtype, shape) in columns.items():
            col = np.concatenate([p[name] for p in parts]) if len(parts) > 1 else np.asarray(parts[0][name])
            if rows < block_size:
                pad = np.full((block_size - rows, *shape), "" if dtype == np.dtype(object) else 0, dtype)
                col = np.concatenate([col.astype(dtype, copy=False), pad])
            block[name] = col.astype(storage_dtype(dtype, shape), copy=False)
        return _nest(block, rows)

    for chunk in chunks:
        n = len(chunk["click"])
        start = 0
        while start < n:
            take = min(block_size - pending_rows, n - start)
            pending.append({k: v[start:start + take] for k, v in chunk.items()})
            pending_rows += take
            start += take
            if pending_rows == block_size:
                yield index, emit(pending, block_size)
                index += 1
                pending, pending_rows = [], 0
    if pending_rows:
        yield index, emit(pending, pending_rows)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self) -> None:
        """A dataset not written yet: tfds would look for its metadata on TFDS's servers, and
        leave an empty temporary folder behind each time. Ours are never there."""


class ImpressionsBuilder(tfds.core.GeneratorBasedBuilder):
    """Impressions of one placement, split train / validation / test, from a chunk source."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, spec: F.FeatureSpec, placement: str, block_size: int, with_oracle: bool,
                 chunk_source: ChunkSource | None = None, metadata: Mapping | None = None, **kwargs):
        self._columns = schema.raw_columns(spec, placement, with_oracle)
        self._block_size = block_size
        self._chunk_source = chunk_source
        self._metadata = dict(metadata or {}, placement=placement, block_size=block_size, with_oracle=with_oracle)
        super().__init__(config=tfds.core.BuilderConfig(name=placement, version=VERSION), file_format="array_record", **kwargs)

    def download_and_prepare(self, **kwargs):
        # Never look for a prebuilt copy on TFDS's servers: no network at run time.
        kwargs.setdefault("download_config", tfds.download.DownloadConfig(try_download_gcs=False))
        super().download_and_prepare(**kwargs)
        store_uncompressed(Path(self.data_dir))

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description="Ad impressions as columnar blocks (multitower_jax).",
            features=block_features(self._columns, self._block_size),
            metadata=tfds.core.MetadataDict(self._metadata),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        chunks = shuffle_rows(self._chunk_source(split), SHUFFLE_BUFFER_ROWS, seed=SPLITS.index(split))
        for index, block in to_blocks(chunks, self._columns, self._block_size):
            yield f"{split}-{index}", block


def store_uncompressed(dataset_dir: Path, batch: int = 512) -> None:
    """Rewrite the dataset's ArrayRecord shards without compression (each file atomically).

    TFDS writes zstd-compressed records; decompressing is the largest single cost of reading a
    block, while float16 embeddings barely compress (+40 % on disk, ~1.4x faster reads).
    """
    for path in sorted(dataset_dir.glob("*.array_record-*")):
        reader = array_record_module.ArrayRecordReader(str(path))
        try:
            if "uncompressed" in reader.writer_options_string():
                continue
            with fileio.replacing(path) as tmp:
                writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1,uncompressed")
                total = reader.num_records()
                for start in range(0, total, batch):
                    for record in reader.read(list(range(start, min(total, start + batch)))):
                        writer.write(record)
                writer.close()
                reader.close()  # before the rename replaces the file it reads
                reader = None
        finally:
            if reader is not None:
                reader.close()


class SyntheticImpressions(ImpressionsBuilder):
    """The built-in synthetic world (`multitower generate`)."""


class LogImpressions(ImpressionsBuilder):
    """A user's own impression logs, Parquet / CSV / JSONL (`multitower ingest`)."""


def builder_class(source: str) -> type[ImpressionsBuilder]:
    return {"synthetic": SyntheticImpressions, "logs": LogImpressions}[source]


def dataset_dir(data_dir: str | os.PathLike, source: str, placement: str) -> Path:
    return Path(data_dir) / builder_class(source).name / placement / VERSION


def open_dataset(data_dir: str | os.PathLike, source: str, placement: str) -> tfds.core.DatasetBuilder:
    """The prepared dataset of one placement, read back without our builder class."""
    path = dataset_dir(data_dir, source, placement)
    if not (path / "dataset_info.json").exists():
        cmd = "generate" if source == "synthetic" else "ingest"
        raise FileNotFoundError(
            f"no prepared {source} dataset for placement {placement!r} at {path}; "
            f"run `multitower {cmd} --config ... --out {data_dir}` first")
    return tfds.builder_from_directory(str(path))
