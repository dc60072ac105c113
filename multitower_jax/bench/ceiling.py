"""`multitower bench ceiling`: how close to the oracle a model of the observable features can get.

The synthetic world's oracle knows latent variables that no feature reveals exactly: each ad's
own click quality (beyond its advertiser's), each user's click bias, the user x ad taste
affinity. This bench draws test impressions and scores them with the oracle logit minus one
latent term at a time (a model that could not infer that term at all); the drop in AUC is what
that term is worth. It bounds what the quality bars can ask of a model with the default features.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.data.synthetic import World
from multitower_jax.train.metrics import auc


def run(config: ml_collections.ConfigDict, json_path: str | None = None, num: int = 200_000) -> dict:
    placement = config.data.placements[0]
    world = World(config.synthetic, F.parse_spec(config.features))
    rows = {k: np.concatenate(v) for k, v in _collect(world.impressions(placement, "test", num)).items()}
    p, click = rows["p_click"].astype(np.float64), rows["click"]
    user, ad = rows["user_id"], rows["ad_id"]
    logit = np.log(p) - np.log1p(-p)

    quality = world._ad_quality  # noqa: SLF001 (the world's latents are what this bench measures)
    advertiser = world.ad_advertiser
    advertiser_mean = np.bincount(advertiser, quality) / np.maximum(np.bincount(advertiser), 1)
    own_quality = (quality - advertiser_mean[advertiser])[ad]
    user_bias = world._u_bias[user]  # noqa: SLF001
    affinity = 0.3 * world._affinity(user, ad, world._aff_mu, world._aff_sd)  # noqa: SLF001
    terms = {"ad's own quality": own_quality, "user click bias": user_bias, "user x ad affinity": affinity}

    figures: dict[str, float | int | str] = {"placement": placement, "impressions": int(len(p)),
                                             "ctr": float(click.mean()), "oracle_ctr_auc": auc(p, click)}
    for name, term in terms.items():
        figures[f"without {name}"] = auc(logit - term, click)
    figures["without all three"] = auc(logit - sum(terms.values()), click)
    bench.report(f"oracle CTR AUC with latent terms removed ({placement}, test split)", figures, json_path)
    return figures


def _collect(chunks) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        for key in ("p_click", "click", "user_id", "ad_id"):
            out.setdefault(key, []).append(chunk[key])
    return out
