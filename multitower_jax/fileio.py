"""Atomic file writes: every file the library writes goes through here.

A file is written under a temporary sibling name and renamed over its target only once it is
complete, so a reader (or a crash) never sees half a file: the target holds the old content or
the new one. Works for local folders and, through `etils.epath`, for gs://... paths.

    fileio.write_json(workdir / "eval_test.json", result)
    with fileio.replacing(path) as tmp:        # for writers that want a path (Parquet, ArrayRecord)
        pq.write_table(table, tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath


def temp_sibling(path: str | os.PathLike) -> epath.Path:
    """``<folder>/.tmp-<pid>-<name>``: hidden, unique per process, same extension as `path`."""
    path = epath.Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[epath.Path]:
    """Yield a temporary path next to `path`; when the block ends without an error, it replaces
    `path` (one rename). On an error the temporary file is removed and `path` is left as it was."""
    path = epath.Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
    path = epath.Path(path)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
    path = epath.Path(path)
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kwargs: Any) -> epath.Path:
    return write_text(path, json.dumps(obj, indent=indent, **kwargs))
