"""The learners: logistic regression (scikit-learn) on hashed features, gradient-boosted trees
(LightGBM). Each fits a click model, a CTCVR model (click x conversion over every impression)
and a CVR model on the clicked rows; pCTCVR is the direct CTCVR model's or pCTR x pCVR,
whichever ranks the validation split's conversions better. Settings are chosen on the
validation split only; the evaluation split is never looked at while fitting.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from multitower_jax.train import metrics


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


# -- logistic regression -------------------------------------------------------------------------

class LogisticModel:
    """An L2 logistic regression on a sparse matrix; C chosen on validation AUC.

    Each C is fitted from scratch (L-BFGS): a warm start from the neighbouring C stops at once,
    since the change of the L2 term is within L-BFGS's gradient tolerance."""

    def __init__(self, Cs, max_iter: int = 300, tol: float = 1e-4):
        self.Cs, self.max_iter, self.tol = sorted(float(c) for c in Cs), int(max_iter), float(tol)
        self.coef: np.ndarray | None = None
        self.intercept = 0.0
        self.details: dict[str, Any] = {}

    def fit(self, X: sp.csr_matrix, y: np.ndarray, X_val: sp.csr_matrix, y_val: np.ndarray) -> LogisticModel:
        from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
        from threadpoolctl import threadpool_limits  # noqa: PLC0415 (a scikit-learn dependency)

        if np.unique(y).size < 2:  # e.g. no conversion in a tiny train split: the constant rate
            self.coef, self.intercept = np.zeros(X.shape[1], np.float32), _logit(float(np.mean(y)))
            self.details = {"constant": True}
            return self
        path, best = [], -np.inf
        for C in self.Cs:
            start = time.perf_counter()
            # One BLAS thread: L-BFGS's vector updates gain nothing from threads, and on a busy
            # machine spinning BLAS threads made a fit ten times slower.
            with threadpool_limits(1, user_api="blas"):
                clf = LogisticRegression(C=C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol).fit(X, y)
            auc = metrics.auc(clf.decision_function(X_val), y_val)
            path.append({"C": C, "validation_auc": auc, "iterations": int(np.max(clf.n_iter_)),
                         "seconds": round(time.perf_counter() - start, 1)})
            if auc > best or self.coef is None:
                best, self.coef, self.intercept = auc, clf.coef_.ravel().copy(), float(clf.intercept_[0])
                self.details = {"C": C, "validation_auc": auc}
        self.details["path"] = path
        return self

    def predict(self, X: sp.csr_matrix) -> np.ndarray:
        return sigmoid(np.asarray(X @ self.coef, np.float64) + self.intercept)


# -- gradient-boosted trees ----------------------------------------------------------------------

class BoostedTrees:
    """LightGBM on a dense table, early stopping on validation AUC."""

    def __init__(self, params: dict[str, Any], max_rounds: int, early_stopping: int):
        self.params, self.max_rounds, self.early_stopping = dict(params), int(max_rounds), int(early_stopping)
        self.booster, self.constant = None, 0.0
        self.details: dict[str, Any] = {}

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
            names: list[str], categorical: list[str]) -> BoostedTrees:
        import lightgbm as lgb  # noqa: PLC0415

        if np.unique(y).size < 2:
            self.constant, self.details = float(np.mean(y)), {"constant": True}
            return self
        start = time.perf_counter()
        params = {"objective": "binary", "metric": "auc", "verbosity": -1, **self.params}
        safe = {name: re.sub(r"[^0-9A-Za-z_.]", "_", name) for name in names}  # LightGBM refuses ":" and friends
        train = lgb.Dataset(X, y, feature_name=[safe[n] for n in names],
                            categorical_feature=[safe[n] for n in categorical], free_raw_data=True)
        valid = lgb.Dataset(X_val, y_val, reference=train)
        self.booster = lgb.train(params, train, num_boost_round=self.max_rounds, valid_sets=[valid],
                                 callbacks=[lgb.early_stopping(self.early_stopping, verbose=False)])
        gain = self.booster.feature_importance("gain")
        top = np.argsort(-gain)[:10]
        self.details = {"rounds": int(self.booster.best_iteration), "validation_auc": float(self.booster.best_score["valid_0"]["auc"]),
                        "seconds": round(time.perf_counter() - start, 1),
                        "top_features_by_gain": [names[i] for i in top if gain[i] > 0]}
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.booster is None:
            return np.full(len(X), self.constant)
        return np.asarray(self.booster.predict(X, num_iteration=self.booster.best_iteration), np.float64)


# -- the three heads -----------------------------------------------------------------------------

HEADS = ("click", "cvr", "ctcvr")


def fit_heads(fit_one: Callable[[np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray], Any],
              predict_val: Callable[[Any], np.ndarray], train_labels: dict[str, np.ndarray],
              val_labels: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the click, CVR (on clicked rows) and CTCVR models; choose how pCTCVR is formed.

    ``fit_one(train_rows, y, val_rows, y_val)`` fits one model on a subset of rows (None = all),
    tuned on the validation rows given; ``predict_val(model)`` is its probability on every
    validation row; ``*_labels``: {"click", "ctcvr"} as floats."""
    clicked = np.flatnonzero(train_labels["click"] > 0)
    val_clicked = np.flatnonzero(val_labels["click"] > 0)
    models = {
        "click": fit_one(None, train_labels["click"], None, val_labels["click"]),
        "cvr": fit_one(clicked, train_labels["ctcvr"][clicked], val_clicked, val_labels["ctcvr"][val_clicked]),
        "ctcvr": fit_one(None, train_labels["ctcvr"], None, val_labels["ctcvr"]),
    }
    val = {head: predict_val(m) for head, m in models.items()}
    direct = metrics.auc(val["ctcvr"], val_labels["ctcvr"])
    product = metrics.auc(val["click"] * val["cvr"], val_labels["ctcvr"])
    details = {head: m.details for head, m in models.items()}
    details["ctcvr_from"] = "direct" if direct >= product else "product"
    details["validation_ctcvr_auc"] = {"direct": direct, "product": product}
    return models, details


def head_predictions(models: dict[str, Any], predict: Callable[[Any], np.ndarray], ctcvr_from: str) -> dict[str, np.ndarray]:
    """{pctr, pcvr, pctcvr} of every row; pCTCVR as chosen by `fit_heads`."""
    pctr, pcvr = predict(models["click"]), predict(models["cvr"])
    pctcvr = predict(models["ctcvr"]) if ctcvr_from == "direct" else pctr * pcvr
    return {"pctr": pctr, "pcvr": pcvr, "pctcvr": pctcvr}
