"""Expected calibration error and reliability-diagram bins (host, numpy).

ECE = sum over bins of (bin weight / total weight) * |observed rate - mean prediction|.
Equal-width bins split [0, 1] into B intervals: the textbook form, but with CTRs of a few
percent nearly every impression lands in the first bin, so it says little. Equal-mass bins
hold (nearly) the same number of impressions each (consecutive runs of the predictions in
sorted order), so every bin is measured with the same precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from multitower_jax.train import metrics as train_metrics


@dataclasses.dataclass(frozen=True)
class Bins:
    """Per non-empty bin: mean prediction, observed rate, count (number of examples)."""

    mean_pred: np.ndarray
    observed: np.ndarray
    count: np.ndarray

    def ece(self) -> float:
        total = self.count.sum()
        return float((self.count / total * np.abs(self.observed - self.mean_pred)).sum()) if total else float("nan")


def _bins(p: np.ndarray, y: np.ndarray, bin_id: np.ndarray, num_bins: int) -> Bins:
    count = np.bincount(bin_id, minlength=num_bins).astype(np.float64)
    sum_p = np.bincount(bin_id, weights=p, minlength=num_bins)
    sum_y = np.bincount(bin_id, weights=y, minlength=num_bins)
    keep = count > 0
    return Bins(mean_pred=sum_p[keep] / count[keep], observed=sum_y[keep] / count[keep], count=count[keep])


def equal_width_bins(p: np.ndarray, y: np.ndarray, num_bins: int) -> Bins:
    """Bins [0, 1/B), [1/B, 2/B), ..., [(B-1)/B, 1]."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    bin_id = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    return _bins(p, y, bin_id, num_bins)


def equal_mass_bins(p: np.ndarray, y: np.ndarray, num_bins: int) -> Bins:
    """B bins of consecutive predictions in sorted order, sizes differing by at most one."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    order = np.argsort(p, kind="stable")
    bin_id = np.empty(len(p), np.int64)
    bin_id[order] = np.arange(len(p)) * num_bins // max(len(p), 1)
    return _bins(p, y, bin_id, num_bins)


def ece(p: np.ndarray, y: np.ndarray, num_bins: int = 15, equal_mass: bool = True) -> float:
    bins = equal_mass_bins(p, y, num_bins) if equal_mass else equal_width_bins(p, y, num_bins)
    return bins.ece()


def head_report(p: np.ndarray, y: np.ndarray, num_bins: int) -> dict[str, float]:
    """auc, logloss, mean_pred, observed_rate, num, ece (equal-mass), ece_equal_width."""
    out = {k.removeprefix("h_"): v for k, v in train_metrics.binary_report("h", p, y).items()}
    out["ece"] = ece(p, y, num_bins, equal_mass=True)
    out["ece_equal_width"] = ece(p, y, num_bins, equal_mass=False)
    return out
