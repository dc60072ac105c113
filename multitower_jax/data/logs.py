"""Ingest a user's own impression logs (Parquet, CSV, JSONL) into the TFDS builder, strictly validated.

Files are streamed in chunks, columns renamed (``config.data.logs.columns``: ours -> the file's, nested
by tower), converted to `schema.raw_columns` and checked with vectorized Arrow / numpy operations (a row
is looked up only when something is wrong), split by time and mixed by a seeded bounded shuffle buffer.
`ingest` builds next to ``out_dir`` and swaps in only a complete dataset: a failure keeps the old one.
Features ``user.user_id`` / ``ad.ad_id`` (categorical) read the impression's own user / ad id column
unless ``config.data.logs.columns`` maps them elsewhere. A column's values are converted and
checked by `log_values._Source`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax import fileio
from multitower_jax import workdir as workdir_lib
from multitower_jax.data import builders, catalogue, log_splits, schema
from multitower_jax.data.log_splits import FORMATS, LogError  # noqa: F401 (logs.LogError, logs.FORMATS)
from multitower_jax.data.log_values import TEXT, ChunkSource, Said, arrow_to_numpy
from multitower_jax.data.tokenizer import HashTokenizer

REPORT_FILE = "ingest_report.json"
CHUNK_ROWS = 65_536  # rows per Parquet / JSON read batch
SHUFFLE_BUFFER = 65_536  # rows mixed at a time, so that blocks are not time-ordered
WORD_PATTERN = "[0-9a-z]+"  # a word of HashTokenizer (in lower-cased text); a test checks they agree
# Under data.feedback="implicit" a file may leave out the label columns: each row is a click, and
# a conversion only where a conversion column says so.
IMPLICIT_LABELS = {"click": 1, "conversion": 0}
_FAR = 2**62  # beyond any epoch second


@dataclasses.dataclass(frozen=True)
class _Plan:
    placement: str
    files: tuple[tuple[Path, str], ...]  # (path, format)
    names: dict[str, str]  # our column -> file column, for every column we may read
    columns: dict[str, tuple[np.dtype, tuple[int, ...]]]  # schema.raw_columns
    features: dict[str, F.Feature]
    with_oracle: bool
    validation_start: int  # epoch seconds (a split by time)
    test_start: int
    bid_column: str = "bid"  # the file column of an ad's bid (for the ads catalogue), if the files have it
    by_file: Mapping[str, tuple[int, ...]] | None = None  # split -> indices into `files` (None: by time)
    implicit: bool = False  # data.feedback="implicit": every row a click; the label columns are optional


def _utc(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def _flatten(mapping, prefix: str = "") -> dict[str, str]:
    raw = mapping.to_dict() if isinstance(mapping, ml_collections.ConfigDict) else dict(mapping or {})
    return {k: v for key, value in raw.items() for k, v in (_flatten(value, f"{prefix}{key}.").items()
            if isinstance(value, Mapping) else [(prefix + key, str(value))])}


def _file_columns(path: Path, fmt: str) -> list[str]:
    """The columns of a file, from its header only (JSONL: the keys of the first line)."""
    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        with pa.input_stream(str(path), compression="detect") as stream:
            line = stream.read(1 << 22).split(b"\n", 1)[0].decode("utf-8-sig").strip()
        return next(csv.reader([line]), []) if fmt == "csv" else list(json.loads(line)) if line else []
    except (OSError, ValueError, pa.ArrowException) as e:
        raise LogError(f"{path}: cannot read as {fmt}: {e}") from None


def _read(path: Path, fmt: str, wanted: list[str], group: int) -> Iterator[pa.RecordBatch]:
    """Record batches of one Parquet row group, or of a whole CSV / JSONL file."""
    try:
        if fmt == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS, row_groups=[group], columns=wanted)
        elif fmt == "csv":  # all as text, converted here: Arrow would infer types from the first block only
            yield from pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=8 << 20),
                                     convert_options=pcsv.ConvertOptions(
                                         include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string())))
        else:
            table = pjson.read_json(path, read_options=pjson.ReadOptions(block_size=16 << 20))  # fewer, larger batches
            yield from table.select(wanted).to_batches(max_chunksize=CHUNK_ROWS)
    except pa.ArrowInvalid as e:
        raise LogError(f"{path}: cannot read as {fmt}: {_located(path, fmt, e)}") from None


def _located(path: Path, fmt: str, error: Exception) -> str:
    """Arrow's read error with the 1-based line it is about: Arrow counts JSON rows from 0 within a
    block and names a CSV column by number only, so the file is scanned (only on this error path)
    for the first line that does not decode or parse."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if fmt not in ("csv", "jsonl"):
        return message
    header = _file_columns(path, fmt) if fmt == "csv" else []
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            for number, raw in enumerate(stream.read().split(b"\n"), start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    return f"line {number}: not UTF-8 text (byte {e.start + 1} of the line; save the file as UTF-8)"
                if fmt == "jsonl" and line.strip():
                    try:
                        json.loads(line)
                    except ValueError as e:
                        return f"line {number}: not a JSON object ({e.msg} at character {e.colno})"
    except OSError:
        return message
    column = re.search(r"column #(\d+)", message)
    if column and int(column.group(1)) < len(header):
        return f"{message} (column {header[int(column.group(1))]!r})"
    return message


def _plan(config: ml_collections.ConfigDict, spec: F.FeatureSpec, placement: str) -> _Plan:
    logs = config.data.logs
    splits = log_splits.resolve(logs)
    files = splits.files
    everything = schema.raw_columns(spec, placement, with_oracle=True)
    names = _flatten(logs.columns)
    bid_column = names.pop("bid", "bid")
    if unknown := sorted(set(names) - set(everything)):
        raise LogError(f"config.data.logs.columns: unknown columns {unknown}; ours are {[*everything, 'bid']}")
    names.setdefault("timestamp", logs.time_column or "timestamp")
    first_columns = _file_columns(*files[0])
    for feature, meta in (("user.user_id", "user_id"), ("ad.ad_id", "ad_id")):
        # An id feature reads the impression's own user / ad id column unless mapped elsewhere.
        if feature in everything and feature not in names and feature not in first_columns:
            names[feature] = names.get(meta, meta)
    names = {c: names.get(c, c) for c in everything} | {"bid": bid_column}
    with_oracle = all(names[c] in first_columns for c in schema.ORACLE_COLUMNS)
    return _Plan(placement, files, names, schema.raw_columns(spec, placement, with_oracle), spec.columns(placement),
                 with_oracle, splits.validation_start, splits.test_start, bid_column, splits.by_file,
                 config.data.get("feedback", "explicit") == "implicit")


def _convert(batch: pa.RecordBatch, plan: _Plan, src: ChunkSource, counts: dict[str, Counter],
             tokenizers: dict[str, HashTokenizer]) -> dict[str, np.ndarray]:
    """File columns -> our raw columns (the caller adds the timestamp, and impression ids if the file has none)."""
    out: dict[str, np.ndarray] = {}
    for column in (c for c in plan.columns if c != "timestamp" and plan.names[c] in batch.schema.names):
        arr, f = batch.column(plan.names[column]), plan.features.get(column)
        arr = arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr
        if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):  # strings without a UTF-8 mark
            arr = src.cast(arr, pa.string(), column, "UTF-8 text")
        if arr.null_count:
            src.check(arrow_to_numpy(arr.is_null()), column, "a value", None)
        if column in ("click", "conversion"):
            out[column] = src.binary(arr, column)
        elif column in ("impression_id", "user_id", "ad_id") or (isinstance(f, F.Categorical) and f.encoding == "hash"):
            out[column] = src.keys(arr, column)
        elif column in schema.ORACLE_COLUMNS:
            x = src.floats(arr, column, "a probability")
            src.check((x < 0) | (x > 1), column, "a probability in [0, 1]", x)
            out[column] = x.astype(np.float32)
        elif isinstance(f, F.Categorical) and f.encoding == "vocab":
            text = arr if arr.type in TEXT else src.cast(arr, pa.string(), column, "a string")
            idx = pc.index_in(text, value_set=pa.array(f.vocab, pa.string())).fill_null(-1)
            out[column] = arrow_to_numpy(idx).astype(np.int64)
            counts["oov"][column] += int(np.count_nonzero(out[column] < 0))
        elif isinstance(f, F.Categorical):
            out[column] = x = src.ints(arr, column, f"an integer id in [0, {f.size})")
            counts["oov"][column] += int(np.count_nonzero((x < 0) | (x >= f.size)))
        elif isinstance(f, F.Numeric):
            out[column] = x = src.floats(arr, column).astype(np.float32)
            if f.log1p:
                src.check(x < 0, column, "a count >= 0 (a log1p feature), not a negative count", x)
        elif isinstance(f, F.Text):
            if arr.type not in TEXT:
                raise src.error(column, 0, "a string", arr[0])
            # Arrow counts the words of ASCII texts; the tokenizer itself looks at the others.
            ascii_ = arrow_to_numpy(pc.string_is_ascii(arr))
            words = arrow_to_numpy(pc.count_substring_regex(pc.ascii_lower(arr), WORD_PATTERN))
            counts["truncated_text"][column] += int(np.count_nonzero(ascii_ & (words > f.max_len))) + sum(
                tokenizers[column].tokenize(t)[1] for t in arr.filter(pa.array(~ascii_)).to_pylist())
            out[column] = arrow_to_numpy(arr).astype(object)
        elif isinstance(f, F.Dense):
            out[column] = src.dense(arr, column, f)
        elif isinstance(f, F.MultiHot):
            out[column] = src.multi_hot(arr, column, f, counts)
    if plan.bid_column in batch.schema.names:  # for the ads catalogue only; the datasets do not hold it
        out["bid"] = src.floats(batch.column(plan.bid_column), "bid", "a bid (a number > 0)")
        src.check(out["bid"] <= 0, "bid", "a bid > 0", out["bid"])
    else:
        out["bid"] = np.full(batch.num_rows, np.nan)
    if plan.implicit:  # every row is an interaction: a click (and no conversion unless the file says so)
        for column, value in IMPLICIT_LABELS.items():
            out.setdefault(column, np.full(batch.num_rows, value, np.int64))
    src.check((out["conversion"] == 1) & (out["click"] == 0), "conversion", "conversion=0 when click=0",
              lambda i: Said("a conversion without a click (click=0, conversion=1)"))
    return out


def _shuffled(chunks: Iterator[dict[str, np.ndarray]], rng: np.random.Generator, capacity: int) -> Iterator[dict]:
    """A bounded shuffle buffer: holds at most 2 x capacity rows (+ a chunk), emits uniformly drawn rows."""
    buffer, size = [], 0
    for chunk in itertools.chain(chunks, [None]):  # None: the end, emit everything
        if chunk is not None:
            buffer.append(chunk)
            size += len(chunk["click"])
        if size and (size >= 2 * capacity or chunk is None):
            keep = 0 if chunk is None else capacity
            rows, order = {k: np.concatenate([c[k] for c in buffer]) for k in buffer[0]}, rng.permutation(size)
            yield {k: v[order[keep:]] for k, v in rows.items()}
            buffer, size = [{k: v[order[:keep]] for k, v in rows.items()}], keep


def _read_split(plan: _Plan, seed: int, split: str, report: dict, seen: dict) -> Iterator[dict[str, np.ndarray]]:
    """One split's validated, shuffled chunks. `seen` keeps (rows, min time, max time) per row group
    from earlier passes, so that a later pass skips row groups (or files) holding none of its rows."""
    if plan.by_file is None:
        lo, hi = {"train": (-_FAR, plan.validation_start), "validation": (plan.validation_start, plan.test_start),
                  "test": (plan.test_start, _FAR)}[split]
        file_indices, split_by = range(len(plan.files)), {"validation_start": _utc(plan.validation_start),
                                                         "test_start": _utc(plan.test_start)}
    else:  # every row of the split's files
        lo, hi, file_indices = -_FAR, _FAR, plan.by_file[split]
        split_by = {"split_files": {s: [str(plan.files[i][0]) for i in ix] for s, ix in plan.by_file.items()}}
    for key, value in {"placement": plan.placement, "files": [str(p) for p, _ in plan.files], "rows": {}, "splits": {},
                       "with_oracle": plan.with_oracle, **split_by}.items():
        report.setdefault(key, value)
    counts = report["splits"][split] = {k: Counter() for k in ("oov", "truncated_text", "truncated_multi_hot")}
    tokenizers = {c: HashTokenizer(f.vocab_size, f.max_len) for c, f in plan.features.items() if isinstance(f, F.Text)}

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for file_index in file_indices:
            path, fmt = plan.files[file_index]
            have = _file_columns(path, fmt)
            if not have:
                raise LogError(f"{path}: the file is empty (expected " + ("a header line, then one impression per "
                               "line)" if fmt == "csv" else "one JSON object per line)" if fmt == "jsonl" else
                               "columns)"))
            for ours, theirs in plan.names.items():
                optional = ("impression_id", *(IMPLICIT_LABELS if plan.implicit else ()))
                if ours in plan.columns and ours not in optional and theirs not in have:
                    raise LogError(f"{path}: missing column {theirs!r} (our column {ours!r}; map another file "
                                   f"column to it with config.data.logs.columns); the file has columns {have}")
            wanted = list(dict.fromkeys([*(plan.names[c] for c in plan.columns if plan.names[c] in have),
                                         *([plan.bid_column] if plan.bid_column in have else [])]))
            row = 0
            for group in range(pq.ParquetFile(path).num_row_groups if fmt == "parquet" else 1):
                rows, t_min, t_max = seen.get((path, group), (0, _FAR, -_FAR))
                if (path, group) in seen and (t_max < lo or t_min >= hi):
                    row += rows
                    continue
                first = row
                for batch in (b for b in _read(path, fmt, wanted, group) if b.num_rows):
                    n = batch.num_rows
                    src = ChunkSource(path, lambda i, first_row=row + 1: first_row + i, plan.names, fmt == "csv")
                    if (times := batch.column(plan.names["timestamp"])).null_count:
                        src.check(arrow_to_numpy(times.is_null()), "timestamp", "a value", None)
                    ts = src.seconds(times, "timestamp")
                    t_min, t_max = min(t_min, int(ts.min(initial=_FAR))), max(t_max, int(ts.max(initial=-_FAR)))
                    if len(idx := np.flatnonzero((ts >= lo) & (ts < hi))):
                        sub = batch if len(idx) == n else batch.take(pa.array(idx))
                        chunk = _convert(sub, plan, src.sub(idx), counts, tokenizers)
                        chunk["timestamp"] = ts[idx]
                        if "impression_id" not in chunk:  # unique and stable: (file, row)
                            chunk["impression_id"] = (file_index << 40) + row + 1 + idx
                        yield chunk
                    row += n
                seen[(path, group)] = (row - first, t_min, t_max)
            if row == 0:
                raise LogError(f"{path}: no rows (expected at least one impression)")

    total = 0
    for out in _shuffled(chunks(), np.random.default_rng([seed, builders.SPLITS.index(split)]), SHUFFLE_BUFFER):
        total += len(out["click"])
        yield out
    report["rows"][split] = total
    for kind, types in {"oov": (F.Categorical, F.MultiHot), "truncated_text": (F.Text,),
                        "truncated_multi_hot": (F.MultiHot,)}.items():  # totals over the splits read so far
        report[kind] = {c: sum(s[kind].get(c, 0) for s in report["splits"].values()) for c, f in plan.features.items()
                        if isinstance(f, types) and not (kind == "oov" and getattr(f, "encoding", "") == "hash")}
    t_min, t_max = min(s[1] for s in seen.values()), max(s[2] for s in seen.values())
    report["time_range"] = {"min": _utc(t_min), "max": _utc(t_max)} if t_min <= t_max else {}
    if total == 0:
        span = f"{report['time_range'].get('min')} to {report['time_range'].get('max')}"
        raise LogError(f"no rows in the {split} split ({_utc(max(lo, 0))} <= timestamp < {_utc(min(hi, 2**35))}); "
                       f"the files' timestamps run from {span}; check config.data.logs.validation_start and test_start")


def read_chunks(config: ml_collections.ConfigDict, spec: F.FeatureSpec, placement: str, split: str,
                report: dict) -> Iterator[dict[str, np.ndarray]]:
    """Validated, shuffled columnar chunks (`schema.raw_columns`) of one split of the logs; fills `report`."""
    yield from _read_split(_plan(config, spec, placement), int(config.data.shuffle_seed), split, report, {})


def ingest(config: ml_collections.ConfigDict, spec: F.FeatureSpec, out_dir: str | os.PathLike) -> dict:
    """Validate and convert the logs into ``<out_dir>/log_impressions/<placement>/``; return the report,
    also written to ``<out_dir>/ingest_report.json``."""
    start, placement = time.perf_counter(), config.data.logs.placement
    plan = _plan(config, spec, placement)  # bad paths or config fail before anything is built
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report, seen = {}, {}
    ads = catalogue.LatestById("ad_id", ["bid", *(f"ad.{f.name}" for f in spec.ad.features)])
    users = catalogue.LatestById("user_id", [f"user.{f.name}" for f in spec.user.features])

    def chunk_source(split: str) -> Iterator[dict[str, np.ndarray]]:
        for chunk in _read_split(plan, int(config.data.shuffle_seed), split, report, seen):
            ads.add(chunk)
            users.add(chunk)
            yield chunk

    # TFDS deletes an existing dataset before it regenerates one: build next to out_dir instead.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.ingest-", dir=out_dir.parent))
    new, target = builders.dataset_dir(tmp, "logs", placement), builders.dataset_dir(out_dir, "logs", placement)
    try:
        builder = builders.LogImpressions(
            spec=spec, placement=placement, block_size=config.data.block_size, with_oracle=plan.with_oracle,
            chunk_source=chunk_source,
            data_dir=str(tmp), metadata={"files": [str(p) for p, _ in plan.files]})
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["rows_per_second"] = round(sum(report["rows"].values()) / max(report["seconds"], 1e-9))
        target.parent.mkdir(parents=True, exist_ok=True)  # swap: old aside, new in, then the old deleted
        if target.exists():
            target.rename(tmp / "previous")
        new.rename(target)
        report["catalogue"] = _write_catalogues(out_dir, ads.table(), users.table(), plan.bid_column)
        fileio.write_json(out_dir / REPORT_FILE, report, sort_keys=True)
    finally:
        if (tmp / "previous").exists() and not target.exists():  # the swap failed: put the old dataset back
            (tmp / "previous").rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _write_catalogues(out_dir: Path, ads: dict[str, np.ndarray], users: dict[str, np.ndarray],
                      bid_column: str) -> dict:
    """``<out>/catalogue/ads.parquet`` and ``users.parquet`` from the newest row of each id, in the
    form `multitower export` reads; an ad whose newest row has no bid gets `catalogue.DEFAULT_BID`."""
    missing = np.isnan(ads["bid"])
    ads["bid"] = np.where(missing, catalogue.DEFAULT_BID, ads["bid"]).astype(np.float32)
    paths = {name: str(catalogue.write(out_dir, name, catalogue.to_arrow(table)))
             for name, table in (("ads", ads), ("users", users))}
    bid = (f"file column {bid_column!r}" if not missing.all() else
           f"{catalogue.DEFAULT_BID} for every ad (no {bid_column!r} column; map one with data.logs.columns.bid)")
    return {"ads": int(len(ads["ad_id"])), "users": int(len(users["user_id"])), "files": paths, "bid": bid,
            "ads_with_default_bid": int(missing.sum())}


def ingest_command(config: ml_collections.ConfigDict, out: str | os.PathLike) -> dict:
    """`multitower ingest --out D`: refuses a training workdir as D (before reading anything),
    ingests, and writes D/config.json with ``data.dir`` and ``data.logs.paths`` recorded absolute."""
    workdir_lib.refuse_training_workdir(out, "ingest")
    out = workdir_lib.absolute(out)
    config.data.dir = out
    paths = config.data.logs.paths
    config.data.logs.paths = tuple(workdir_lib.absolute(p) for p in ((paths,) if isinstance(paths, str) else paths))
    for split, patterns in log_splits.split_paths(config.data.logs).items():
        config.data.logs.split_paths[split] = tuple(workdir_lib.absolute(p) for p in patterns)
    report = ingest(config, F.parse_spec(config.features), out)
    config_lib.write_resolved(config, out)
    print(json.dumps(report, indent=2))
    return report
