"""Ranking requests: the JSON format, its validation, and raw feature rows -> model inputs.

A request (see experiments/requests/search.json):

    {
      "placement": "search",
      "user_id": 17,                      # cache key; optional when "user" is given
      "user": {"age_bucket": 3, ...},     # raw user.* features; optional when user_id is known
                                          # (cached, or in the users catalogue)
      "context": {"query": "trail running shoes", "hour_of_day": 14, ...},
      "top_n": 10,                        # optional, at most config.serving.top_n
      "country": 3, "device_type": 1      # optional targeting keys (default: from "user", else from
                                          # the cached user or the users catalogue, else unknown)
    }

Feature values are raw, as in the logs: categorical ids (or strings for `hash` / `vocab`
features), numbers, text, lists for dense and multi-hot features. They go through the same
per-feature transforms as training (`Preprocessor.transforms`), so serving cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multitower_jax import features as F
from multitower_jax.data import multi_hot, schema

REQUEST_KEYS = ("placement", "user_id", "user", "context", "top_n", "country", "device_type")


class RequestError(ValueError):
    """A ranking request is malformed: the message names the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Request:
    placement: str
    context: Mapping[str, Any]
    user_id: int | None = None
    user: Mapping[str, Any] | None = None
    top_n: int | None = None
    country: int | None = None
    device_type: int | None = None
    where: str = dataclasses.field(default="request", compare=False)  # names the request in errors


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise RequestError(f"{where}: expected an integer, got {value!r}")
    return int(value)


def parse(obj: Any, placements: Sequence[str], max_top_n: int, where: str = "request") -> Request:
    """Validate a decoded JSON request against the model's placements."""
    if not isinstance(obj, Mapping):
        raise RequestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"{where}: unknown keys {unknown}; expected some of {list(REQUEST_KEYS)}")
    placement = obj.get("placement", placements[0] if len(placements) == 1 else None)
    if placement not in placements:
        raise RequestError(f"{where}.placement: expected one of {list(placements)}, got {placement!r}")
    context = obj.get("context")
    if not isinstance(context, Mapping):
        raise RequestError(f"{where}.context: expected an object of raw context features, got {context!r}")
    user = obj.get("user")
    if user is not None and not isinstance(user, Mapping):
        raise RequestError(f"{where}.user: expected an object of raw user features, got {user!r}")
    user_id = None if obj.get("user_id") is None else _int(obj["user_id"], f"{where}.user_id")
    if user_id is None and user is None:
        raise RequestError(f"{where}: needs a user_id or user features (\"user\")")
    top_n = None if obj.get("top_n") is None else _int(obj["top_n"], f"{where}.top_n")
    if top_n is not None and not 1 <= top_n <= max_top_n:
        raise RequestError(f"{where}.top_n: expected 1..{max_top_n} (config.serving.top_n), got {top_n}")
    keys = {}
    for key, user_key in (("country", "country"), ("device_type", "device_type")):
        value = obj.get(key, (user or {}).get(user_key))
        keys[key] = None if value is None else _int(value, f"{where}.{key}")
    return Request(placement=placement, context=context, user_id=user_id, user=user, top_n=top_n, **keys,
                   where=where)


def load(path: str | Path, placements: Sequence[str], max_top_n: int) -> Request:
    """Read and validate a request JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"request file {path} not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RequestError(f"{path}: not valid JSON ({e})") from None
    return parse(obj, placements, max_top_n, where=str(path))


def raw_column(feature: F.Feature, values: Sequence[Any], where: str) -> np.ndarray:
    """One feature's raw values of B requests -> the storage column the preprocessor expects."""
    dtype, shape = schema.storage(feature)
    try:
        if isinstance(feature, F.Categorical) and feature.encoding == "hash":
            return np.array([schema.stable_hash64([v])[0] if isinstance(v, str) else _int(v, where)
                             for v in values], np.int64)
        if isinstance(feature, F.Categorical) and feature.encoding == "vocab":
            index = {v: i for i, v in enumerate(feature.vocab)}
            return np.array([index.get(v, -1) if isinstance(v, str) else _int(v, where) for v in values], np.int64)
        if isinstance(feature, F.Categorical):
            return np.array([_int(v, where) for v in values], np.int64)
        if isinstance(feature, F.Numeric):
            out = np.array(values, np.float64)
            if out.shape != (len(values),) or not np.isfinite(out).all():
                raise RequestError(f"{where}: expected a finite number, got {values}")
            return out.astype(np.float32)
        if isinstance(feature, F.Text):
            if not all(isinstance(v, str) for v in values):
                raise RequestError(f"{where}: expected a string, got {values}")
            return np.array(values, dtype=object)
        if isinstance(feature, F.Dense):
            out = np.array(values, np.float32)
            if out.shape != (len(values), *shape) or not np.isfinite(out).all():
                raise RequestError(f"{where}: expected a list of {feature.dim} finite numbers")
            return out.astype(np.float16)  # as the pipeline and the export feed dense features
        if isinstance(feature, F.MultiHot):  # ids, or strings of a vocab / hash feature
            for items in values:
                if not isinstance(items, Sequence) or isinstance(items, str):
                    raise RequestError(f"{where}: expected {multi_hot.expected(feature)}, got {items!r}")
            return multi_hot.encode_lists([[v if isinstance(v, str) else _int(v, where) for v in items]
                                           for items in values], feature)
    except (TypeError, ValueError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"{where}: cannot read the value as a {feature.type} feature ({e})") from None
    raise TypeError(f"unknown feature {feature!r}")


def tower_columns(spec: F.TowerSpec, rows: Sequence[Mapping[str, Any]], wheres: Sequence[str]) -> dict[str, np.ndarray]:
    """Raw feature rows (one dict per request) -> raw columns; a missing feature, or a key that is
    not one of the tower's features, is an error (as unknown top-level keys are)."""
    for row, where in zip(rows, wheres):
        unknown = sorted(set(row) - set(spec.names))
        if unknown:
            raise RequestError(f"{where}: unknown keys {unknown}; the {spec.name} features are {list(spec.names)}")
    columns = {}
    for f in spec.features:
        for row, where in zip(rows, wheres):
            if f.name not in row:
                raise RequestError(f"{where}.{f.name}: missing; the {spec.name} features are {list(spec.names)}")
        columns[f.name] = raw_column(f, [row[f.name] for row in rows], f"{wheres[0]}.{f.name}" if len(rows) == 1
                                     else f"requests' {spec.name}.{f.name}")
    return columns
