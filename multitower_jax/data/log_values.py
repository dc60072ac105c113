"""Convert and validate the column values of one chunk read from a logs file (`ChunkSource`).

Numbers, integer ids, string keys (hashed with `schema.stable_hash64`), timestamps, 0/1 labels,
lists, dense vectors and multi-hot items are converted with vectorized Arrow / numpy operations
and checked; a wrong value raises a `LogError` naming the file, its 1-based row, our column and
the file's column. `logs` converts each chunk's columns with a `ChunkSource`.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from multitower_jax import features as F
from multitower_jax.data import multi_hot, schema
from multitower_jax.data.log_splits import LogError

_FLOAT16_MAX = 65504.0  # dense vectors are stored as float16 (builders.storage_dtype)
_NUMBER = r"^[+-]?\d+(\.\d*)?$"
TEXT = (pa.string(), pa.large_string())


class Said(str):
    """A description of what was found (shown as is), not a value (shown with repr)."""


def arrow_to_numpy(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


@dataclasses.dataclass(frozen=True)
class ChunkSource:
    """Where the values of one chunk came from: converts them, and names their row when one is wrong."""
    path: Path
    row: Callable[[int], int]  # value index -> 1-based data row in the file; composed lazily, used on errors
    names: Mapping[str, str]  # our column -> file column
    csv: bool  # CSV values are all text: integer-looking ids are ids, not strings to hash

    def error(self, column: str, i: int, expected: str, got) -> LogError:
        got = got.as_py() if isinstance(got, pa.Scalar) else got.item() if isinstance(got, np.generic) else got
        shown = got if isinstance(got, Said) else repr(got)
        return LogError(f"{self.path}: row {self.row(i)}: column {column!r} (file column "
                        f"{self.names.get(column, column)!r}): expected {expected}, got {shown[:100]}")

    def check(self, bad: np.ndarray, column: str, expected: str, got=None) -> None:
        """Raise for the first row where `bad` is True, showing got[i] (or got(i) if callable)."""
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.error(column, i, expected, got(i) if callable(got) else None if got is None else got[i])

    def sub(self, index: np.ndarray) -> ChunkSource:
        return dataclasses.replace(self, row=lambda i: self.row(int(index[i])))

    def cast(self, arr: pa.Array, to: pa.DataType, column: str, expected: str) -> pa.Array:
        """Arrow cast; on failure, bisect to the first value that does not cast and name its row."""
        try:
            return pc.cast(arr, to)
        except pa.ArrowNotImplementedError:
            raise self.error(column, 0, expected, Said(f"a column of type {arr.type}")) from None
        except pa.ArrowInvalid:
            lo, hi = 0, len(arr)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                try:
                    pc.cast(arr[lo:mid], to)
                    lo = mid
                except pa.ArrowInvalid:
                    hi = mid
            raise self.error(column, lo, expected, arr[lo]) from None

    def floats(self, arr: pa.Array, column: str, expected: str = "a number") -> np.ndarray:
        if arr.type in TEXT:
            arr = self.cast(pc.utf8_trim_whitespace(arr), pa.float64(), column, expected)
        elif not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type)):
            raise self.error(column, 0, expected, Said(f"a column of type {arr.type}"))
        x = np.asarray(arrow_to_numpy(arr), np.float64)
        self.check(~np.isfinite(x), column, f"{expected} (finite)", x)
        return x

    def ints(self, arr: pa.Array, column: str, expected: str) -> np.ndarray:
        if pa.types.is_integer(arr.type):
            return arrow_to_numpy(arr).astype(np.int64, copy=False)
        if arr.type in TEXT:
            return arrow_to_numpy(self.cast(pc.utf8_trim_whitespace(arr), pa.int64(), column, expected))
        x = self.floats(arr, column, expected)
        self.check(x != np.round(x), column, expected, x)
        return x.astype(np.int64)

    def keys(self, arr: pa.Array, column: str) -> np.ndarray:
        """Integer ids kept, strings hashed with stable_hash64 (CSV: integer-looking text is an id)."""
        if arr.type not in TEXT:
            return self.ints(arr, column, "an integer id or a string")
        numeric = arrow_to_numpy(pc.match_substring_regex(arr, r"^\s*[+-]?\d{1,18}\s*$")) if self.csv else np.zeros(len(arr), bool)
        out = np.zeros(len(arr), np.int64)
        out[numeric] = arrow_to_numpy(pc.cast(pc.utf8_trim_whitespace(arr.filter(pa.array(numeric))), pa.int64()))
        enc = pc.dictionary_encode(arr.filter(pa.array(~numeric)))  # hash each distinct string once: ids repeat
        out[~numeric] = schema.stable_hash64(enc.dictionary.to_pylist())[arrow_to_numpy(enc.indices)]
        return out

    def seconds(self, arr: pa.Array, column: str) -> np.ndarray:
        """Epoch seconds from ints, floats, Arrow timestamps / dates or ISO strings (no zone = UTC)."""
        expected = "epoch seconds, an ISO date/datetime or a timestamp"
        arr = pc.cast(arr, pa.timestamp("s")) if pa.types.is_date(arr.type) else arr
        if pa.types.is_timestamp(arr.type):
            return arrow_to_numpy(pc.cast(arr, pa.int64())) // 10 ** {"s": 0, "ms": 3, "us": 6, "ns": 9}[arr.type.unit]
        arr = pc.utf8_trim_whitespace(arr) if arr.type in TEXT else arr
        if arr.type in TEXT and not pc.any(pc.match_substring_regex(arr, _NUMBER)).as_py():
            # ISO dates / datetimes, all with a zone offset like the first value, or all without (= UTC)
            zoned = re.search(r"(Z|[+-]\d\d:?\d\d)$", arr[0].as_py()) is not None
            iso = self.cast(arr, pa.timestamp("ns", "UTC" if zoned else None), column,
                            f"an ISO date/datetime {'with' if zoned else 'without'} a zone offset, like row 1")
            return arrow_to_numpy(pc.cast(iso, pa.int64())) // 10**9
        x = np.floor(self.floats(arr, column, expected)).astype(np.int64)
        self.check(np.abs(x) > 10**11, column, "epoch seconds (this looks like milliseconds)", x)  # > year 5000
        return x

    def binary(self, arr: pa.Array, column: str) -> np.ndarray:
        if pa.types.is_boolean(arr.type):
            return arrow_to_numpy(arr).astype(np.int64)
        if arr.type in TEXT:
            idx = pc.index_in(pc.utf8_lower(pc.utf8_trim_whitespace(arr)),
                              value_set=pa.array(["0", "1", "false", "true", "0.0", "1.0"]))
            self.check(arrow_to_numpy(idx.is_null()), column, "0 or 1", arr)
            return arrow_to_numpy(idx).astype(np.int64) % 2
        x = self.floats(arr, column, "0 or 1")
        self.check((x != 0) & (x != 1), column, "0 or 1", x)
        return x.astype(np.int64)

    def lists(self, arr: pa.Array, column: str, expected: str, separators: str) -> tuple[np.ndarray, pa.Array]:
        """(row of each value, values) of a list column, or of text lists like "3|5|7" or "0.1 0.2"."""
        if arr.type in TEXT:  # separators become spaces: splitting on whitespace is ~8x faster than a regex
            for separator in separators:
                arr = pc.replace_substring(arr, separator, " ")
            parts = pc.ascii_split_whitespace(pc.utf8_trim(arr, characters=" \t[]"))
            values, parents = pc.list_flatten(parts), arrow_to_numpy(pc.list_parent_indices(parts))
            keep = pc.not_equal(values, "")  # "" splits into [""]: an empty list
            return parents[arrow_to_numpy(keep)].astype(np.int64), values.filter(keep)
        if not isinstance(arr.type, pa.ListType | pa.LargeListType | pa.FixedSizeListType):
            raise self.error(column, 0, expected, Said(f"a column of type {arr.type}"))
        values, parents = pc.list_flatten(arr), arrow_to_numpy(pc.list_parent_indices(arr)).astype(np.int64)
        self.sub(parents).check(arrow_to_numpy(values.is_null()), column, expected, lambda i: Said("a null item"))
        return parents, values

    def dense(self, arr: pa.Array, column: str, f: F.Dense) -> np.ndarray:
        expected = f"a list of {f.dim} numbers"
        parents, values = self.lists(arr, column, expected, ",;")
        lengths = np.bincount(parents, minlength=len(arr))
        self.check(lengths != f.dim, column, expected, lambda i: Said(f"a list of {lengths[i]} numbers"))
        x = self.sub(parents).floats(values, column, expected).reshape(len(arr), f.dim)
        biggest = np.abs(x).max(axis=1, initial=0.0)
        self.check(biggest > _FLOAT16_MAX, column, f"values within +-{_FLOAT16_MAX} (stored as float16)", biggest)
        return x.astype(np.float32)

    def multi_hot(self, arr: pa.Array, column: str, f: F.MultiHot, counts: dict[str, Counter]) -> np.ndarray:
        """A list column, or text lists ("3|5|7"; for vocab / hash: "Comedy|Drama" split at the
        feature's separator) -> the stored form (see `multi_hot`)."""
        expected = multi_hot.expected(f)
        if f.encoding != "ids" and arr.type in TEXT:
            parents, values = multi_hot.split_text(arr, f.separator)
        else:
            parents, values = self.lists(arr, column, expected, "|,;")
        src = self.sub(parents)
        if not len(values):
            items = np.zeros(0, np.int64)
        elif f.encoding == "vocab":
            items = multi_hot.vocab_indices(values if values.type in TEXT else src.cast(
                values, pa.string(), column, expected), f)
        elif f.encoding == "hash" and values.type in TEXT:  # CSV: integer-looking items are ids, as categoricals'
            numeric = arrow_to_numpy(pc.match_substring_regex(values, r"^\s*[+-]?\d{1,18}\s*$")) if self.csv else None
            items = multi_hot.hash_keys(values)
            if numeric is not None and numeric.any():
                items[numeric] = arrow_to_numpy(pc.cast(pc.utf8_trim_whitespace(values.filter(pa.array(numeric))), pa.int64()))
        else:
            items = src.ints(values, column, expected)
        src.check(items < (-1 if f.encoding == "vocab" else 0), column, expected, items)  # vocab: -1 = unknown
        out, cut = multi_hot.pack(parents, items, len(arr), f.max_items)
        counts["truncated_multi_hot"][column] += cut
        kept = items[np.arange(len(items)) - np.searchsorted(parents, parents) < f.max_items]
        if f.encoding != "hash":  # a hash has no unknown items
            counts["oov"][column] += int(np.count_nonzero((kept < 0) | (kept >= f.size)))
        return out
