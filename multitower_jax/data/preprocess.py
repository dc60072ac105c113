"""Raw impression columns -> model-ready arrays (ids, normalization, tokenization), vectorized per block.

Normalization statistics come from the training split only (`compute_stats`) and are saved in
the workdir, so training, evaluation and serving normalize identically.
"""

from __future__ import annotations

import collections
import io
import json
import os
from collections.abc import Iterable, Mapping
import numpy as np
from etils import epath

from multitower_jax import features as F
from multitower_jax.data import schema
from multitower_jax.data.tokenizer import HashTokenizer

STATS_FILE = "feature_stats.json"
AD_FREQ_FILE = "ad_frequency.npz"
_EPS = 1e-6


class StatsError(ValueError):
    """Feature statistics are missing, stale or malformed."""


class FeatureStats:
    """Mean/std of every numeric column (raw and log1p) and ad frequencies, from the train split."""

    def __init__(self, numeric: Mapping[str, Mapping[str, float]], ad_ids: np.ndarray,
                 ad_counts: np.ndarray, num_rows: int):
        self.numeric = {k: dict(v) for k, v in numeric.items()}
        order = np.argsort(ad_ids)
        self.ad_ids = np.asarray(ad_ids, np.int64)[order]
        self.ad_counts = np.asarray(ad_counts, np.int64)[order]
        self.num_rows = int(num_rows)

    def mean_std(self, column: str, feature: F.Numeric) -> tuple[float, float]:
        if column not in self.numeric:
            raise StatsError(f"no statistics for numeric column {column!r}; recompute them "
                             f"(delete {STATS_FILE} from the workdir)")
        s = self.numeric[column]
        prefix = "log1p_" if feature.log1p else ""
        return s[prefix + "mean"], s[prefix + "std"]

    def ad_log_q(self, ad_id: np.ndarray) -> np.ndarray:
        """log of each ad's share of training impressions; unseen ads count as seen once."""
        pos = np.clip(np.searchsorted(self.ad_ids, ad_id), 0, max(len(self.ad_ids) - 1, 0))
        found = self.ad_ids[pos] == ad_id if len(self.ad_ids) else np.zeros(ad_id.shape, bool)
        counts = np.where(found, self.ad_counts[pos] if len(self.ad_ids) else 1, 1)
        return (np.log(counts) - np.log(max(self.num_rows, 1))).astype(np.float32)

    def save(self, workdir: str | os.PathLike) -> None:
        """Write the statistics into ``workdir``: a local folder or gs://... (through etils.epath)."""
        workdir = epath.Path(workdir)  # never pathlib.Path: it turns gs://bucket/run into gs:/bucket/run
        workdir.mkdir(parents=True, exist_ok=True)
        _atomic_write(workdir / STATS_FILE, json.dumps(
            {"num_rows": self.num_rows, "numeric": self.numeric}, indent=2, sort_keys=True).encode())
        buffer = io.BytesIO()  # np.savez(path) would open the path with the local file system
        np.savez(buffer, ad_ids=self.ad_ids, ad_counts=self.ad_counts)
        _atomic_write(workdir / AD_FREQ_FILE, buffer.getvalue())

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> FeatureStats:
        workdir = epath.Path(workdir)
        try:
            meta = json.loads((workdir / STATS_FILE).read_text())
            with np.load(io.BytesIO((workdir / AD_FREQ_FILE).read_bytes())) as z:
                return cls(meta["numeric"], z["ad_ids"], z["ad_counts"], meta["num_rows"])
        except (OSError, KeyError, ValueError) as e:
            raise StatsError(f"cannot read feature statistics in {workdir}: {e}") from None


def pool_stats(parts: Iterable[FeatureStats]) -> FeatureStats:
    """The statistics of the union of several train splits (e.g. one per placement).

    Exact: a column's pooled mean and (population) variance follow from each part's row count,
    mean and variance; a column only some parts have (a placement's context features) pools
    over those parts. Ad frequencies add up, so logQ is an ad's share of all impressions.
    """
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    moments: dict[str, np.ndarray] = {}  # column -> [rows, sum x, sum x^2, sum l, sum l^2]
    for part in parts:
        n = part.num_rows
        for column, s in part.numeric.items():
            m, sd, lm, lsd = s["mean"], s["std"], s["log1p_mean"], s["log1p_std"]
            moments.setdefault(column, np.zeros(5))
            moments[column] += (n, n * m, n * (sd * sd + m * m), n * lm, n * (lsd * lsd + lm * lm))
    numeric = {}
    for column, (n, sx, sxx, sl, sll) in moments.items():
        mean, lmean = sx / n, sl / n
        numeric[column] = {"mean": float(mean), "std": float(np.sqrt(max(sxx / n - mean * mean, 0.0))),
                           "log1p_mean": float(lmean), "log1p_std": float(np.sqrt(max(sll / n - lmean * lmean, 0.0)))}
    ids, inverse = np.unique(np.concatenate([p.ad_ids for p in parts]), return_inverse=True)
    counts = np.bincount(inverse, np.concatenate([p.ad_counts for p in parts]).astype(np.float64), len(ids))
    return FeatureStats(numeric, ids, counts.astype(np.int64), sum(p.num_rows for p in parts))


def _atomic_write(path: epath.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def compute_stats(blocks: Iterable[Mapping[str, np.ndarray]], spec: F.FeatureSpec, placement: str) -> FeatureStats:
    """One streaming pass over raw training blocks (float64 accumulators)."""
    numeric_cols = [c for c, f in spec.columns(placement).items() if isinstance(f, F.Numeric)]
    acc = {c: np.zeros(4) for c in numeric_cols}  # sum x, sum x^2, sum log1p x, sum log1p^2
    ad_counts: collections.Counter = collections.Counter()
    n = 0
    for block in blocks:
        n += len(block["ad_id"])
        ids, counts = np.unique(block["ad_id"], return_counts=True)
        ad_counts.update(dict(zip(ids.tolist(), counts.tolist())))
        for c in numeric_cols:
            x = block[c].astype(np.float64)
            lx = np.log1p(np.maximum(x, 0.0))
            acc[c] += (x.sum(), (x * x).sum(), lx.sum(), (lx * lx).sum())
    if n == 0:
        raise StatsError("the training split is empty: no rows to compute feature statistics from")
    numeric = {}
    for c, (s, ss, ls, lss) in acc.items():
        mean, lmean = s / n, ls / n
        numeric[c] = {
            "mean": float(mean), "std": float(np.sqrt(max(ss / n - mean * mean, 0.0))),
            "log1p_mean": float(lmean), "log1p_std": float(np.sqrt(max(lss / n - lmean * lmean, 0.0))),
        }
    ids = np.fromiter(ad_counts.keys(), np.int64, len(ad_counts))
    counts = np.fromiter(ad_counts.values(), np.int64, len(ad_counts))
    return FeatureStats(numeric, ids, counts, n)


class Preprocessor:
    """Turns one raw columnar block into a model batch fragment (see `schema` for both formats).

    One transform per column is built up front, so a block costs a handful of vectorized numpy
    operations per column. Keeps running counts of out-of-vocabulary ids and truncated texts.
    """

    def __init__(self, spec: F.FeatureSpec, placement: str, stats: FeatureStats):
        self.stats = stats
        self.towers = spec.towers(placement)
        self.transforms = {
            tower: {f.name: self._transform(f"{tower}.{f.name}", f) for f in tower_spec.features}
            for tower, tower_spec in self.towers.items()
        }
        self.oov_counts: collections.Counter = collections.Counter()
        self.truncated_counts: collections.Counter = collections.Counter()
        self.rows_seen = 0

    def report(self) -> dict:
        return {
            "rows": self.rows_seen,
            "oov": dict(sorted(self.oov_counts.items())),
            "truncated_texts": dict(sorted(self.truncated_counts.items())),
        }

    def _transform(self, column: str, f: F.Feature):
        """raw column -> model input, for one feature."""
        if isinstance(f, F.Categorical) and f.encoding == "hash":
            size = np.uint64(f.size)
            return lambda raw: (schema.mix64(raw) % size).astype(np.int32) + 1
        if isinstance(f, F.Categorical | F.MultiHot):
            size, pad_is_valid = f.size, isinstance(f, F.MultiHot)

            def ids(raw):
                ids = raw.astype(np.int32) + 1  # vocab / ids -> 1..size; -1 (unknown, pad) -> 0
                out_of_range = (ids > size) | (ids < (0 if pad_is_valid else 1))
                if out_of_range.any():
                    self.oov_counts[column] += int(np.count_nonzero(out_of_range))
                    ids[out_of_range] = 0
                return ids
            return ids
        if isinstance(f, F.Numeric):
            mean, std = self.stats.mean_std(column, f) if f.standardize else (0.0, 1.0 - _EPS)
            shift, scale = np.float32(mean), np.float32(1.0 / (std + _EPS))
            if f.log1p:
                return lambda raw: (np.log1p(np.maximum(raw, 0, dtype=np.float32)) - shift) * scale
            return lambda raw: (raw.astype(np.float32) - shift) * scale
        if isinstance(f, F.Text):
            tokenizer = HashTokenizer(f.vocab_size, f.max_len)

            def tokens(raw):
                out, truncated = tokenizer.encode_batch(raw)
                if truncated:
                    self.truncated_counts[column] += truncated
                return out
            return tokens
        if isinstance(f, F.Dense):
            return lambda raw: raw  # float16 as stored: half the bytes to the device; the model casts
        raise TypeError(f"unknown feature {f!r}")

    def __call__(self, block: Mapping[str, np.ndarray]) -> dict:
        n = len(block["click"])
        self.rows_seen += n
        out: dict = {
            tower: {name: fn(block[f"{tower}.{name}"]) for name, fn in transforms.items()}
            for tower, transforms in self.transforms.items()
        }
        out["click"] = block["click"].astype(np.float32)
        out["conversion"] = block["conversion"].astype(np.float32)
        out["weight"] = np.asarray(block["weight"], np.float32) if "weight" in block else np.ones(n, np.float32)
        out["user_id"] = block["user_id"].astype(np.int32)
        out["ad_id"] = block["ad_id"].astype(np.int32)
        out["ad_log_q"] = self.stats.ad_log_q(block["ad_id"])
        for name in schema.ORACLE_COLUMNS:
            if name in block:
                out[name] = block[name].astype(np.float32)
        return out
