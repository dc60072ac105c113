"""The two data contracts: raw impression columns (as stored) and model batches (as fed).

Raw impressions of one placement are columnar: ``dict[column name -> np.ndarray]`` with a
leading row dimension. Column names are ``<tower>.<feature>`` for features plus the meta
columns below. Storage dtypes:

* categorical -> int64: the raw id (``ids``), a 64-bit key (``hash``; strings are hashed to
  int64 on ingest with `stable_hash64`) or an index into ``vocab`` (-1 = unknown)
* numeric -> float32;  text -> str;  dense -> float32[dim];  multi_hot -> int64[max_items], -1 pads:
  ids, vocab indices or hash keys >= 0 by the feature's encoding (see `multi_hot`)

A model batch (what `pipeline` yields and the model consumes), B rows:

* ``batch["user" | "context" | "ad"][feature]``: categorical int32[B] in [0, size] (0 = OOV),
  numeric float32[B] (log1p + standardized), text int32[B, max_len] (0 = pad, 1 = [CLS]
  reserved), dense float16[B, dim] (as stored; the model casts), multi_hot int32[B, max_items] (id + 1, 0 = pad)
* ``click``, ``conversion``, ``weight`` float32[B]; ``user_id``, ``ad_id`` int32[B];
  ``ad_log_q`` float32[B] (log of the ad's share of the batch's stream: its placement's training
  impressions after negative downsampling, for the logQ correction of in-batch negatives); on synthetic data also ``p_click`` and
  ``p_convert_given_click`` float32[B] (the oracle). Evaluation batches also carry ``ids``:
  ``{impression_id, user_id, ad_id}`` int64[B], the full ids, which stay on the host.
"""

from __future__ import annotations

import hashlib

import numpy as np

from multitower_jax import features as F

META_COLUMNS: dict[str, np.dtype] = {
    "impression_id": np.dtype(np.int64),
    "user_id": np.dtype(np.int64),
    "ad_id": np.dtype(np.int64),
    "timestamp": np.dtype(np.int64),  # seconds since the epoch
    "click": np.dtype(np.int64),  # 0 / 1
    "conversion": np.dtype(np.int64),  # 0 / 1, only after a click
}
ORACLE_COLUMNS: dict[str, np.dtype] = {
    "p_click": np.dtype(np.float32),
    "p_convert_given_click": np.dtype(np.float32),
}


def storage(feature: F.Feature) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, per-row shape) of a feature's raw column."""
    if isinstance(feature, F.Categorical):
        return np.dtype(np.int64), ()
    if isinstance(feature, F.Numeric):
        return np.dtype(np.float32), ()
    if isinstance(feature, F.Text):
        return np.dtype(object), ()
    if isinstance(feature, F.Dense):
        return np.dtype(np.float32), (feature.dim,)
    if isinstance(feature, F.MultiHot):
        return np.dtype(np.int64), (feature.max_items,)
    raise TypeError(f"unknown feature {feature!r}")


def raw_columns(spec: F.FeatureSpec, placement: str, with_oracle: bool) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every raw column of one placement's impressions: name -> (dtype, per-row shape)."""
    cols = {name: (dtype, ()) for name, dtype in META_COLUMNS.items()}
    if with_oracle:
        cols.update({name: (dtype, ()) for name, dtype in ORACLE_COLUMNS.items()})
    cols.update({name: storage(f) for name, f in spec.columns(placement).items()})
    return cols


def stable_hash64(values) -> np.ndarray:
    """A process-independent int64 hash of strings (Python's hash() is salted per process)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little", signed=True)
         for v in values],
        dtype=np.int64,
    )


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized: spreads int64 keys evenly over hash buckets."""
    z = keys.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z
