"""Which log files make up which split (``config.data.logs``).

Two ways, one or the other:

* by time: ``paths`` (files or globs) and ``validation_start`` / ``test_start``; rows before the
  first go to train, then validation, then test;
* by file: ``split_paths.train`` / ``.validation`` / ``.test`` (files or globs each); every row
  of a split's files belongs to it, whatever its timestamp (ties at a boundary reproduce exactly).
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import re
from collections.abc import Mapping
from pathlib import Path

import ml_collections

SPLITS = ("train", "validation", "test")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
NUMBER = r"^[+-]?\d+(\.\d*)?$"


class LogError(ValueError):
    """A log file breaks the raw column contract; the message names the file, row, field and expectation."""


@dataclasses.dataclass(frozen=True)
class Splits:
    files: tuple[tuple[Path, str], ...]  # (path, format) of every file; by file: train's, validation's, test's
    by_file: Mapping[str, tuple[int, ...]] | None  # split -> indices into `files`; None: split by time
    validation_start: int = 0  # epoch seconds (by time only)
    test_start: int = 0


def split_paths(logs: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """``{split: patterns}`` of ``logs.split_paths`` (a string is one pattern); empty if not given."""
    raw = logs.get("split_paths") or {}
    raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
    out = {s: (v,) if isinstance(v, str) else tuple(v or ()) for s, v in raw.items()}
    return {s: v for s, v in out.items() if v}


def validate(logs: ml_collections.ConfigDict) -> str | None:
    """What is wrong with the choice of splits (None: nothing), naming the keys."""
    by_file = split_paths(logs)
    raw = logs.get("split_paths") or {}
    if unknown := sorted(set(raw) - set(SPLITS)):
        return f"config.data.logs.split_paths: unknown splits {unknown}; expected {list(SPLITS)}"
    paths = (logs.paths,) if isinstance(logs.paths, str) else tuple(logs.paths)
    if by_file:
        given = [k for k in ("paths", "validation_start", "test_start") if (paths if k == "paths" else logs[k])]
        if given:
            return (f"config.data.logs: both split_paths (files per split) and {', '.join(given)} (a split by time) are "
                    "given; use one: clear data.logs.paths, validation_start and test_start, or split_paths")
        if missing := [s for s in SPLITS if s not in by_file]:
            return (f"config.data.logs.split_paths: no files for {', '.join(missing)} (expected files or globs for each "
                    f"of {', '.join(SPLITS)})")
        return None
    if not paths:
        return ("config.data.logs.paths: expected at least one Parquet/CSV/JSONL file (split by validation_start / "
                "test_start), or files per split in data.logs.split_paths.train / validation / test")
    if not (logs.validation_start and logs.test_start):
        return ("config.data.logs.validation_start: expected both data.logs.validation_start and data.logs.test_start "
                "(timestamps splitting train/validation/test), or files per split in data.logs.split_paths, got "
                f"{(logs.validation_start, logs.test_start)!r}")
    return None


def _files(patterns: tuple[str, ...], fmt: str, key: str) -> list[tuple[Path, str]]:
    paths = sorted({Path(p) for pat in patterns for p in glob.glob(os.path.expanduser(str(pat))) if Path(p).is_file()})
    if not paths:
        raise LogError(f"no files match config.{key}={patterns!r}")
    exts = {p: os.path.splitext(re.sub(r"\.(gz|bz2|zst|lz4)$", "", p.name.lower()))[1] for p in paths}
    if fmt == "auto" and (unknown := [str(p) for p, ext in exts.items() if ext not in FORMATS]):
        raise LogError(f"{unknown}: cannot tell the format from the file name; set config.data.logs.format")
    return [(p, FORMATS[ext] if fmt == "auto" else fmt) for p, ext in exts.items()]


def text_seconds(text: str) -> int:
    """Epoch seconds from "1706486400" or an ISO date / datetime (no zone = UTC); ValueError if neither."""
    if re.fullmatch(NUMBER, text := text.strip()):
        return int(float(text) // 1)
    t = datetime.datetime.fromisoformat(text)
    return int((t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).timestamp() // 1)


def resolve(logs: ml_collections.ConfigDict) -> Splits:
    """The files (globs expanded, formats known) and how they split; LogError naming the key."""
    if problem := validate(logs):
        raise LogError(problem)
    if by_file := split_paths(logs):
        files, owner, indices = [], {}, {}
        for split in SPLITS:
            indices[split] = []
            for path, fmt in _files(by_file[split], logs.format, f"data.logs.split_paths.{split}"):
                if path in owner:
                    raise LogError(f"{path}: in both data.logs.split_paths.{owner[path]} and .{split}; a file "
                                   "belongs to one split")
                owner[path] = split
                indices[split].append(len(files))
                files.append((path, fmt))
        return Splits(tuple(files), {s: tuple(i) for s, i in indices.items()})
    paths = (logs.paths,) if isinstance(logs.paths, str) else tuple(logs.paths)
    try:
        start = {k: int(logs[k]) if isinstance(logs[k], int | float) else text_seconds(str(logs[k]))
                 for k in ("validation_start", "test_start")}
    except ValueError:
        raise LogError(f"config.data.logs.validation_start / test_start: expected ISO dates (2024-01-29T06:00Z) or "
                       f"epoch seconds, got {logs.validation_start!r} / {logs.test_start!r}") from None
    if start["validation_start"] > start["test_start"]:
        raise LogError(f"config.data.logs.validation_start is after test_start: {start}")
    return Splits(tuple(_files(paths, logs.format, "data.logs.paths")), None, **start)
