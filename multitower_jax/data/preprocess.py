"""Raw impression columns -> model-ready arrays (ids, normalization, tokenization), vectorized per block.

Normalization statistics come from the training split only (`compute_stats`) and are saved in
the workdir, so training, evaluation and serving normalize identically. The same pass counts
ads and users (which rows of an evaluation come from entities seen in train) and, for
categorical and multi-hot features with ``min_count > 1``, the raw values (a list's items), so
values rarer than that in train map to the out-of-vocabulary row 0 (a multi-hot item: dropped)
everywhere (training, evaluation, export, serving).

It also counts, per placement, each ad's train impressions and clicks, so the retrieval loss's
logQ term is the ad's probability in the stream a batch comes from: that placement's train
rows after negative downsampling (`FeatureStats.ad_log_q`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from functools import partial

import numpy as np
from etils import epath

from multitower_jax import features as F
from multitower_jax import fileio
from multitower_jax.data import multi_hot, schema
from multitower_jax.data.tokenizer import HashTokenizer

STATS_FILE = "feature_stats.json"
AD_FREQ_FILE = "ad_frequency.npz"  # ad ids and counts, the user ids, and per placement each ad's
                                   # impressions and clicks, of the train split
KEPT_VALUES_FILE = "kept_values.npz"  # per min_count feature: its raw values seen >= min_count times
_EPS = 1e-6


class StatsError(ValueError):
    """Feature statistics are missing, stale or malformed."""


class PooledLogQWarning(UserWarning):
    """Statistics without per-placement ad counts: logQ falls back to the pooled impression share."""


@dataclasses.dataclass(frozen=True)
class AdCounts:
    """One placement's train counts per ad: sorted distinct ``ad_ids``, their ``impressions`` and
    ``clicks`` (rows with ``click == 1``, the rows negative downsampling always keeps)."""

    ad_ids: np.ndarray  # int64[n], sorted
    impressions: np.ndarray  # int64[n]
    clicks: np.ndarray  # int64[n]


_warned_pooled: set[str] = set()  # workdirs (or placements) already warned about, once per process


@dataclasses.dataclass(frozen=True)
class ValueCounts:
    """The train counts of one categorical column's raw values: sorted distinct ``values`` and
    their ``counts``, for a feature with ``min_count``; values seen fewer than ``floor`` times are
    left out (1: none; saved statistics keep only the values the min_count keeps)."""

    values: np.ndarray  # int64[n], sorted
    counts: np.ndarray  # int64[n]
    min_count: int
    floor: int = 1


class FeatureStats:
    """Mean/std of every numeric column (raw and log1p), ad frequencies, the user ids and the
    counts of the raw values of ``min_count`` features, all from the train split.

    ``user_ids`` is None for statistics written before they were kept (evaluation then cannot
    tell seen from unseen users). ``placement_counts`` ({placement: `AdCounts`}) is None for
    statistics written before they were kept; logQ then uses the pooled share (`ad_log_q`)."""

    def __init__(self, numeric: Mapping[str, Mapping[str, float]], ad_ids: np.ndarray,
                 ad_counts: np.ndarray, num_rows: int, user_ids: np.ndarray | None = None,
                 value_counts: Mapping[str, ValueCounts] | None = None,
                 placement_counts: Mapping[str, AdCounts] | None = None):
        self.numeric = {k: dict(v) for k, v in numeric.items()}
        order = np.argsort(ad_ids)
        self.ad_ids = np.asarray(ad_ids, np.int64)[order]
        self.ad_counts = np.asarray(ad_counts, np.int64)[order]
        self.num_rows = int(num_rows)
        self.user_ids = None if user_ids is None else np.unique(np.asarray(user_ids, np.int64))
        self.value_counts = dict(value_counts or {})
        self.placement_counts = None if placement_counts is None else dict(placement_counts)
        self.source: str | None = None  # the workdir `load` read them from (named in warnings)
        self._log_q_tables: dict = {}  # (placement, rate) -> (sorted ad ids, log q per ad, log q of an unseen ad)

    def seen_users(self, user_id: np.ndarray) -> np.ndarray | None:
        """bool per row: is the user in the train split (None: unknown, old statistics)."""
        return None if self.user_ids is None else _member(self.user_ids, user_id)

    def seen_ads(self, ad_id: np.ndarray) -> np.ndarray:
        """bool per row: is the ad in the train split."""
        return _member(self.ad_ids, ad_id)

    def kept_values(self, column: str, min_count: int) -> np.ndarray:
        """The sorted raw values of `column` seen at least `min_count` times in train."""
        vc = self.value_counts.get(column)
        if vc is None or vc.floor > min_count:
            have = "no value counts" if vc is None else f"value counts for min_count >= {vc.floor} only"
            raise StatsError(f"the feature statistics have {have} for {column!r}, which has min_count={min_count}; "
                             f"recompute them (delete {STATS_FILE} from the workdir)")
        return vc.values[vc.counts >= min_count]

    def mean_std(self, column: str, feature: F.Numeric) -> tuple[float, float]:
        if column not in self.numeric:
            raise StatsError(f"no statistics for numeric column {column!r}; recompute them "
                             f"(delete {STATS_FILE} from the workdir)")
        s = self.numeric[column]
        prefix = "log1p_" if feature.log1p else ""
        return s[prefix + "mean"], s[prefix + "std"]

    def ad_log_q(self, ad_id: np.ndarray, placement: str | None = None,
                 downsample_rate: float = 1.0) -> np.ndarray:
        """log q(ad) per row: the ad's probability among the rows of the stream a batch comes from.

        With a ``placement``, that placement's train rows after keeping every click and a
        ``downsample_rate`` fraction r of the non-clicks (r = 1: no downsampling)::

            q_p(ad) = (clicks_p(ad) + r nonclicks_p(ad)) / (clicks_p + r nonclicks_p)

        Without one (or, with a one-time `PooledLogQWarning`, for statistics written before the
        per-placement counts were kept, or that lack this placement), the ad's share of every
        placement's train impressions, which ignores placement and downsampling. Old statistics
        are not recomputed: a run resumed from an old workdir keeps the logQ it started with.
        An ad unseen in the stream counts as seen once (one kept row). For one placement without
        downsampling both are the same numbers, bit for bit.
        """
        key = (placement, float(downsample_rate))
        table = self._log_q_tables.get(key)
        if table is None:
            table = self._log_q_tables[key] = self._log_q_table(placement, float(downsample_rate))
        ids, log_q, unseen = table
        ad_id = np.asarray(ad_id, np.int64)
        if not len(ids):
            return np.full(ad_id.shape, unseen, np.float32)
        pos = np.minimum(np.searchsorted(ids, ad_id), len(ids) - 1)
        return np.where(ids[pos] == ad_id, log_q[pos], unseen)

    def _log_q_table(self, placement: str | None, rate: float) -> tuple[np.ndarray, np.ndarray, np.float32]:
        counts = None if placement is None or self.placement_counts is None else self.placement_counts.get(placement)
        if counts is None:
            if placement is not None and len(self.ad_ids):  # no ads counted at all (a benchmark's stand-in
                self._warn_pooled(placement)                 # statistics): nothing to be pooled over
            # float64 logs of the integer counts, then float32: the values logQ has always had
            log_total = np.log(max(self.num_rows, 1))
            return self.ad_ids, (np.log(self.ad_counts) - log_total).astype(np.float32), np.float32(0.0 - log_total)
        if not 0 < rate <= 1:
            raise ValueError(f"downsample_rate: expected a fraction in (0, 1], got {rate}")
        clicks = counts.clicks.astype(np.float64)  # exact: counts stay far below 2^53
        kept = clicks + rate * (counts.impressions - clicks)  # r = 1: exactly the impressions
        total = clicks.sum() + rate * (counts.impressions.sum() - clicks.sum())
        log_total = np.log(total) if total > 0 else 0.0
        return counts.ad_ids, (np.log(kept) - log_total).astype(np.float32), np.float32(0.0 - log_total)

    def _warn_pooled(self, placement: str) -> None:
        where = self.source or "in memory"
        why = ("were written before per-placement ad counts were kept" if self.placement_counts is None
               else f"have no ad counts for placement {placement!r}")
        key = f"{where}\0{placement if self.placement_counts is not None else ''}"
        if key in _warned_pooled:
            return
        _warned_pooled.add(key)
        warnings.warn(f"the feature statistics ({where}) {why}; logQ uses each ad's share of all train "
                      f"impressions, which ignores placement and negative downsampling (delete "
                      f"{STATS_FILE} and {AD_FREQ_FILE} to recompute them for a new run)",
                      PooledLogQWarning, stacklevel=4)

    def save(self, workdir: str | os.PathLike) -> None:
        """Write the statistics into ``workdir``: a local folder or gs://... (through etils.epath)."""
        workdir = epath.Path(workdir)  # never pathlib.Path: it turns gs://bucket/run into gs:/bucket/run
        workdir.mkdir(parents=True, exist_ok=True)
        fileio.write_bytes(workdir / STATS_FILE, json.dumps(
            {"num_rows": self.num_rows, "numeric": self.numeric}, indent=2, sort_keys=True).encode())
        buffer = io.BytesIO()  # np.savez(path) would open the path with the local file system
        users = {} if self.user_ids is None else {"user_ids": self.user_ids}
        per_placement = {}
        for placement, c in (self.placement_counts or {}).items():
            per_placement.update({f"placement_ad_ids:{placement}": c.ad_ids,
                                  f"placement_impressions:{placement}": c.impressions,
                                  f"placement_clicks:{placement}": c.clicks})
        if self.placement_counts is not None:  # present (even if empty): not statistics from an old version
            per_placement["placements"] = np.array(sorted(self.placement_counts), dtype=np.str_)
        np.savez(buffer, ad_ids=self.ad_ids, ad_counts=self.ad_counts, **users, **per_placement)
        fileio.write_bytes(workdir / AD_FREQ_FILE, buffer.getvalue())
        if self.value_counts:  # only the values a min_count keeps: they are all a run needs
            arrays = {}
            for column, vc in self.value_counts.items():
                keep = vc.counts >= vc.min_count
                arrays.update({f"values:{column}": vc.values[keep], f"counts:{column}": vc.counts[keep],
                               f"floor:{column}": np.int64(max(vc.floor, vc.min_count))})
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            fileio.write_bytes(workdir / KEPT_VALUES_FILE, buffer.getvalue())

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> FeatureStats:
        """Read statistics `save` wrote. Files from older versions load too: without user ids
        (``user_ids`` None) or without per-placement ad counts (``placement_counts`` None: logQ
        falls back to the pooled share, with a one-time warning, see `ad_log_q`)."""
        workdir = epath.Path(workdir)
        try:
            meta = json.loads((workdir / STATS_FILE).read_text())
            value_counts = {}
            if (workdir / KEPT_VALUES_FILE).exists():  # absent: no feature had min_count > 1
                with np.load(io.BytesIO((workdir / KEPT_VALUES_FILE).read_bytes())) as z:
                    for column in (k.split(":", 1)[1] for k in z.files if k.startswith("values:")):
                        floor = int(z[f"floor:{column}"])
                        value_counts[column] = ValueCounts(z[f"values:{column}"], z[f"counts:{column}"], floor, floor)
            with np.load(io.BytesIO((workdir / AD_FREQ_FILE).read_bytes())) as z:
                placement_counts = None
                if "placements" in z.files:
                    placement_counts = {str(p): AdCounts(z[f"placement_ad_ids:{p}"], z[f"placement_impressions:{p}"],
                                                         z[f"placement_clicks:{p}"]) for p in z["placements"]}
                stats = cls(meta["numeric"], z["ad_ids"], z["ad_counts"], meta["num_rows"],
                            user_ids=z["user_ids"] if "user_ids" in z.files else None, value_counts=value_counts,
                            placement_counts=placement_counts)
            stats.source = str(workdir)
            return stats
        except (OSError, KeyError, ValueError) as e:
            raise StatsError(f"cannot read feature statistics in {workdir}: {e}") from None


def pool_stats(parts: Iterable[FeatureStats]) -> FeatureStats:
    """The statistics of the union of several train splits (e.g. one per placement).

    Exact: a column's pooled mean and (population) variance follow from each part's row count,
    mean and variance; a column only some parts have (a placement's context features) pools
    over those parts. Ad frequencies add up (the pooled logQ is an ad's share of all
    impressions); per-placement ad counts are kept per placement (added up if two parts have the
    same placement), and are None if any part lacks them.
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
    ad_ids, ad_counts = _merge_counts([p.ad_ids for p in parts], [p.ad_counts for p in parts])
    users = None if any(p.user_ids is None for p in parts) else np.unique(np.concatenate([p.user_ids for p in parts]))
    value_counts = {}  # a value's count is its count over every part that has the column
    for column in dict.fromkeys(c for p in parts for c in p.value_counts):
        have = [p.value_counts[column] for p in parts if column in p.value_counts]
        values, counts = _merge_counts([v.values for v in have], [v.counts for v in have])
        value_counts[column] = ValueCounts(values, counts, max(v.min_count for v in have), max(v.floor for v in have))
    placement_counts = None
    if all(p.placement_counts is not None for p in parts):
        placement_counts = {}
        for placement in dict.fromkeys(c for p in parts for c in p.placement_counts):
            have = [p.placement_counts[placement] for p in parts if placement in p.placement_counts]
            ids, impressions = _merge_counts([c.ad_ids for c in have], [c.impressions for c in have])
            _, clicks = _merge_counts([c.ad_ids for c in have], [c.clicks for c in have])  # the same ids, aligned
            placement_counts[placement] = AdCounts(ids, impressions, clicks)
    return FeatureStats(numeric, ad_ids, ad_counts, sum(p.num_rows for p in parts), users, value_counts,
                        placement_counts)


def _member(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bool per element of x: is it in `sorted_values` (sorted, distinct int64)."""
    x = np.asarray(x, np.int64)
    if not len(sorted_values):
        return np.zeros(x.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_values, x), len(sorted_values) - 1)
    return sorted_values[pos] == x


def _merge_counts(values: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, summed counts) of several (values, counts) lists."""
    if not values:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    distinct, inverse = np.unique(np.concatenate(values).astype(np.int64), return_inverse=True)
    weights = np.concatenate(counts).astype(np.float64)  # exact: counts stay far below 2^53
    return distinct, np.bincount(inverse.reshape(-1), weights, len(distinct)).astype(np.int64)


class _CountAccumulator:
    """Counts the distinct values of a stream of int64 arrays; memory O(distinct values)."""

    MERGE_AT = 1 << 18  # pending entries that trigger a merge, at least

    def __init__(self):
        self.values: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.merged = self.pending = 0  # distinct values after the last merge, entries added since

    def add(self, x: np.ndarray) -> None:
        values, counts = np.unique(np.asarray(x, np.int64), return_counts=True)
        self.values.append(values)
        self.counts.append(counts)
        self.pending += len(values)
        if self.pending > max(self.merged, self.MERGE_AT):  # merge when the parts outgrow the total: amortized O(n log n)
            values, counts = self.result()
            self.values, self.counts, self.merged, self.pending = [values], [counts], len(values), 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return _merge_counts(self.values, self.counts)


def compute_stats(blocks: Iterable[Mapping[str, np.ndarray]], spec: F.FeatureSpec, placement: str) -> FeatureStats:
    """One streaming pass over raw training blocks (float64 accumulators)."""
    numeric_cols = [c for c, f in spec.columns(placement).items() if isinstance(f, F.Numeric)]
    min_counts = {c: f.min_count for c, f in spec.columns(placement).items()
                  if isinstance(f, F.Categorical | F.MultiHot) and f.min_count > 1}
    acc = {c: np.zeros(4) for c in numeric_cols}  # sum x, sum x^2, sum log1p x, sum log1p^2
    ads, users, clicked_ads = _CountAccumulator(), _CountAccumulator(), _CountAccumulator()
    values = {c: _CountAccumulator() for c in min_counts}  # the raw values, before hashing
    n = 0
    for block in blocks:
        n += len(block["ad_id"])
        ads.add(block["ad_id"])
        clicked_ads.add(np.asarray(block["ad_id"])[np.asarray(block["click"]) == 1])  # == 1: what downsampling keeps
        users.add(block["user_id"])
        for c, counter in values.items():  # a multi-hot list counts each item, never a pad (-1)
            counter.add(block[c][block[c] >= 0] if np.ndim(block[c]) > 1 else block[c])
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
    value_counts = {c: ValueCounts(*counter.result(), min_counts[c]) for c, counter in values.items()}
    ad_ids, impressions = ads.result()
    clicked, click_counts = clicked_ads.result()
    clicks = np.zeros(len(ad_ids), np.int64)
    clicks[np.searchsorted(ad_ids, clicked)] = click_counts  # every clicked ad is an impressed ad
    return FeatureStats(numeric, ad_ids, impressions, n, user_ids=users.result()[0], value_counts=value_counts,
                        placement_counts={placement: AdCounts(ad_ids, impressions, clicks)})


class Preprocessor:
    """Turns one raw columnar block into a model batch fragment (see `schema` for both formats).

    One transform per column is built up front, so a block costs a handful of vectorized numpy
    operations per column. Keeps running counts of out-of-vocabulary ids, of ids mapped to the
    out-of-vocabulary row for being rarer than their feature's ``min_count`` in train, and of
    truncated texts. ``ad_log_q`` is for the stream of ``placement`` downsampled at
    ``downsample_rate`` (the rate applied to the blocks before they come here).
    """

    def __init__(self, spec: F.FeatureSpec, placement: str, stats: FeatureStats, downsample_rate: float = 1.0):
        self.stats = stats
        self.placement = placement
        self.downsample_rate = float(downsample_rate)  # of the stream the blocks come from: its logQ
        stats.ad_log_q(np.zeros(0, np.int64), placement, self.downsample_rate)  # the lookup table, built
        # (and any warning given) now, in the caller's thread, not in a reader thread
        self.towers = spec.towers(placement)
        self.transforms = {
            tower: {f.name: self._transform(f"{tower}.{f.name}", f) for f in tower_spec.features}
            for tower, tower_spec in self.towers.items()
        }
        self.oov_counts: collections.Counter = collections.Counter()
        self.rare_counts: collections.Counter = collections.Counter()
        self.truncated_counts: collections.Counter = collections.Counter()
        self.rows_seen = 0

    def report(self) -> dict:
        return {
            "rows": self.rows_seen,
            "oov": dict(sorted(self.oov_counts.items())),
            "below_min_count": dict(sorted(self.rare_counts.items())),
            "truncated_texts": dict(sorted(self.truncated_counts.items())),
        }

    def _transform(self, column: str, f: F.Feature):
        """raw column -> model input, for one feature."""
        if isinstance(f, F.Categorical) and f.min_count > 1:
            ids_of, kept = self._categorical(column, f), self.stats.kept_values(column, f.min_count)

            def frequent_ids(raw):
                ids = ids_of(raw)
                rare = ~_member(kept, raw)  # the raw value, before hashing: buckets do not pool counts
                if rare.any():
                    self.rare_counts[column] += int(np.count_nonzero(rare & (ids > 0)))
                    ids[rare] = 0
                return ids
            return frequent_ids
        if isinstance(f, F.Categorical):
            return self._categorical(column, f)
        if isinstance(f, F.MultiHot):
            return self._multi_hot(column, f)
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

    def _categorical(self, column: str, f: F.Categorical):
        if f.encoding == "hash":
            size = np.uint64(f.size)
            return lambda raw: (schema.mix64(raw) % size).astype(np.int32) + 1
        return self._ids(column, f.size, pad_is_valid=False)

    def _multi_hot(self, column: str, f: F.MultiHot):
        """Stored items (see `multi_hot`) -> ids + 1, 0 for pads, unknown items and (with min_count)
        items rarer than that in train."""
        ids_of = partial(multi_hot.model_ids, f=f) if f.encoding == "hash" else self._ids(column, f.size, True)
        if f.min_count <= 1:
            return ids_of
        kept = self.stats.kept_values(column, f.min_count)

        def frequent_ids(raw):
            ids = ids_of(raw)
            rare = (raw >= 0) & ~_member(kept, raw)  # the raw item, before hashing: buckets do not pool counts
            if rare.any():
                self.rare_counts[column] += int(np.count_nonzero(rare & (ids > 0)))
                ids[rare] = 0
            return ids
        return frequent_ids

    def _ids(self, column: str, size: int, pad_is_valid: bool):
        def ids(raw):
            ids = raw.astype(np.int32) + 1  # vocab / ids -> 1..size; -1 (unknown, pad) -> 0
            out_of_range = (ids > size) | (ids < (0 if pad_is_valid else 1))
            if out_of_range.any():
                self.oov_counts[column] += int(np.count_nonzero(out_of_range))
                ids[out_of_range] = 0
            return ids
        return ids

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
        out["ad_log_q"] = self.stats.ad_log_q(block["ad_id"], self.placement, self.downsample_rate)
        for name in schema.ORACLE_COLUMNS:
            if name in block:
                out[name] = block[name].astype(np.float32)
        return out
