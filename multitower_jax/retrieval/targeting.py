"""Ad targeting rules (allowed countries, devices, placements) as per-ad bitsets, and request eligibility.

Catalogue columns (all optional; an empty or missing list means "no restriction"):
    target.countries   list<int>     raw ids of `user.country`
    target.devices     list<int>     raw ids of `user.device_type`
    target.placements  list<string>  placement names (search, product_page, ...)

Each ad stores one uint64 bitset row: an ad restricted to countries {3, 70} has bits 3 and 70 set
in its country words; an unrestricted ad has every bit set. Checking a request is then one
gather + shift + and over the catalogue per attribute: cheap enough to run for every distinct
(country, device, placement) in a batch, and rows are easy to add, replace or delete.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from multitower_jax import features as F

# attribute -> (catalogue column, number of distinct values it can hold)
ATTRIBUTES = {"countries": ("target.countries", 256), "devices": ("target.devices", 64),
              "placements": ("target.placements", 64)}
COLUMNS = tuple(col for col, _ in ATTRIBUTES.values())
_WORDS = {a: -(-n // 64) for a, (_, n) in ATTRIBUTES.items()}
_OFFSET = dict(zip(ATTRIBUTES, np.cumsum([0, *_WORDS.values()])[:-1].tolist()))
NUM_WORDS = sum(_WORDS.values())
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


class TargetingError(ValueError):
    """A catalogue's targeting column holds a value it cannot (unknown placement, id out of range)."""


def untargeted(num_ads: int) -> np.ndarray:
    """Bitsets of `num_ads` ads that may be shown anywhere: uint64[N, NUM_WORDS], all ones."""
    return np.full((num_ads, NUM_WORDS), _ALL, np.uint64)


def encode(lists: dict[str, Sequence[Sequence[int | str]] | None], num_ads: int) -> np.ndarray:
    """Per-attribute lists of allowed values (None or [] = unrestricted) -> bitsets uint64[N, NUM_WORDS]."""
    bits = untargeted(num_ads)
    for attr, values in lists.items():
        if values is None:
            continue
        flat = [(row, v) for row, vs in enumerate(values) for v in (vs or ())]
        _set_bits(bits, attr, np.array([r for r, _ in flat], np.int64), [v for _, v in flat], first_row=0)
    return bits


def from_arrow(batch: pa.RecordBatch | pa.Table, first_row: int, where: str) -> np.ndarray:
    """Bitsets for the rows of a catalogue batch (the columns it lacks leave ads unrestricted)."""
    n = batch.num_rows
    bits = untargeted(n)
    names = batch.schema.names
    for attr, (column, _) in ATTRIBUTES.items():
        if column not in names:
            continue
        col = batch.column(names.index(column))
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
            raise TargetingError(f"{where}: column {column!r} must be a list of allowed values, got {col.type}")
        col = col.fill_null([])
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(n), lengths)
        values = col.flatten().to_numpy(zero_copy_only=False)
        _set_bits(bits, attr, rows, values, first_row, where)
    return bits


def _set_bits(bits: np.ndarray, attr: str, rows: np.ndarray, values, first_row: int,
              where: str = "targeting") -> None:
    column, size = ATTRIBUTES[attr]
    if len(rows) == 0:
        return
    if attr == "placements":
        codes = {p: i for i, p in enumerate(F.PLACEMENTS)}
        bad = [i for i, v in enumerate(values) if v not in codes]
        if bad:
            raise TargetingError(f"{where}: row {first_row + rows[bad[0]]}, column {column!r}: unknown placement "
                                 f"{values[bad[0]]!r}; expected one of {F.PLACEMENTS}")
        ids = np.array([codes[v] for v in values], np.int64)
    else:
        try:
            ids = np.asarray(values).astype(np.int64)
        except (TypeError, ValueError):
            raise TargetingError(f"{where}: column {column!r} must hold integer ids") from None
        bad = np.flatnonzero((ids < 0) | (ids >= size))
        if len(bad):
            raise TargetingError(f"{where}: row {first_row + rows[bad[0]]}, column {column!r}: value {ids[bad[0]]} "
                                 f"is outside [0, {size})")
    off, words = _OFFSET[attr], _WORDS[attr]
    restricted = np.unique(rows)
    bits[restricted, off:off + words] = 0
    np.bitwise_or.at(bits, (rows, off + ids // 64), np.left_shift(np.uint64(1), (ids % 64).astype(np.uint64)))


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """Who is asking, per query of a batch. None: do not filter on that attribute; -1: unknown
    (only ads unrestricted on that attribute qualify)."""

    country: np.ndarray | None = None  # int[B], raw `user.country` ids
    device: np.ndarray | None = None  # int[B], raw `user.device_type` ids
    placement: str | None = None  # one placement for the whole batch

    def keys(self, batch_size: int) -> np.ndarray:
        """int64[B, 3]: (country, device, placement) codes; -2 means not filtered."""
        out = np.full((batch_size, 3), -2, np.int64)
        for j, value in enumerate((self.country, self.device)):
            if value is not None:
                value = np.asarray(value, np.int64).reshape(-1)
                if len(value) != batch_size:
                    raise ValueError(f"eligibility: {('country', 'device')[j]} has {len(value)} entries, "
                                     f"the batch has {batch_size} queries")
                out[:, j] = value
        if self.placement is not None:
            if self.placement not in F.PLACEMENTS:
                raise ValueError(f"eligibility: unknown placement {self.placement!r}; expected one of {F.PLACEMENTS}")
            out[:, 2] = F.PLACEMENTS.index(self.placement)
        return out


def eligible_mask(bits: np.ndarray, key: Sequence[int]) -> np.ndarray:
    """bool[N]: which ads may be shown to one (country, device, placement) code triple."""
    mask = np.ones(len(bits), bool)
    for attr, value in zip(ATTRIBUTES, key):
        if value == -2:
            continue
        column, size = ATTRIBUTES[attr]
        off = _OFFSET[attr]
        if value < 0 or value >= size:  # unknown: only ads that are unrestricted on this attribute
            mask &= (bits[:, off:off + _WORDS[attr]] == _ALL).all(1)
        else:
            word = bits[:, off + value // 64]
            mask &= ((word >> np.uint64(value % 64)) & np.uint64(1)).astype(bool)
    return mask


def allowed(bits_BxFxW: np.ndarray, keys_Bx3: np.ndarray) -> np.ndarray:
    """bool[B, F]: may candidate f of query b be shown to that query's (country, device, placement)?
    The per-candidate form of `eligible_mask`, for filtering what the ANN search returned."""
    ok = np.ones(bits_BxFxW.shape[:2], bool)
    for j, (attr, (_, size)) in enumerate(ATTRIBUTES.items()):
        v = keys_Bx3[:, j]
        if (v == -2).all():
            continue
        off, words = _OFFSET[attr], _WORDS[attr]
        known = (v >= 0) & (v < size)
        safe = np.where(known, v, 0)
        word = np.take_along_axis(bits_BxFxW, (off + safe // 64)[:, None, None], 2)[..., 0]
        bit = ((word >> (safe % 64).astype(np.uint64)[:, None]) & np.uint64(1)).astype(bool)
        unrestricted = (bits_BxFxW[..., off:off + words] == _ALL).all(-1)
        ok &= np.where((v == -2)[:, None], True, np.where(known[:, None], bit, unrestricted))
    return ok


def decode(bits_row: np.ndarray) -> dict[str, list]:
    """One ad's bitset -> {attribute: allowed values} (empty list = unrestricted); for reports and tests."""
    out = {}
    for attr, (_, size) in ATTRIBUTES.items():
        off, words = _OFFSET[attr], _WORDS[attr]
        if (bits_row[off:off + words] == _ALL).all():
            out[attr] = []
            continue
        vals = [v for v in range(size) if (int(bits_row[off + v // 64]) >> (v % 64)) & 1]
        out[attr] = [F.PLACEMENTS[v] for v in vals] if attr == "placements" else vals
    return out
