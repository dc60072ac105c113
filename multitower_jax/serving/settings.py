"""`config.serving`: defaults, validation and a frozen copy the serving code reads.

Workdirs trained before the section existed have no `serving` key in their `config.json`;
`from_config` fills in the defaults, so every trained workdir can be served.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from multitower_jax.config_checks import ConfigError, is_number, is_positive_int, require, require_known

OBJECTIVES = ("ecpm", "weighted")
COMPUTE_DTYPES = ("float32", "bfloat16")


def defaults() -> ml_collections.ConfigDict:
    """The `config.serving` section of experiments/base.py."""
    s = ml_collections.ConfigDict()
    # Candidate counts are padded up to one of these, so the scorer compiles once per bucket.
    s.buckets = (64, 128, 256, 512, 1024)
    s.num_candidates = 500  # K: ads retrieved from the ANN index per request
    s.top_n = 20  # ads returned per request
    # "ecpm": bid x pCTR x quality x 1000.  "weighted": bid x (ctr_weight pCTR + cvr_weight pCVR).
    s.objective = "ecpm"
    s.ctr_weight = 1.0
    s.cvr_weight = 0.0
    s.cache_ttl_s = 300.0  # user embeddings are reused this long (users change slowly)
    s.cache_size = 100_000  # at most this many cached users (least recently used leave first)
    s.max_batch_size = 16  # the micro-batcher groups at most this many concurrent requests ...
    s.max_wait_ms = 2.0  # ... and waits at most this long to fill it, only when others are queued
    # The scorer's matmuls: "float32", or "bfloat16" inputs with float32 accumulation (layer-norm
    # statistics, logits, calibration and eCPM stay float32): fewer bytes, and on CPUs with bf16 units (AMX,
    # AVX512-BF16), TPUs and GPUs a faster matmul; pCTRs move by ~0.5 % relative (README).
    s.compute_dtype = "float32"
    return s


class ServingConfigError(ConfigError):
    """A `config.serving` value is wrong."""


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    num_candidates: int = 500
    top_n: int = 20
    objective: str = "ecpm"
    ctr_weight: float = 1.0
    cvr_weight: float = 0.0
    cache_ttl_s: float = 300.0
    cache_size: int = 100_000
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, expected: str, value: Any) -> None:
            require(ok, f"serving.{key}", expected, value, error=ServingConfigError)

        b = self.buckets
        need(bool(b) and all(is_positive_int(x) for x in b) and list(b) == sorted(set(b)), "buckets",
             "strictly increasing positive candidate counts", b)
        for key in ("num_candidates", "top_n", "cache_size", "max_batch_size"):
            need(is_positive_int(getattr(self, key)), key, "a positive integer", getattr(self, key))
        need(self.num_candidates <= b[-1], "num_candidates", f"at most the largest bucket {b[-1]}", self.num_candidates)
        need(self.top_n <= b[0], "top_n", f"at most the smallest bucket {b[0]}", self.top_n)
        need(self.objective in OBJECTIVES, "objective", " or ".join(map(repr, OBJECTIVES)), self.objective)
        for key in ("ctr_weight", "cvr_weight", "cache_ttl_s", "max_wait_ms"):
            v = getattr(self, key)
            need(is_number(v) and v >= 0, key, "a non-negative number", v)
        need(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", " or ".join(map(repr, COMPUTE_DTYPES)),
             self.compute_dtype)
        need(not (self.objective == "weighted" and self.ctr_weight == 0 and self.cvr_weight == 0), "ctr_weight",
             "a positive ctr_weight or cvr_weight for objective 'weighted'", 0)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Request-batch sizes the micro-batcher pads to: powers of two up to max_batch_size."""
        sizes, n = [], 1
        while n < self.max_batch_size:
            sizes.append(n)
            n *= 2
        return (*sizes, self.max_batch_size)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ServingSettings:
        """`config.serving` over the defaults (a missing section or key takes its default)."""
        merged = defaults().to_dict()
        section = config.get("serving") if config is not None else None
        if section is not None:
            require_known("serving", section.keys(), merged, error=ServingConfigError)
            merged.update(section.to_dict() if hasattr(section, "to_dict") else dict(section))
        merged["buckets"] = tuple(merged["buckets"])
        return cls(**merged)


def bucket_for(n: int, buckets: tuple[int, ...], what: str = "candidates") -> int:
    """The smallest bucket >= n; ValueError when n exceeds the largest."""
    for b in buckets:
        if n <= b:
            return b
    key = "max_batch_size" if what == "requests" else "buckets"
    raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]} (config.serving.{key})")
