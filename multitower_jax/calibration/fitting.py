"""Fitting calibrators on the host (float64): isotonic with scikit-learn, Platt and temperature
scaling by maximum likelihood with scipy's L-BFGS (analytic gradients; two and one parameters)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.optimize
import scipy.special
from sklearn.isotonic import IsotonicRegression

from multitower_jax.calibration.core import PRODUCT, Calibration, CalibrationError


def _check(head: str, p: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"{head}: expected 1-d probabilities and labels of one length, got {p.shape} and {y.shape}")
    w = np.ones_like(p, np.float64) if w is None else np.asarray(w, np.float64)
    positives, total = float(w[y > 0.5].sum()), float(w.sum())
    if not (0 < positives < total):
        raise CalibrationError(f"cannot fit a calibrator for {head}: {len(y)} examples with {int((y > 0.5).sum())} "
                               "positives; it needs both positive and negative labels")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise CalibrationError(f"cannot fit a calibrator for {head}: probabilities must be finite and in [0, 1]")
    return w


def fit_isotonic(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-6,
                 head: str = "ctr") -> dict[str, np.ndarray]:
    """Thresholds of the non-decreasing least-squares fit of y on p (sklearn), outputs in [eps, 1 - eps]."""
    w = _check(head, p, y, w)
    iso = IsotonicRegression(y_min=eps, y_max=1 - eps, increasing=True, out_of_bounds="clip")
    iso.fit(np.asarray(p, np.float64), np.asarray(y, np.float64), sample_weight=w)
    return {"x": iso.X_thresholds_.astype(np.float32), "y": iso.y_thresholds_.astype(np.float32)}


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _weighted_nll(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean weighted log loss of sigmoid(s) and its gradient with respect to s."""
    loss = (w * (np.logaddexp(0.0, s) - y * s)).sum() / w.sum()
    return float(loss), w * (scipy.special.expit(s) - y) / w.sum()


def fit_platt(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-6,
              head: str = "ctr") -> dict[str, np.ndarray]:
    """(a, b) of sigmoid(a * logit(p) + b) maximizing the weighted likelihood."""
    w = _check(head, p, y, w)
    z, y = _logit(p, eps), np.asarray(y, np.float64)

    def objective(ab):
        loss, g = _weighted_nll(ab[0] * z + ab[1], y, w)
        return loss, np.array([(g * z).sum(), g.sum()])

    res = scipy.optimize.minimize(objective, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 1000})
    if not np.all(np.isfinite(res.x)):
        raise CalibrationError(f"Platt scaling for {head} did not converge: {res.message}")
    return {"a": np.float32(res.x[0]), "b": np.float32(res.x[1])}


def fit_temperature(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-6,
                    head: str = "cvr") -> dict[str, np.ndarray]:
    """T of sigmoid(logit(p) / T) maximizing the weighted likelihood (optimized over log(1/T) > -inf)."""
    w = _check(head, p, y, w)
    z, y = _logit(p, eps), np.asarray(y, np.float64)

    def objective(u):
        k = np.exp(u[0])
        loss, g = _weighted_nll(k * z, y, w)
        return loss, np.array([(g * z).sum() * k])

    res = scipy.optimize.minimize(objective, np.array([0.0]), jac=True, method="L-BFGS-B", bounds=[(-10, 10)],
                                  options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 1000})
    return {"temperature": np.float32(np.exp(-res.x[0]))}


FITTERS = {"isotonic": fit_isotonic, "platt": fit_platt, "temperature": fit_temperature,
           "none": lambda p, y, w=None, eps=1e-6, head="": {}}


def fit(pred: Mapping[str, np.ndarray], heads: tuple[str, ...], methods: Mapping[str, str],
        negative_rate: float = 1.0, clip_eps: float = 1e-6) -> Calibration:
    """Fit every head on one split's predictions (``pctr``, ``pcvr``, ``click``, ``conversion``).

    CTR on all impressions; CVR on the clicked ones only (the CVR label is only defined there);
    CTCVR, when it has a method of its own, on all impressions with label click x conversion.
    The inputs are exactly what `Calibration.apply` feeds each map (clipped, downsampling-corrected).
    """
    methods = {h: methods[h] for h in heads}
    base = Calibration.identity(heads, negative_rate, clip_eps)
    click = np.asarray(pred["click"], np.float64)
    weight = np.asarray(pred["weight"], np.float64) if "weight" in pred else np.ones_like(click)
    inputs = {"ctr": (base.apply("ctr", pred["pctr"]), click, weight)}
    if "cvr" in heads:
        clicked = click > 0.5
        conversion = np.asarray(pred["conversion"], np.float64)
        inputs["cvr"] = (base.apply("cvr", pred["pcvr"][clicked]), conversion[clicked], weight[clicked])
        inputs["ctcvr"] = (base.uncalibrated_ctcvr(pred["pctr"], pred["pcvr"]), click * conversion, weight)
    params = {}
    for head in heads:
        if methods[head] == PRODUCT:
            params[head] = {}
            continue
        p, y, w = inputs[head]
        params[head] = FITTERS[methods[head]](np.asarray(p, np.float64), y, w, eps=clip_eps, head=head)
    return Calibration.create(params, tuple(methods.items()), negative_rate, clip_eps)
