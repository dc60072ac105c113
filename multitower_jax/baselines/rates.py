"""Per-id smoothed rates: an id's train click rate shrunk toward the global rate, and its
conversions per click likewise; pCTCVR = pCTR x pCVR.

    pCTR(id) = (clicks(id) + m * CTR) / (impressions(id) + m)
    pCVR(id) = (conversions(id) + m' * CVR) / (clicks(id) + m')

(the posterior mean under a Beta prior of strength m centred on the global rate; an id unseen
in train gets the global rate). Also the out-of-fold target encodings the trees use.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from multitower_jax.baselines.data import Table, id_keys
from multitower_jax.train import metrics


@dataclasses.dataclass(frozen=True)
class Counts:
    """Train counts per id: sorted keys, impressions, clicks, conversions (after a click)."""

    keys: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    conversions: np.ndarray

    @classmethod
    def fit(cls, keys: np.ndarray, click: np.ndarray, ctcvr: np.ndarray) -> Counts:
        unique, inverse = np.unique(keys, return_inverse=True)
        count = lambda w: np.bincount(inverse, weights=w, minlength=len(unique))  # noqa: E731
        return cls(unique, count(None), count(click), count(ctcvr))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, clicks, conversions) of each key; zeros for keys unseen in train."""
        pos = np.clip(np.searchsorted(self.keys, keys), 0, max(len(self.keys) - 1, 0))
        seen = (self.keys[pos] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        pick = lambda x: np.where(seen, x[pos], 0.0) if len(x) else np.zeros(len(keys))  # noqa: E731
        return pick(self.impressions), pick(self.clicks), pick(self.conversions)


def smoothed(hits: np.ndarray, trials: np.ndarray, prior: float, strength: float) -> np.ndarray:
    return (hits + strength * prior) / (trials + strength)


@dataclasses.dataclass
class IdRates:
    """The per-id rate baseline of one id column (or cross ``a*b``), fitted on train."""

    column: str
    counts: Counts
    ctr: float  # global train rates: the priors
    cvr: float
    m_ctr: float = 10.0
    m_cvr: float = 10.0

    @classmethod
    def fit(cls, train: Table, column: str) -> IdRates:
        click, ctcvr = train.click, train.ctcvr
        ctr = float(click.mean())
        cvr = float(ctcvr.sum() / max(click.sum(), 1.0))
        return cls(column, Counts.fit(id_keys(train, column), click, ctcvr), ctr, cvr)

    def predict(self, table: Table, m_ctr: float | None = None, m_cvr: float | None = None) -> dict[str, np.ndarray]:
        imps, clicks, convs = self.counts.lookup(id_keys(table, self.column))
        pctr = smoothed(clicks, imps, self.ctr, self.m_ctr if m_ctr is None else m_ctr)
        pcvr = smoothed(convs, clicks, self.cvr, self.m_cvr if m_cvr is None else m_cvr)
        return {"pctr": pctr, "pcvr": pcvr, "pctcvr": pctr * pcvr}

    def tune(self, validation: Table, strengths) -> dict[str, float]:
        """Choose m on validation by log loss: m for pCTR on clicks, then m' for pCTCVR on
        conversions (pCVR alone would be tuned on the few clicked rows only)."""
        y_click, y_ctcvr = validation.click, validation.ctcvr
        self.m_ctr = min(strengths, key=lambda m: metrics.logloss(self.predict(validation, m_ctr=m)["pctr"], y_click))
        self.m_cvr = min(strengths, key=lambda m: metrics.logloss(self.predict(validation, m_cvr=m)["pctcvr"], y_ctcvr))
        return {"prior_strength_ctr": float(self.m_ctr), "prior_strength_cvr": float(self.m_cvr),
                "global_ctr": self.ctr, "global_cvr": self.cvr, "num_train_ids": int(len(self.counts.keys))}


def out_of_fold_encodings(train: Table, columns, folds: int, strength: float, seed: int) -> dict[str, np.ndarray]:
    """Target encodings of train rows, each from the other folds' counts only (no row sees its own
    label): smoothed click rate, smoothed conversions per impression and log1p impressions per id."""
    fold = np.random.default_rng(seed).integers(0, folds, len(train))
    click, ctcvr = train.click, train.ctcvr
    ctr, ctcvr_rate = float(click.mean()), float(ctcvr.mean())
    out = {}
    for column in columns:
        keys = id_keys(train, column)
        unique, inverse = np.unique(keys, return_inverse=True)
        total = np.stack([np.bincount(inverse, weights=w, minlength=len(unique)) for w in (None, click, ctcvr)])
        enc = np.empty((3, len(train)))
        for k in range(folds):
            rows = fold == k
            own = np.stack([np.bincount(inverse[rows], weights=None if w is None else w[rows], minlength=len(unique))
                            for w in (None, click, ctcvr)])
            imps, clicks, convs = (total - own)[:, inverse[rows]]
            enc[:, rows] = (smoothed(clicks, imps, ctr, strength), smoothed(convs, imps, ctcvr_rate, strength),
                            np.log1p(imps))
        out.update(_named(column, enc))
    return out


def full_train_encodings(train: Table, table: Table, columns, strength: float) -> dict[str, np.ndarray]:
    """The same encodings for validation / test rows, from every train row's counts."""
    click, ctcvr = train.click, train.ctcvr
    ctr, ctcvr_rate = float(click.mean()), float(ctcvr.mean())
    out = {}
    for column in columns:
        imps, clicks, convs = Counts.fit(id_keys(train, column), click, ctcvr).lookup(id_keys(table, column))
        out.update(_named(column, (smoothed(clicks, imps, ctr, strength), smoothed(convs, imps, ctcvr_rate, strength),
                                   np.log1p(imps))))
    return out


def _named(column: str, enc) -> dict[str, np.ndarray]:
    return {f"te_ctr:{column}": enc[0], f"te_ctcvr:{column}": enc[1], f"te_count:{column}": enc[2]}
