"""`multitower bench ceiling`: how close to the oracle a model of the observable features can get.

The synthetic world's oracle knows latent variables that no feature reveals exactly: each ad's
own click quality (beyond its advertiser's), each user's click bias, the user x ad taste
affinity. This bench scores the test split (the impressions `eval_test.json` sees) two ways:

- the oracle logit minus one latent term at a time (a model that could not infer that term at
  all); the drop in AUC is what that term is worth;
- a *generous semi-oracle* of the click: the exact oracle logit, except that the user's click
  bias and the ad's own quality are replaced by what the data says about them. It is handed
  every other term exactly (the intent x topic match, the taste affinity, the advertiser's
  quality, context and time effects) and infers the two latents as the exact Bayesian
  posterior, on a grid, from what a model sees: the train split's clicks of that user and that
  ad, the ad's historical impressions and clicks, and the user's 30-day click count with the
  number of the user's train impressions (which reveals the user's activity). Its score is the
  posterior expectation of the click probability. A model also has to learn the terms the
  semi-oracle is handed, so the semi-oracle's AUC is about the most any model can reach at
  this data size (it leaves out weak signals such as the user's 30-day conversions). For CTCVR it is multiplied by the exact pCVR, and by the
  pCVR without its latent terms.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from scipy.special import expit, logsumexp

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.data.synthetic import World
from multitower_jax.train.metrics import auc

_USER_BIAS_SD, _OWN_QUALITY_SD, _ACTIVITY_SD = 0.25, 0.4, 1.0  # the world's priors (synthetic_catalogue.py)
_GRID = 41


def run(config: ml_collections.ConfigDict, json_path: str | None = None, num: int | None = None) -> dict:
    """``num`` test impressions (default: the config's test split, as generated)."""
    placement = config.data.placements[0]
    world = World(config.synthetic, F.parse_spec(config.features))
    num_test = int(config.synthetic.impressions.test) if num is None else num
    test = _collect(world, placement, "test", num_test)
    click = test["click"]
    terms = _latent_terms(world, test)

    figures: dict[str, float | int | str] = {"placement": placement, "impressions": int(len(click)),
                                             "ctr": float(click.mean()), "oracle_ctr_auc": auc(test["p_click"], click)}
    for name, term in terms.items():
        figures[f"without {name}"] = auc(test["logit"] - term, click)
    figures["without all three"] = auc(test["logit"] - sum(terms.values()), click)

    posterior = Posterior.fit(world, _collect(world, placement, "train", int(config.synthetic.impressions.train)))
    known = _known_logit(test, terms)
    semi = posterior.expected_click(known, test)
    figures["semi-oracle (bias and own quality inferred)"] = auc(semi, click)
    figures["semi-oracle, without affinity"] = auc(
        posterior.expected_click(known - terms["user x ad affinity"], test), click)
    # CTCVR (conversions over all impressions): the click semi-oracle times the exact pCVR, and
    # times the pCVR without the conversion latents (the ad's own conversion quality, the user's
    # purchase propensity), which bracket a conversion-side semi-oracle.
    conversion, p_cvr = test["conversion"], test["p_convert_given_click"].astype(np.float64)
    figures["oracle_ctcvr_auc"] = auc(test["p_click"] * p_cvr, conversion)
    figures["ctcvr: semi-oracle x exact pCVR"] = auc(semi * p_cvr, conversion)
    cvr_logit = np.log(p_cvr) - np.log1p(-p_cvr) - _conversion_latents(world, test)
    figures["ctcvr: semi-oracle x pCVR without its latents"] = auc(semi * expit(cvr_logit), conversion)
    bench.report(f"oracle CTR and CTCVR AUC with latent terms removed or inferred ({placement}, test split)",
                 figures, json_path)
    return figures


def _collect(world: World, placement: str, split: str, num: int) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for chunk in world.impressions(placement, split, num):
        for key in ("p_click", "p_convert_given_click", "click", "conversion", "user_id", "ad_id"):
            out.setdefault(key, []).append(chunk[key])
    rows = {k: np.concatenate(v) for k, v in out.items()}
    p = rows["p_click"].astype(np.float64)
    rows["logit"] = np.log(p) - np.log1p(-p)
    return rows


def own_quality(world: World, quality: np.ndarray | None = None) -> np.ndarray:
    """Each ad's click quality (or the given per-ad ``quality``) minus the mean of its advertiser's ads."""
    quality = world._ad_quality if quality is None else quality  # noqa: SLF001 (the latents are what this bench measures)
    advertiser = world.ad_advertiser
    mean = np.bincount(advertiser, quality) / np.maximum(np.bincount(advertiser), 1)
    return quality - mean[advertiser]


def _conversion_latents(world: World, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The conversion logit's latent terms: the ad's own conversion quality (beyond its
    advertiser's mean) and half the user's purchase propensity."""
    own = own_quality(world, world._ad_convq)  # noqa: SLF001
    return own[rows["ad_id"]] + 0.5 * world._u_buyer[rows["user_id"]]  # noqa: SLF001


def _latent_terms(world: World, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    user, ad = rows["user_id"], rows["ad_id"]
    return {"ad's own quality": own_quality(world)[ad],
            "user click bias": world._u_bias[user],  # noqa: SLF001
            "user x ad affinity": 0.3 * world._affinity(user, ad, world._aff_mu, world._aff_sd)}  # noqa: SLF001


def _known_logit(rows: dict[str, np.ndarray], terms: dict[str, np.ndarray]) -> np.ndarray:
    """What the semi-oracle is handed: the oracle logit without the user bias and the ad's own quality."""
    return rows["logit"] - terms["user click bias"] - terms["ad's own quality"]


@dataclasses.dataclass(frozen=True)
class Posterior:
    """Grid posteriors of each user's click bias and each ad's own quality, given the train split."""

    bias_grid: np.ndarray
    user_posterior: np.ndarray  # [users, grid]
    quality_grid: np.ndarray
    ad_posterior: np.ndarray  # [ads, grid]

    @classmethod
    def fit(cls, world: World, train: dict[str, np.ndarray], rounds: int = 3) -> Posterior:
        """The user and ad posteriors are fitted in turn (``rounds`` times), each holding the
        other's posterior mean in the train impressions' logits."""
        offset = _known_logit(train, _latent_terms(world, train))
        b_grid = np.linspace(-4, 4, _GRID) * _USER_BIAS_SD
        q_grid = np.linspace(-4, 4, _GRID) * _OWN_QUALITY_SD
        user_prior = _user_feature_loglik(world, train, b_grid) - 0.5 * (b_grid / _USER_BIAS_SD) ** 2
        ad_prior = _ad_history_loglik(world, own_quality(world), q_grid) - 0.5 * (q_grid / _OWN_QUALITY_SD) ** 2
        user, ad, y = train["user_id"], train["ad_id"], train["click"]
        q_mean = np.zeros(world.num_ads)
        for _ in range(rounds):
            user_post = _normalize(user_prior + _click_loglik(offset + q_mean[ad], y, user, world.num_users, b_grid))
            b_mean = user_post @ b_grid
            ad_post = _normalize(ad_prior + _click_loglik(offset + b_mean[user], y, ad, world.num_ads, q_grid))
            q_mean = ad_post @ q_grid
        return cls(b_grid, user_post, q_grid, ad_post)

    def expected_click(self, known_logit: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
        """E[sigmoid(known_logit + bias + own quality)] of each row over the two posteriors."""
        out = np.empty(len(known_logit))
        for s in range(0, len(out), 4096):
            r = slice(s, s + 4096)
            p = expit(known_logit[r, None, None] + self.bias_grid[None, :, None] + self.quality_grid[None, None, :])
            out[r] = np.einsum("nbq,nb,nq->n", p, self.user_posterior[rows["user_id"][r]],
                               self.ad_posterior[rows["ad_id"][r]])
        return out


def _normalize(loglik: np.ndarray) -> np.ndarray:
    return np.exp(loglik - logsumexp(loglik, axis=1, keepdims=True))


def _click_loglik(offset: np.ndarray, y: np.ndarray, group: np.ndarray, n: int, grid: np.ndarray) -> np.ndarray:
    """[n, grid]: sum over each group's impressions of log P(click label | offset + grid value)."""
    out = np.empty((n, len(grid)))
    for j, g in enumerate(grid):
        z = offset + g
        out[:, j] = np.bincount(group, np.where(y > 0, -np.logaddexp(0, -z), -np.logaddexp(0, z)), minlength=n)
    return out


def _poisson(k: np.ndarray, log_rate: np.ndarray) -> np.ndarray:
    """log Poisson(k | rate), up to the log k! term that does not depend on the rate."""
    return k * log_rate - np.exp(log_rate)


def _user_feature_loglik(world: World, train: dict[str, np.ndarray], b_grid: np.ndarray) -> np.ndarray:
    """[users, grid]: log P(30-day clicks, train impression count | bias) up to a per-user constant,
    activity integrated out.

    The world draws activity ~ LogNormal(0, 1), users into impressions in proportion to it, and
    30-day clicks ~ Poisson(8 * activity * exp(bias))."""
    cols = world.users_table()
    if "user.total_clicks_30d" not in cols:
        return np.zeros((world.num_users, len(b_grid)))
    clicks = cols["user.total_clicks_30d"].astype(np.float64)[:, None]
    count = np.bincount(train["user_id"], minlength=world.num_users).astype(np.float64)[:, None]
    log_a = np.linspace(-5, 5, 321) * _ACTIVITY_SD  # fine enough for a heavy user's peaked likelihood
    log_prior_a = -0.5 * (log_a / _ACTIVITY_SD) ** 2
    rate = len(train["user_id"]) / (world.num_users * np.exp(0.5 * _ACTIVITY_SD**2))  # impressions per unit activity
    base = _poisson(count, np.log(rate) + log_a[None, :]) + log_prior_a[None, :]
    return np.stack([logsumexp(base + _poisson(clicks, np.log(8.0) + log_a[None, :] + b), axis=1) for b in b_grid], 1)


def _ad_history_loglik(world: World, own: np.ndarray, q_grid: np.ndarray) -> np.ndarray:
    """[ads, grid]: log P(historical clicks | impressions, own quality), from the ad's features
    (historical_ctr = (clicks + 0.9) / (impressions + 30)); the advertiser's quality is given."""
    cols = world.ads_table()
    if "ad.historical_ctr" not in cols or "ad.total_impressions" not in cols:
        return np.zeros((world.num_ads, len(q_grid)))
    imps = cols["ad.total_impressions"].astype(np.float64)
    clicks = np.round(cols["ad.historical_ctr"].astype(np.float64) * (imps + 30) - 0.9)
    advertiser_quality = world._ad_quality - own  # noqa: SLF001
    z = -3.5 + advertiser_quality[:, None] + q_grid[None, :]
    return -clicks[:, None] * np.logaddexp(0, -z) - (imps - clicks)[:, None] * np.logaddexp(0, z)
