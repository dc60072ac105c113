"""Multi-hot lists: raw items (integer ids, or strings with a ``vocab`` / ``hash`` encoding) -> the
stored form (int64[max_items], -1 pads) -> model ids (int32[max_items], item + 1, 0 = pad).

Stored items by encoding:

* ``ids``: the integer id itself, in [0, size); others are out of vocabulary (dropped by the model).
* ``vocab``: the item's index in the feature's ``vocab``; an unknown string is -1 (a pad: dropped).
* ``hash``: a 64-bit key >= 0, `schema.stable_hash64` of a string with its sign bit cleared (so
  that -1 always means a pad), or an integer item as is (it must be >= 0); the model's id is the
  key's bucket, ``mix64(key) % size + 1``.

A text cell (CSV, or a string in Parquet / JSONL) of a ``vocab`` / ``hash`` feature is split at the
feature's ``separator`` ("Comedy|Drama"), each item stripped of surrounding whitespace, empty
items dropped; a list column (Parquet / JSONL arrays) is taken item by item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from multitower_jax import features as F
from multitower_jax.data import schema

KEY_MASK = np.int64(2**63 - 1)  # clears the sign bit of a string's hash: keys >= 0, -1 stays the pad


def expected(f: F.MultiHot) -> str:
    """What a log cell of this feature should hold, for error messages."""
    if f.encoding == "ids":
        return ("a list of integer ids >= 0 (for lists of strings, give the feature encoding 'vocab' "
                "or 'hash')")
    return (f"a list of strings ({f.encoding} encoding): a list column, or text items separated by "
            f"{f.separator!r}")


def split_text(arr: pa.Array, separator: str) -> tuple[np.ndarray, pa.Array]:
    """(row of each item, items) of text cells like "Comedy|Drama": split at `separator`, items
    stripped of whitespace, empty items (an empty cell, "a||b") dropped."""
    parts = pc.split_pattern(arr, pattern=separator)
    items = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    parents = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = pc.not_equal(items, "").to_numpy(zero_copy_only=False)
    return parents[keep], items.filter(pa.array(keep))


def hash_keys(strings: pa.Array | Sequence[str]) -> np.ndarray:
    """int64 keys >= 0 of string items (each distinct string hashed once)."""
    enc = pc.dictionary_encode(pa.array(strings, pa.string()) if not isinstance(strings, pa.Array) else strings)
    keys = schema.stable_hash64(enc.dictionary.to_pylist()) & KEY_MASK
    return keys[enc.indices.to_numpy(zero_copy_only=False)]


def vocab_indices(strings: pa.Array, f: F.MultiHot) -> np.ndarray:
    """int64 index of each string item in ``f.vocab``; -1 for an unknown one."""
    idx = pc.index_in(strings, value_set=pa.array(f.vocab, pa.string())).fill_null(-1)
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


def pack(parents: np.ndarray, items: np.ndarray, rows: int, max_items: int) -> tuple[np.ndarray, int]:
    """(int64[rows, max_items] lists padded with -1 and cut at max_items, rows that were cut);
    `parents` (the row of each item) ascending."""
    pos = np.arange(len(items)) - np.searchsorted(parents, parents)  # position within its list
    keep = pos < max_items
    out = np.full((rows, max_items), -1, np.int64)
    out[parents[keep], pos[keep]] = items[keep]
    return out, int(np.count_nonzero(np.bincount(parents, minlength=rows) > max_items))


def encode_lists(lists: Sequence[Sequence], f: F.MultiHot) -> np.ndarray:
    """Python lists of raw items (a request's, a catalogue's) -> the stored form: strings by the
    feature's encoding, integers as they are. ValueError for a string item of an ``ids`` feature."""
    parents = np.repeat(np.arange(len(lists)), [len(items) for items in lists]).astype(np.int64)
    flat = [item for items in lists for item in items]
    items = np.zeros(len(flat), np.int64)
    strings = np.array([isinstance(x, str) for x in flat], bool)
    if strings.any():
        text = pa.array([x for x, s in zip(flat, strings) if s], pa.string())
        if f.encoding == "ids":
            raise ValueError(f"feature {f.name!r}: string items {text.to_pylist()[:3]} in a multi-hot list with "
                             "encoding 'ids' (integer ids); give it encoding 'vocab' or 'hash'")
        items[strings] = vocab_indices(text, f) if f.encoding == "vocab" else hash_keys(text)
    items[~strings] = [int(x) for x, s in zip(flat, strings) if not s]
    return pack(parents, items, len(lists), f.max_items)[0]


def model_ids(raw: np.ndarray, f: F.MultiHot) -> np.ndarray:
    """Stored items of a ``hash`` feature -> int32 model ids: the key's bucket + 1; pads (< 0) -> 0."""
    buckets = (schema.mix64(raw) % np.uint64(f.size)).astype(np.int32) + 1
    return np.where(raw < 0, 0, buckets).astype(np.int32)
