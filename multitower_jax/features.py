"""Declarative feature schema: what every tower reads, and how raw values become model inputs.

A spec is written in the experiment config as nested dicts,
``config.features.<tower>.<feature_name> = dict(type=..., ...)``, with one context tower per
placement (``config.features.context.<placement>``). This module turns that into frozen
dataclasses that the data pipeline, the synthetic world and the model all share, so a
feature is declared exactly once.

Raw values (as stored in the impression records) and model inputs:

=============  ==========================================  =================================
type           raw value                                   model input
=============  ==========================================  =================================
categorical    int (``ids`` in [0, size)) or str (hashed   int32 id in [0, size]; 0 is the
               or looked up in ``vocab``)                  out-of-vocabulary / missing bucket
numeric        float (counts must be >= 0 when log1p)      float32, log1p then standardized
text           str                                         int32[max_len] token ids, 0 = pad
dense          float[dim]                                  float32[dim]
multi_hot      list of ints in [0, size) (-1 pads), or     int32[max_items] ids + 1, 0 = pad
               of strings (``hash`` / ``vocab``; a text    (and for unknown or rare items)
               cell is split at ``separator``)
=============  ==========================================  =================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections

PLACEMENTS = ("search", "product_page", "category_browse", "homepage", "cart")
TOWERS = ("user", "context", "ad")

FeatureType = Literal["categorical", "numeric", "text", "dense", "multi_hot"]


class SpecError(ValueError):
    """A feature spec in the config is malformed."""


@dataclasses.dataclass(frozen=True)
class Categorical:
    name: str
    size: int  # number of real categories (ids) or hash buckets; the table has size + 1 rows
    dim: int  # embedding dimension
    encoding: Literal["ids", "hash", "vocab"] = "ids"
    vocab: tuple[str, ...] = ()
    # Raw values seen fewer than this many times in the train split map to the out-of-vocabulary
    # row 0 (counted in the statistics pass), so a cold id shares one trained row instead of
    # keeping its own never-trained random one. 0 or 1: off.
    min_count: int = 0
    # In training, this fraction of rows sees the out-of-vocabulary row 0 instead of its id, so
    # the towers learn to score a row from its other features when the id is cold (what every
    # unseen id gets at serving time). 0: off.
    oov_rate: float = 0.0
    type: str = "categorical"

    @property
    def num_embeddings(self) -> int:
        return self.size + 1


@dataclasses.dataclass(frozen=True)
class Numeric:
    name: str
    log1p: bool = True
    standardize: bool = True
    type: str = "numeric"


@dataclasses.dataclass(frozen=True)
class Text:
    name: str
    max_len: int
    vocab_size: int  # hashed word buckets, including the 2 reserved ids (0 pad, 1 [CLS])
    type: str = "text"


@dataclasses.dataclass(frozen=True)
class Dense:
    name: str
    dim: int
    type: str = "dense"


@dataclasses.dataclass(frozen=True)
class MultiHot:
    name: str
    size: int  # number of real item ids, vocabulary entries or hash buckets; the table has size + 1 rows
    max_items: int
    dim: int
    # "ids": integer items in [0, size); "vocab": string items looked up in ``vocab``; "hash": string
    # (or integer) items hashed into ``size`` buckets. See `multitower_jax.data.multi_hot`.
    encoding: Literal["ids", "hash", "vocab"] = "ids"
    vocab: tuple[str, ...] = ()
    separator: str = "|"  # splits a text cell ("Comedy|Drama") into the items of a vocab / hash list
    min_count: int = 0  # items seen fewer times in the train split are dropped (as unknown ones); 0 or 1: off
    type: str = "multi_hot"

    @property
    def num_embeddings(self) -> int:
        return self.size + 1


Feature = Categorical | Numeric | Text | Dense | MultiHot
_CLASSES: dict[str, type] = {
    "categorical": Categorical,
    "numeric": Numeric,
    "text": Text,
    "dense": Dense,
    "multi_hot": MultiHot,
}


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """The inputs of one tower, in a fixed (sorted by name) order."""

    name: str
    features: tuple[Feature, ...]

    def of_type(self, kind: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.type == kind)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"tower {self.name!r} has no feature {name!r}")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """User and ad towers are shared; each placement has its own context tower."""

    user: TowerSpec
    ad: TowerSpec
    contexts: Mapping[str, TowerSpec]

    def context(self, placement: str) -> TowerSpec:
        if placement not in self.contexts:
            raise SpecError(
                f"no context spec for placement {placement!r}; "
                f"config.features.context has {sorted(self.contexts)}"
            )
        return self.contexts[placement]

    def towers(self, placement: str) -> dict[str, TowerSpec]:
        return {"user": self.user, "context": self.context(placement), "ad": self.ad}

    def columns(self, placement: str) -> dict[str, Feature]:
        """Raw column name -> feature, for the impressions of one placement.

        Column names are ``<tower>.<feature>`` so towers may reuse a feature name.
        """
        return {
            f"{tower}.{f.name}": f
            for tower, spec in self.towers(placement).items()
            for f in spec.features
        }


def _parse_feature(path: str, name: str, raw: Any) -> Feature:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: expected a dict with a 'type' key, got {raw!r}")
    fields = dict(raw)
    kind = fields.pop("type", None)
    if kind not in _CLASSES:
        raise SpecError(f"{path}.type: expected one of {sorted(_CLASSES)}, got {kind!r}")
    cls = _CLASSES[kind]
    allowed = {f.name for f in dataclasses.fields(cls)} - {"name", "type"}
    unknown = set(fields) - allowed
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)} for a {kind} feature; allowed: {sorted(allowed)}")
    if "vocab" in fields:
        fields["vocab"] = tuple(str(v) for v in fields["vocab"])
    try:
        feature = cls(name=name, **fields)
    except TypeError as e:
        required = sorted(f.name for f in dataclasses.fields(cls)
                          if f.default is dataclasses.MISSING and f.name != "name")
        raise SpecError(f"{path}: a {kind} feature needs {required}: {e}") from None
    for key in ("size", "dim", "max_len", "max_items", "vocab_size"):
        value = getattr(feature, key, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise SpecError(f"{path}.{key}: expected a positive integer, got {value!r}")
    if isinstance(feature, Categorical | MultiHot):
        if feature.encoding not in ("ids", "hash", "vocab"):
            raise SpecError(f"{path}.encoding: expected 'ids', 'hash' or 'vocab', got {feature.encoding!r}")
        if feature.encoding == "vocab" and len(feature.vocab) != feature.size:
            raise SpecError(f"{path}: vocab has {len(feature.vocab)} entries but size is {feature.size}")
        if isinstance(feature.min_count, bool) or not isinstance(feature.min_count, int) or feature.min_count < 0:
            raise SpecError(f"{path}.min_count: expected an integer >= 0 (0 or 1: off), got {feature.min_count!r}")
    if isinstance(feature, MultiHot) and (not isinstance(feature.separator, str) or not feature.separator):
        raise SpecError(f"{path}.separator: expected a non-empty string (e.g. '|'), got {feature.separator!r}")
    if isinstance(feature, Categorical):
        rate = feature.oov_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise SpecError(f"{path}.oov_rate: expected a fraction in [0, 1), got {rate!r}")
    if isinstance(feature, Text) and feature.vocab_size < 3:
        raise SpecError(f"{path}.vocab_size: needs at least 3 (pad, [CLS] and one word bucket)")
    return feature


def _parse_tower(path: str, name: str, raw: Any) -> TowerSpec:
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(f"{path}: expected a non-empty dict of features")
    features = tuple(
        _parse_feature(f"{path}.{fname}", fname, fraw)
        for fname, fraw in sorted(raw.items())
        if fraw is not None  # `--config.features.user.gender=None` drops a feature
    )
    return TowerSpec(name=name, features=features)


def parse_spec(features: ml_collections.ConfigDict | Mapping) -> FeatureSpec:
    """Build a FeatureSpec from ``config.features``; raises SpecError naming the bad key."""
    raw = features.to_dict() if isinstance(features, ml_collections.ConfigDict) else dict(features)
    for key in TOWERS:
        if key not in raw:
            raise SpecError(f"config.features.{key}: missing (expected towers {TOWERS})")
    contexts_raw = raw["context"]
    if not isinstance(contexts_raw, Mapping) or not contexts_raw:
        raise SpecError("config.features.context: expected a dict placement -> features")
    unknown = set(contexts_raw) - set(PLACEMENTS)
    if unknown:
        raise SpecError(f"config.features.context: unknown placements {sorted(unknown)}; expected {PLACEMENTS}")
    return FeatureSpec(
        user=_parse_tower("config.features.user", "user", raw["user"]),
        ad=_parse_tower("config.features.ad", "ad", raw["ad"]),
        contexts={
            p: _parse_tower(f"config.features.context.{p}", f"context_{p}", contexts_raw[p])
            for p in sorted(contexts_raw)
        },
    )


def _cat(size: int, dim: int, encoding: str = "ids") -> dict:
    return dict(type="categorical", size=size, dim=dim, encoding=encoding)


def _num() -> dict:
    return dict(type="numeric", log1p=True, standardize=True)


def default_features() -> ml_collections.ConfigDict:
    """The seeds' features: user 400-d input, ad 512-d, context 256-d (search)."""
    user = {
        # 32 + 4 + 64 + 8 + 32 = 140-d categorical, 4 numeric, 256 interest = 400-d
        "age_bucket": _cat(10, 32),
        "gender": _cat(3, 4),
        "country": _cat(200, 64),
        "device_type": _cat(5, 8),
        "language": _cat(50, 32),
        "total_clicks_30d": _num(),
        "total_conversions_30d": _num(),
        "avg_order_value": _num(),
        "days_since_last_purchase": _num(),
        "interest_vector": dict(type="dense", dim=256),
    }
    ad = {
        # text 128 (encoder) + image 128 + 16+16+32+32+... categorical + 4 numeric
        "title": dict(type="text", max_len=16, vocab_size=16384),
        "description": dict(type="text", max_len=32, vocab_size=16384),
        "image_embedding": dict(type="dense", dim=128),
        "advertiser_id": _cat(100_000, 64, "hash"),
        "brand_id": _cat(50_000, 64, "hash"),
        "campaign_type": _cat(5, 8),
        "industry_category": _cat(30, 16),
        "historical_ctr": dict(type="numeric", log1p=False, standardize=True),
        "historical_cvr": dict(type="numeric", log1p=False, standardize=True),
        "total_impressions": _num(),
        "ad_age_days": _num(),
    }
    session = {
        "hour_of_day": _cat(24, 8),
        "day_of_week": _cat(7, 4),
        "device_orientation": _cat(3, 4),
    }
    search = {
        "query": dict(type="text", max_len=16, vocab_size=16384),
        "num_queries_in_session": _num(),
        "time_since_session_start": _num(),
        "pages_viewed": _num(),
        "is_weekend": _cat(2, 4),
        "city": _cat(5000, 32, "hash"),
        "location_type": _cat(3, 4),
        **session,
    }
    product_page = {
        "viewed_product_id": _cat(100_000, 64, "hash"),
        "viewed_category": _cat(30, 16),
        "viewed_price": _num(),
        "num_reviews": _num(),
        "rating": dict(type="numeric", log1p=False, standardize=True),
        **session,
    }
    category_browse = {
        "category_id": _cat(30, 16),
        "filters": dict(type="multi_hot", size=64, max_items=8, dim=16),
        "sort_order": _cat(5, 4),
        **session,
    }
    homepage = {
        "recent_browse_categories": dict(type="multi_hot", size=30, max_items=10, dim=16),
        "is_weekend": _cat(2, 4),
        **session,
    }
    cart = {
        "cart_size": _num(),
        "cart_value": _num(),
        "checkout_stage": _cat(4, 4),
        "cart_categories": dict(type="multi_hot", size=30, max_items=10, dim=16),
        **session,
    }
    return ml_collections.ConfigDict({
        "user": user,
        "ad": ad,
        "context": {
            "search": search,
            "product_page": product_page,
            "category_browse": category_browse,
            "homepage": homepage,
            "cart": cart,
        },
    })
