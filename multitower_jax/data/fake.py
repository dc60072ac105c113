"""Random model batches that follow the batch contract of `multitower_jax.data.schema`.

For tests and benchmarks: no world behind them, labels are coin flips. Ads are drawn from a
small Zipf-like pool so that batches hold duplicate ads, and ``ad_log_q`` is the log of the
exact probability of drawing each ad, as the logQ correction expects.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multitower_jax import features as F


def random_features(spec: F.TowerSpec, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid model inputs for every feature of one tower (dtypes and ranges per the schema)."""
    out: dict[str, np.ndarray] = {}
    for f in spec.features:
        if isinstance(f, F.Categorical):
            out[f.name] = rng.integers(0, f.size + 1, size=batch_size).astype(np.int32)
        elif isinstance(f, F.Numeric):
            out[f.name] = rng.standard_normal(batch_size).astype(np.float32)
        elif isinstance(f, F.Dense):
            # float16, as the pipeline ships dense vectors (the model casts them).
            out[f.name] = rng.standard_normal((batch_size, f.dim)).astype(np.float16)
        elif isinstance(f, F.Text):
            # ids 0 (pad) and 1 ([CLS]) are reserved; real tokens first, pads after.
            lengths_B = rng.integers(1, f.max_len + 1, size=batch_size)
            tokens_BxL = rng.integers(2, f.vocab_size, size=(batch_size, f.max_len))
            tokens_BxL[np.arange(f.max_len)[None, :] >= lengths_B[:, None]] = 0
            out[f.name] = tokens_BxL.astype(np.int32)
        elif isinstance(f, F.MultiHot):
            counts_B = rng.integers(0, f.max_items + 1, size=batch_size)
            ids_BxM = rng.integers(1, f.size + 1, size=(batch_size, f.max_items))
            ids_BxM[np.arange(f.max_items)[None, :] >= counts_B[:, None]] = 0
            out[f.name] = ids_BxM.astype(np.int32)
        else:
            raise TypeError(f"unknown feature {f!r}")
    return out


def random_batch(spec: F.FeatureSpec, placement: str, batch_size: int, seed: int,
                 click_rate: float = 0.05, conversion_rate: float = 0.3, num_ads: int | None = None,
                 num_users: int | None = None) -> dict[str, Any]:
    """A model batch of `batch_size` rows for `placement`; conversions happen only after clicks.

    `num_ads` (default ``max(2, batch_size // 2)``) is the size of the ad pool, so duplicates
    of an ad appear in the batch; ad k is drawn with probability proportional to 1 / (k + 1).
    """
    rng = np.random.default_rng(seed)
    num_ads = num_ads or max(2, batch_size // 2)
    num_users = num_users or max(2, batch_size)
    probs_A = 1.0 / np.arange(1, num_ads + 1)
    probs_A /= probs_A.sum()
    ad_id_B = rng.choice(num_ads, size=batch_size, p=probs_A)
    click_B = (rng.random(batch_size) < click_rate).astype(np.float32)
    conversion_B = click_B * (rng.random(batch_size) < conversion_rate).astype(np.float32)
    return {
        "user": random_features(spec.user, batch_size, rng),
        "context": random_features(spec.context(placement), batch_size, rng),
        "ad": random_features(spec.ad, batch_size, rng),
        "click": click_B,
        "conversion": conversion_B,
        "weight": np.ones(batch_size, np.float32),
        "user_id": rng.integers(0, num_users, size=batch_size).astype(np.int32),
        "ad_id": ad_id_B.astype(np.int32),
        "ad_log_q": np.log(probs_A[ad_id_B]).astype(np.float32),
    }
