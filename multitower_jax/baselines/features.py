"""Raw columns -> the learners' inputs: a hashed sparse matrix (logistic regression) and a
dense table with categorical columns marked (gradient-boosted trees).

Hashed features, each a binary indicator ``hash(field, value) mod 2^bits``:

* ids (``user_id``, ``ad_id``) and every categorical column; multi-hot items
* numeric columns binned at train quantiles (`num_bins`; NaN has its own bin)
* the distinct words of every text column
* crosses of categorical columns from different towers (user x context, user x ad, context x ad)
  whose size is at most `max_cross_size` (device x campaign, hour x industry, ...), and the
  explicit `id_crosses` ("user_id*ad.industry_category": a user's taste for an industry)
* query word x ad title word and query word x description word (every context text x every ad text)
* word-overlap counts between each context text and the ad texts (as small categories)
* derived columns (`text.TextSpace`: names with a ":"): floats binned at train quantiles, ints
  as categories; with LSA topics also query topic x ad topic and user x ad topic
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import scipy.sparse as sp

from multitower_jax import features as F
from multitower_jax.baselines.data import Table, id_keys, overlap_counts, query_and_ad_texts, text_words
from multitower_jax.data.schema import mix64

_CHUNK = 1 << 15  # rows hashed at a time (keeps the [rows, tokens] buffers small)
MAX_OVERLAP = 5  # overlap counts >= this share one category


def _tower(column: str) -> str:
    return column.split(".", 1)[0] if "." in column else "id"


def _hash(field: str, keys: np.ndarray) -> np.ndarray:
    salt = np.uint64(zlib.crc32(field.encode()) * 0x9E3779B1 + 1)
    return mix64(mix64(keys.astype(np.int64).view(np.uint64)) ^ salt)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One key per pair of int64 keys (broadcasting)."""
    return (mix64(np.asarray(a).astype(np.int64).view(np.uint64)) ^ np.asarray(b).astype(np.int64).view(np.uint64)).view(np.int64)


def text_crosses(table: Table) -> list[str]:
    """Query topic x ad topic and user x ad topic, when the LSA topics are there."""
    if "topic:ad" not in table:
        return []
    return [f"{n}*topic:ad" for n in table.derived if n.startswith("topic:") and n != "topic:ad"] + \
        (["user_id*topic:ad"] if "user_id" in table else [])


@dataclasses.dataclass
class HashedFeatures:
    """Fitted on train (numeric bin edges), then turns any split into a CSR matrix."""

    bits: int = 22
    num_bins: int = 16
    max_cross_size: int = 256
    id_crosses: tuple[str, ...] = ()
    word_crosses: bool = True
    edges: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 1 << self.bits

    def fit(self, train: Table) -> HashedFeatures:
        quantiles = np.linspace(0, 1, self.num_bins + 1)[1:-1]
        floats = [n for n in train.derived if train[n].dtype.kind == "f"]
        for name in [*train.of_type(F.Numeric), *floats]:
            x = train[name].astype(np.float64)
            x = x[np.isfinite(x)]
            self.edges[name] = np.unique(np.quantile(x, quantiles)) if x.size else np.zeros(0)
        return self

    def crossed_columns(self, table: Table) -> list[tuple[str, str]]:
        small = [n for n in table.of_type(F.Categorical)
                 if table.features[n].encoding != "hash" and table.features[n].size <= self.max_cross_size]
        return [(a, b) for i, a in enumerate(small) for b in small[i + 1:] if _tower(a) != _tower(b)]

    def transform(self, table: Table, words: dict[str, np.ndarray] | None = None) -> sp.csr_matrix:
        words = text_words(table) if words is None else words
        fields = self._fields(table, words)  # name -> (int64 keys [n, k], valid [n, k])
        mask = np.uint64(self.dim - 1)
        indptr, indices = [np.zeros(1, np.int64)], []
        for start in range(0, len(table), _CHUNK):
            rows = slice(start, start + _CHUNK)
            buckets = np.concatenate([(_hash(name, keys[rows]) & mask).astype(np.int64)
                                      for name, (keys, _) in fields.items()], axis=1)
            valid = np.concatenate([v[rows] for _, v in fields.values()], axis=1)
            indices.append(buckets[valid].astype(np.int32))
            indptr.append(indptr[-1][-1] + np.cumsum(valid.sum(1)))
        indices = np.concatenate(indices)
        matrix = sp.csr_matrix((np.ones(len(indices), np.float32), indices, np.concatenate(indptr)),
                               shape=(len(table), self.dim))
        matrix.sum_duplicates()  # two tokens of a row in one bucket: one feature of value 2
        return matrix

    def _fields(self, table: Table, words: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        n = len(table)
        one = lambda k: (k.reshape(n, 1), np.ones((n, 1), bool))  # noqa: E731
        fields = {}
        for name in ("user_id", "ad_id"):
            if name in table:
                fields[name] = one(table[name])
        for name in table.of_type(F.Categorical):
            fields[name] = one(table[name])
        for name in table.of_type(F.MultiHot):
            fields[name] = (table[name], table[name] >= 0)
        for name in [*table.of_type(F.Numeric), *table.derived]:
            if name in self.edges:
                x = table[name].astype(np.float64)
                fields[name] = one(np.where(np.isfinite(x), np.searchsorted(self.edges[name], x), -1))
            elif name in table.derived and table[name].dtype.kind in "iu":
                fields[name] = one(table[name])
        for name, w in words.items():
            fields[f"words:{name}"] = (w, w > 0)
        for a, b in self.crossed_columns(table):
            fields[f"{a}*{b}"] = one(_cross(table[a], table[b]))
        for cross in [*self.id_crosses, *text_crosses(table)]:
            fields[cross] = one(id_keys(table, cross))
        queries, ads = query_and_ad_texts(table)
        if self.word_crosses:
            for q in queries:
                for a in ads:
                    wq, wa = words[q][:, :, None], words[a][:, None, :]
                    fields[f"words:{q}*{a}"] = (_cross(wq, wa).reshape(n, -1), ((wq > 0) & (wa > 0)).reshape(n, -1))
        for name, count in overlap_counts(table, words).items():
            if name.startswith("overlap:"):
                fields[name] = one(np.minimum(count, MAX_OVERLAP))
        return fields


def frequent_columns(X_train: sp.csr_matrix, min_count: int) -> np.ndarray:
    """The columns (hash buckets) present in at least `min_count` train rows, sorted."""
    columns, counts = np.unique(X_train.indices, return_counts=True)
    return columns[counts >= min_count]


def select_columns(X: sp.csr_matrix, columns: np.ndarray) -> sp.csr_matrix:
    """X restricted to the given sorted columns, renumbered 0..len(columns)-1 (a weight that no
    train row touches stays 0 under L2 anyway, so dropping unseen buckets loses nothing)."""
    remap = np.full(X.shape[1], -1, np.int64)
    remap[columns] = np.arange(len(columns))
    new = remap[X.indices]
    keep = new >= 0
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=X.shape[0]))])
    return sp.csr_matrix((X.data[keep], new[keep].astype(np.int32), indptr), shape=(X.shape[0], len(columns)))


@dataclasses.dataclass
class Tabular:
    """A float matrix for the trees: numeric columns, categorical ids of small columns (marked
    categorical; hashed ones are left to the target encodings), word overlaps and text lengths,
    plus any extra columns (the target encodings)."""

    max_categorical_size: int = 64  # larger ones as ordered codes: many-level splits overfit
    names: list[str] = dataclasses.field(default_factory=list)
    categorical: list[str] = dataclasses.field(default_factory=list)

    def transform(self, table: Table, words: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> np.ndarray:
        columns: dict[str, np.ndarray] = {}
        categorical = []
        for name in table.of_type(F.Numeric):
            columns[name] = table[name]
        for name in table.of_type(F.Categorical):
            f = table.features[name]
            if f.encoding != "hash" and f.size <= self.max_categorical_size:
                x = table[name].astype(np.float64)
                columns[name] = np.where((x >= 0) & (x < f.size), x, np.nan)  # out of range: missing
                categorical.append(name)
        columns.update(overlap_counts(table, words))
        for name in table.derived:  # LSA similarities and topics
            columns[name] = table[name]
            if name.startswith("topic:"):
                categorical.append(name)
        columns.update(extra)
        if self.names and list(columns) != self.names:
            raise ValueError(f"columns differ from the fitted ones: {sorted(set(columns) ^ set(self.names))}")
        self.names, self.categorical = list(columns), categorical
        return np.stack([np.asarray(v, np.float32) for v in columns.values()], axis=1)
