"""Evaluation metrics on the host: exact AUC (ties get half credit), log loss, calibration summary."""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC by the rank-sum (Mann-Whitney U) statistic with average ranks for ties.

    NaN when only one class is present.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average rank (1-based) of each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean()) if y.size else float("nan")


def binary_report(prefix: str, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``<prefix>_auc``, ``_logloss``, ``_mean_pred``, ``_observed_rate``, ``_num``."""
    return {
        f"{prefix}_auc": auc(probs, labels),
        f"{prefix}_logloss": logloss(probs, labels),
        f"{prefix}_mean_pred": float(np.mean(probs)) if len(probs) else float("nan"),
        f"{prefix}_observed_rate": float(np.mean(labels)) if len(labels) else float("nan"),
        f"{prefix}_num": int(len(labels)),
    }
