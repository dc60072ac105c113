"""Ad and user catalogues: the entities behind the impressions, as `multitower export` reads them.

A catalogue holds one row per id with the tower's feature columns in their stored form (what the
TFDS datasets hold: vocab indices, `stable_hash64` keys, multi-hot lists padded with -1, dense
vectors), plus ``bid`` for ads. `generate` writes the synthetic world's; `ingest` writes the
latest row of every ad and user seen in the logs (`LatestById`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from multitower_jax import fileio

CATALOGUE_DIR = "catalogue"
DEFAULT_BID = 1.0  # an ad's bid when the logs have no bid column (map one with data.logs.columns.bid)


def to_arrow(table: Mapping[str, np.ndarray]) -> pa.Table:
    """Columns as Arrow: 2-d arrays (dense vectors, multi-hot lists) become fixed-size lists."""
    columns = {}
    for name, col in table.items():
        col = np.asarray(col)
        if col.ndim == 2:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(col.reshape(-1)), col.shape[1])
        else:
            columns[name] = pa.array(col.tolist() if col.dtype == object else col)
    return pa.table(columns)


def write(folder: str | os.PathLike, name: str, table: pa.Table) -> epath.Path:
    """``<folder>/catalogue/<name>.parquet``, written atomically."""
    path = epath.Path(folder) / CATALOGUE_DIR / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.replacing(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


class LatestById:
    """The newest row of every id in a stream of chunks: the largest ``timestamp``, ties broken by
    the largest ``impression_id`` (so the result does not depend on the order rows arrive in).
    Memory stays about twice the number of distinct ids (plus one chunk)."""

    def __init__(self, id_column: str, columns: list[str]):
        self.id_column, self.columns = id_column, list(columns)
        self._parts: list[dict[str, np.ndarray]] = []
        self._rows = self._merged = 0

    def add(self, chunk: Mapping[str, np.ndarray]) -> None:
        keep = [self.id_column, "timestamp", "impression_id", *self.columns]
        self._parts.append(_newest({k: np.asarray(chunk[k]) for k in keep}, self.id_column))
        self._rows += len(self._parts[-1][self.id_column])
        if self._rows > 2 * self._merged + 65_536:
            self._merge()

    def _merge(self) -> None:
        if len(self._parts) > 1:
            both = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
            self._parts = [_newest(both, self.id_column)]
        self._rows = self._merged = len(self._parts[0][self.id_column]) if self._parts else 0

    def table(self) -> dict[str, np.ndarray]:
        """``{id_column: ids (ascending), column: values}`` of the newest row per id."""
        self._merge()
        if not self._parts:
            return {}
        part = self._parts[0]
        return {k: part[k] for k in (self.id_column, *self.columns)}


def _newest(rows: Mapping[str, np.ndarray], id_column: str) -> dict[str, np.ndarray]:
    ids = rows[id_column]
    order = np.lexsort((rows["impression_id"], rows["timestamp"], ids))
    last = np.ones(len(order), bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    take = order[last]
    return {k: v[take] for k, v in rows.items()}
