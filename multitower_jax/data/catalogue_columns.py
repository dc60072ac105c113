"""Catalogue columns (ads and users Parquet) as the numpy arrays the preprocessor expects: values
as the datasets store them, or raw as in the logs (strings for `hash` / `vocab` categoricals,
multi-hot lists of any length). `multitower export` reads the catalogues through it, and the
serving `Ranker` its users catalogue, so both convert a column the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from multitower_jax import features as F
from multitower_jax.data import multi_hot, schema


class CatalogueError(ValueError):
    """A catalogue file lacks a column, or holds nulls or values of the wrong shape."""


def _raw_categorical(col: pa.Array, name: str, feature: F.Categorical, path: Path) -> np.ndarray:
    """A categorical column of strings, as in the logs: `hash` -> `stable_hash64` keys, `vocab` ->
    the value's index in the vocabulary (-1, the OOV row, for others)."""
    if feature.encoding == "hash":
        enc = pc.dictionary_encode(col)  # hash each distinct string once
        return schema.stable_hash64(enc.dictionary.to_pylist())[enc.indices.to_numpy(zero_copy_only=False)]
    if feature.encoding == "vocab":
        idx = pc.index_in(col, value_set=pa.array(feature.vocab, pa.string())).fill_null(-1)
        return idx.to_numpy(zero_copy_only=False).astype(np.int64)
    raise CatalogueError(f"{path}: column {name!r} holds strings, but feature {feature.name!r} has encoding 'ids' "
                         "(integer ids); give it encoding 'hash' or 'vocab', or store the ids")


_STRINGS = (pa.string(), pa.large_string())


def _multi_hot(col: pa.Array, name: str, feature: F.MultiHot, path: Path) -> np.ndarray:
    """Lists of any length (as in the logs) -> [N, max_items] stored items padded with -1, cut:
    integer ids, or for a vocab / hash feature strings (a list column, or text cells such as
    "Comedy|Drama" split at the feature's separator; `multi_hot`)."""
    if col.type in _STRINGS:
        parents, values = multi_hot.split_text(col, feature.separator)
    else:
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(col)
    if values.type in _STRINGS:
        if feature.encoding == "ids":
            raise CatalogueError(f"{path}: column {name!r} holds strings, but feature {feature.name!r} has encoding "
                                 "'ids' (integer ids); give it encoding 'vocab' or 'hash', or store the ids")
        items = (multi_hot.vocab_indices(values, feature) if feature.encoding == "vocab"
                 else multi_hot.hash_keys(values))
    else:
        try:
            items = values.to_numpy(zero_copy_only=False).astype(np.int64)
        except (TypeError, ValueError):
            raise CatalogueError(f"{path}: column {name!r}: expected {multi_hot.expected(feature)}, "
                                 f"got {col.type}") from None
    return multi_hot.pack(parents, items, len(col), feature.max_items)[0]


def read_column(batch: pa.RecordBatch, name: str, feature: F.Feature | type, first_row: int, path: Path) -> np.ndarray:
    """One column of a record batch as the numpy array the preprocessor expects (`feature` is a
    feature of the spec, or a numpy scalar type for ids, bids and quality). Values are taken as
    the datasets store them or raw as in the logs: strings for `hash` / `vocab` categoricals,
    multi-hot lists of any length."""
    col = batch.column(batch.schema.names.index(name))
    if col.null_count:
        bad = first_row + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise CatalogueError(f"{path}: row {bad}, column {name!r} is null")
    if isinstance(feature, F.Categorical) and col.type in _STRINGS:
        return _raw_categorical(col, name, feature, path)
    if isinstance(feature, F.MultiHot) and (isinstance(col.type, pa.ListType | pa.LargeListType)
                                            or (col.type in _STRINGS and feature.encoding != "ids")):
        return _multi_hot(col, name, feature, path)
    if isinstance(feature, F.Dense | F.MultiHot):
        width = feature.dim if isinstance(feature, F.Dense) else feature.max_items
        lengths = col.value_lengths().to_numpy(zero_copy_only=False) if hasattr(col, "value_lengths") else None
        if lengths is None or (lengths != width).any():
            row = 0 if lengths is None else int(np.flatnonzero(lengths != width)[0])
            raise CatalogueError(f"{path}: row {first_row + row}, column {name!r}: expected a list of {width} "
                                 f"values ({type(feature).__name__.lower()} feature), got {col.type}")
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
        return values.astype(np.float16) if isinstance(feature, F.Dense) else values.astype(np.int64)
    if isinstance(feature, F.Text):
        return col.to_numpy(zero_copy_only=False).astype(object)
    try:
        dtype = feature if isinstance(feature, type) else np.float32 if isinstance(feature, F.Numeric) else np.int64
        return col.to_numpy(zero_copy_only=False).astype(dtype)
    except (TypeError, ValueError, pa.ArrowInvalid):
        raise CatalogueError(f"{path}: column {name!r} must be numeric, got {col.type}") from None
