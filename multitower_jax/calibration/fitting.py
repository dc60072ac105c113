"""Fitting calibrators on the host (float64): isotonic with scikit-learn, Platt and temperature
scaling by maximum likelihood with scipy's trust-region Newton method (exact gradient and Hessian
of a convex log loss in two and one parameters: converges to the optimum in a few steps)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.optimize
import scipy.special
from sklearn.isotonic import IsotonicRegression

from multitower_jax.calibration.core import Calibration, CalibrationError
from multitower_jax.calibration_settings import PRODUCT


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


def _linear_logistic_fit(features: np.ndarray, y: np.ndarray, w: np.ndarray, x0: np.ndarray,
                         head: str, what: str) -> np.ndarray:
    """theta maximizing the weighted likelihood of sigmoid(features @ theta) (an unpenalized
    logistic regression on a few columns)."""
    w = w / w.sum()

    def loss(theta):
        s = features @ theta
        return float((w * (np.logaddexp(0.0, s) - y * s)).sum())

    def grad(theta):
        return features.T @ (w * (scipy.special.expit(features @ theta) - y))

    def hess(theta):
        sig = scipy.special.expit(features @ theta)
        return (features * (w * sig * (1 - sig))[:, None]).T @ features

    res = scipy.optimize.minimize(loss, x0, jac=grad, hess=hess, method="trust-exact", options={"gtol": 1e-12})
    if not np.all(np.isfinite(res.x)) or np.linalg.norm(grad(res.x)) > 1e-6:
        raise CalibrationError(f"{what} for {head} did not converge: {res.message}")
    return res.x


def fit_platt(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-6,
              head: str = "ctr") -> dict[str, np.ndarray]:
    """(a, b) of sigmoid(a * logit(p) + b) maximizing the weighted likelihood."""
    w = _check(head, p, y, w)
    z = _logit(p, eps)
    features = np.stack([z, np.ones_like(z)], axis=1)
    a, b = _linear_logistic_fit(features, np.asarray(y, np.float64), w, np.array([1.0, 0.0]), head, "Platt scaling")
    return {"a": np.float32(a), "b": np.float32(b)}


def fit_temperature(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-6,
                    head: str = "cvr") -> dict[str, np.ndarray]:
    """T of sigmoid(logit(p) / T) maximizing the weighted likelihood (fitted as k = 1 / T, where it is convex)."""
    w = _check(head, p, y, w)
    z = _logit(p, eps)[:, None]
    (k,) = _linear_logistic_fit(z, np.asarray(y, np.float64), w, np.array([1.0]), head, "temperature scaling")
    if k <= 0:
        raise CalibrationError(f"temperature scaling for {head}: the fitted 1/T = {k:.3g} is not positive "
                               "(the model's scores rank the wrong way round on this split)")
    return {"temperature": np.float32(1.0 / k)}


FITTERS = {"isotonic": fit_isotonic, "platt": fit_platt, "temperature": fit_temperature,
           "identity": lambda p, y, w=None, eps=1e-6, head="": {}}


def fit(pred: Mapping[str, np.ndarray], heads: tuple[str, ...], methods: Mapping[str, str],
        negative_rate: float = 1.0, clip_eps: float = 1e-6,
        fallbacks: dict[str, str] | None = None) -> Calibration:
    """Fit every head on one split's predictions (``pctr``, ``pcvr``, ``click``, ``conversion``).

    CTR on all impressions; CVR on the clicked ones only (the CVR label is only defined there);
    CTCVR, when it has a method of its own, on all impressions with label click x conversion.
    The inputs are exactly what `Calibration.apply` feeds each map (clipped, downsampling-corrected).

    A head that cannot be fitted (e.g. temperature scaling with 1/T <= 0, or no positive labels)
    raises CalibrationError; when a `fallbacks` dict is given, that head uses identity instead
    and ``fallbacks[head]`` records why.
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
        try:
            params[head] = FITTERS[methods[head]](np.asarray(p, np.float64), y, w, eps=clip_eps, head=head)
        except CalibrationError as e:
            if fallbacks is None:
                raise
            fallbacks[head] = str(e)
            methods[head], params[head] = "identity", {}
    return Calibration.create(params, tuple(methods.items()), negative_rate, clip_eps)
