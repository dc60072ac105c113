"""A warm start of the wide part's CVR column: a logistic regression of conversion given click.

The wide part (`models.wide.Wide`) is linear in the context's features, so the logistic
regression of conversion on clicked train rows over exactly its inputs can be fitted in closed
form (L-BFGS, L2 strength chosen on held-out clicks) before training, and its weights copied
into the wide part's CVR column. Trained by the optimizer instead, that column stays far from
the fit: conversions are rare (~1 in 8 clicks on the quickstart world, ~2 per batch), so the
gradient of a query word's weight changes sign from batch to batch and AdamW's steps nearly
cancel. After 2,000 steps of the quickstart a buy word's CVR weight was ~0.1 where the fitted
regression gives it the true effect (+0.81 in the world's conversion logit).

    wide_params = warm_start_cvr(config, spec, stats, placement, wide_params)  # all of it:
    X, blocks = design_matrix(spec.context(placement), clicked_train_rows(...))  # its inputs
    fit = fit_logistic(X, conversion)                                          # on clicked rows
    wide_params = set_column(wide_params, blocks, fit, column=1)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.sparse
from sklearn.linear_model import LogisticRegression

from multitower_jax import features as F
from multitower_jax.data import pipeline, preprocess
from multitower_jax.model_settings import logit_poolings

# L2 strengths tried (sklearn's C, the inverse of the penalty), chosen by held-out log loss.
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
HELD_OUT = 0.2


@dataclasses.dataclass(frozen=True)
class Block:
    """Columns [start, stop) of the design matrix are rows [0, stop - start) of `param`'s
    parameter `leaf` (`embedding` of a table, `kernel` of the numeric map)."""

    param: str
    leaf: str
    start: int
    stop: int


def _pooled_ids(ids_BxL: np.ndarray, width: int, pooling: str) -> scipy.sparse.csr_matrix:
    """Ids [B, L] (0 = padding) -> [B, width] with 1/n ("mean") or 1 ("sum") at each of a row's n
    ids (duplicates add up): the wide part's pooling of its table rows as a matrix product."""
    ids_BxL = np.asarray(ids_BxL, np.int64).reshape(len(ids_BxL), -1)
    mask = ids_BxL > 0
    n_B = np.maximum(mask.sum(axis=1), 1) if pooling == "mean" else np.ones(len(ids_BxL))
    rows = np.broadcast_to(np.arange(len(ids_BxL))[:, None], ids_BxL.shape)[mask]
    values = (1.0 / n_B)[rows]
    return scipy.sparse.csr_matrix((values, (rows, ids_BxL[mask])), shape=(len(ids_BxL), width))


def design_matrix(spec: F.TowerSpec, features: Mapping[str, np.ndarray],
                  pooling: str = "mean") -> tuple[scipy.sparse.csr_matrix, list[Block]]:
    """A tower's preprocessed features -> (float64[B, P] sparse, blocks): the wide part's
    inputs, so that X @ w + bias is its logit for the weights w read off its parameters by
    `blocks`. A categorical id is a one-hot column (id 0, out of vocabulary, included); the ids
    of a multi-hot or text feature share 1/n each with `pooling` "mean", 1 each with "sum"
    (padding 0 left out; the wide part's `pooling`); numeric and dense
    columns come last, in the order the wide part concatenates them."""
    parts, blocks, numeric, start = [], [], [], 0
    for f in spec.features:
        x = np.asarray(features[f.name])
        if isinstance(f, F.Categorical):
            ids = x.astype(np.int64).reshape(-1)
            part = scipy.sparse.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), ids)),
                                           shape=(len(ids), f.num_embeddings))
        elif isinstance(f, F.MultiHot | F.Text):
            part = _pooled_ids(x, f.num_embeddings if isinstance(f, F.MultiHot) else f.vocab_size, pooling)
        elif isinstance(f, F.Numeric):
            numeric.append(x.astype(np.float64).reshape(-1, 1))
            continue
        elif isinstance(f, F.Dense):
            numeric.append(x.astype(np.float64).reshape(len(x), -1))
            continue
        else:
            raise TypeError(f"unknown feature type {f.type!r} for {f.name!r}")
        parts.append(part)
        blocks.append(Block(f"wide_{f.name}", "embedding", start, start + part.shape[1]))
        start += part.shape[1]
    if numeric:
        dense = np.concatenate(numeric, axis=1)
        parts.append(scipy.sparse.csr_matrix(dense))
        blocks.append(Block("wide_numeric", "kernel", start, start + dense.shape[1]))
    return scipy.sparse.hstack(parts, format="csr"), blocks


@dataclasses.dataclass(frozen=True)
class Fit:
    coef: np.ndarray  # float64[P]
    intercept: float
    C: float  # the chosen inverse L2 strength
    held_out_log_loss: dict[float, float]  # per C tried
    rows: int
    positives: float


class OneLabelError(ValueError):
    """Too few rows, or only one label among them: there is no regression to fit."""


def _log_loss(y: np.ndarray, logit: np.ndarray, weight: np.ndarray) -> float:
    loss = np.logaddexp(0.0, logit) - y * logit
    return float(np.sum(weight * loss) / np.sum(weight))


def fit_logistic(X: scipy.sparse.csr_matrix, y: np.ndarray, weight: np.ndarray | None = None,
                 seed: int = 0, c_grid: Sequence[float] = C_GRID) -> Fit:
    """An L2-penalized logistic regression of y on X. The penalty is the one of `c_grid` with
    the lowest log loss on a random held-out fifth of the rows; the returned fit uses every row."""
    y = np.asarray(y, np.float64)
    weight = np.ones(len(y)) if weight is None else np.asarray(weight, np.float64)
    if len(y) < 10 or y.min() == y.max():
        raise OneLabelError(f"wide part's logistic warm start: {len(y)} clicked train rows with "
                         f"{int(y.sum())} conversions; needs both labels (set model.wide_init='zeros')")
    held = np.random.default_rng(seed).random(len(y)) < HELD_OUT
    if y[~held].min() == y[~held].max():
        held[:] = False  # too few positives to hold any out: every C scores on the train rows

    def model(C: float) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=1000, tol=1e-6)

    losses = {}
    for C in c_grid:
        m = model(C).fit(X[~held], y[~held], sample_weight=weight[~held])
        rows = held if held.any() else ~held
        losses[float(C)] = _log_loss(y[rows], m.decision_function(X[rows]), weight[rows])
    best = min(losses, key=losses.get)
    m = model(best).fit(X, y, sample_weight=weight)
    return Fit(m.coef_[0].astype(np.float64), float(m.intercept_[0]), best, losses, len(y), float(y.sum()))


def set_column(wide_params: Mapping[str, Any], blocks: Sequence[Block], fit: Fit, column: int) -> dict[str, Any]:
    """The wide part's parameters with logit `column` set to the fit (weights and bias); the
    other columns and table rows past the fitted ones (sharding pads) keep theirs. Jitted per
    array with its sharding, so it works on sharded parameters."""
    def assign(array: jax.Array, rows_P: np.ndarray) -> jax.Array:
        values = jnp.asarray(rows_P, array.dtype)
        if array.ndim == 1:
            return jax.jit(lambda a: a.at[column].set(values), out_shardings=getattr(array, "sharding", None))(array)
        n = len(rows_P)
        return jax.jit(lambda a: a.at[:n, column].set(values), out_shardings=getattr(array, "sharding", None))(array)

    out = {name: dict(leaves) for name, leaves in wide_params.items() if isinstance(leaves, Mapping)}
    out.update({name: value for name, value in wide_params.items() if not isinstance(value, Mapping)})
    for b in blocks:
        out[b.param][b.leaf] = assign(wide_params[b.param][b.leaf], fit.coef[b.start:b.stop])
    out["wide_bias"] = assign(wide_params["wide_bias"], np.asarray(fit.intercept))
    return out


def clicked_train_rows(config: ml_collections.ConfigDict, spec: F.FeatureSpec, stats: preprocess.FeatureStats,
                       placement: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(the context tower's preprocessed features, conversion, weight) of the clicked rows of
    `placement`'s train split, as the model sees them (same vocabularies, hashing, min_count)."""
    transforms = preprocess.Preprocessor(spec, placement, stats).transforms["context"]
    parts, labels, weights = [], [], []
    source = pipeline.data_source(config, placement, "train")
    for block in pipeline.raw_blocks(source, progress=f"wide part's CVR fit ({placement}): reading clicks"):
        clicked = np.asarray(block["click"]) > 0
        parts.append({name: fn(np.asarray(block[f"context.{name}"])[clicked]) for name, fn in transforms.items()})
        labels.append(np.asarray(block["conversion"])[clicked] > 0)
        weights.append(np.asarray(block["weight"], np.float64)[clicked] if "weight" in block
                       else np.ones(int(clicked.sum())))
    features = {name: np.concatenate([part[name] for part in parts]) for name in transforms}
    return features, np.concatenate(labels).astype(np.float64), np.concatenate(weights)


def warm_start_cvr(config: ml_collections.ConfigDict, spec: F.FeatureSpec, stats: preprocess.FeatureStats,
                   placement: str, wide_params: Mapping[str, Any]) -> dict[str, Any]:
    """`placement`'s wide parameters with the CVR column (1) fitted to its clicked train rows;
    unchanged, with a warning, when those rows hold only one label (no conversions, e.g.)."""
    features, conversion, weight = clicked_train_rows(config, spec, stats, placement)
    pooling = logit_poolings(config.model.get("wide_pooling", "mean"), 2)[1]  # the CVR column's
    X, blocks = design_matrix(spec.context(placement), features, pooling)
    try:
        fit = fit_logistic(X, conversion, weight, int(config.seed))
    except OneLabelError as e:
        warnings.warn(f"{e}; the wide CVR column ({placement}) starts at zero instead", stacklevel=2)
        return dict(wide_params)
    print(f"wide part ({placement}): CVR column from a logistic regression of conversion given click on "
          f"{fit.rows:,} clicked train rows ({fit.positives:,.0f} conversions, {X.shape[1]:,} inputs; "
          f"L2 C={fit.C:g}, held-out log loss {fit.held_out_log_loss[fit.C]:.4f})")
    return set_column(wide_params, blocks, fit, column=1)
