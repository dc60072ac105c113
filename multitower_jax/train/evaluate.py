"""Evaluation: run the model over a split, then exact AUC / log loss per head (and for the oracle),
and, when asked for, in-split retrieval hit rates of the towers (`retrieval_report`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jax.experimental import multihost_utils
from tqdm import tqdm

from multitower_jax import fileio
from multitower_jax.config import HIT_RATE_KS
from multitower_jax.data import pipeline
from multitower_jax.train import metrics, sharding

PREDICTION_KEYS = ("pctr", "pcvr", "pctcvr")
EMBEDDING_KEYS = ("e_query", "e_ad")  # Q = E_user + E_context and E_ad, as the retrieval loss sees them
RETRIEVAL_CHUNK = 1024  # queries scored against every ad at once


def make_predict_fn(model, placement: str, mesh, embeddings: bool = False) -> Callable:
    """jit(params, batch) -> {pctr, pcvr, pctcvr} (those the head has), rows sharded like the
    batch; with `embeddings`, also the retrieval query Q and E_ad (`EMBEDDING_KEYS`)."""

    def predict(params, batch):
        out = model.apply({"params": params}, batch, placement, train=False)
        pred = {k: out[k] for k in PREDICTION_KEYS if k in out}
        if embeddings:
            pred.update(e_query=out["e_user"] + out["e_context"], e_ad=out["e_ad"])
        return pred

    return jax.jit(predict, out_shardings=sharding.batch_sharding(mesh))


def collect(predict_fn, params, batches, mesh, desc: str | None = None) -> dict[str, np.ndarray]:
    """Predictions, labels, ids and oracle columns of every valid row, gathered to every host.

    The ids are the batch's int64 `pipeline.HOST_IDS` when it has them (evaluation batches do),
    else its int32 device copies."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
        batch = dict(batch)
        ids = batch.pop(pipeline.HOST_IDS, {})
        out = predict_fn(params, sharding.shard_batch(batch, mesh))
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
            batch = multihost_utils.process_allgather(
                {k: v for k, v in batch.items() if not isinstance(v, Mapping)}, tiled=True)
            ids = {k: _allgather_int64(v) for k, v in ids.items()}
        batch.update(ids)
        valid = np.asarray(batch["valid"]) > 0
        row = {k: np.asarray(v)[valid] for k, v in out.items()}
        for key in (*pipeline.ID_COLUMNS, *pipeline.SEEN_COLUMNS, "click", "conversion", "p_click",
                    "p_convert_given_click"):
            if key in batch:
                row[key] = np.asarray(batch[key])[valid]
        for key, value in row.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _allgather_int64(x: np.ndarray) -> np.ndarray:
    """Every process's int64 rows, in process order; sent as int32 pairs (JAX arrays are 32-bit)."""
    pairs = np.ascontiguousarray(x, np.int64).view(np.int32).reshape(len(x), 2)
    return np.ascontiguousarray(multihost_utils.process_allgather(pairs, tiled=True)).view(np.int64).reshape(-1)


def _unit(x_NxD: np.ndarray) -> np.ndarray:
    x_NxD = np.asarray(x_NxD, np.float32)
    return x_NxD / np.maximum(np.linalg.norm(x_NxD, axis=1, keepdims=True), 1e-12)


def retrieval_report(pred: Mapping[str, np.ndarray], ks=HIT_RATE_KS, l2_normalize: bool = True,
                     every_row: bool = False) -> dict[str, Any]:
    """How well the towers retrieve each positive row's ad among every distinct ad of the split.

    A row's query Q = E_user + E_context scores each ad of the split (by cosine with
    `l2_normalize`, as the retrieval loss does, else by dot product); ``hit_rate_at_<k>`` is the
    fraction of positive rows (clicked ones; with `every_row`, as under implicit feedback, every
    row) whose own ad is among the k best, ties counted in its favour;
    ``retrieval_mrr`` the mean reciprocal rank. Costs N x A x D multiply-adds on the host (N
    positive rows, A distinct ads)."""
    ad_id = np.asarray(pred["ad_id"])
    positive = np.ones(len(ad_id), bool) if every_row else np.asarray(pred["click"]) > 0.5
    ads, first = np.unique(ad_id, return_index=True)
    e_ad_AxD, q_NxD = np.asarray(pred["e_ad"], np.float32)[first], np.asarray(pred["e_query"], np.float32)[positive]
    if l2_normalize:
        e_ad_AxD, q_NxD = _unit(e_ad_AxD), _unit(q_NxD)
    own_N = np.searchsorted(ads, ad_id[positive])
    rank_N = np.zeros(len(q_NxD), np.int64)  # ads scoring strictly above the row's own ad
    for start in range(0, len(q_NxD), RETRIEVAL_CHUNK):
        scores = q_NxD[start:start + RETRIEVAL_CHUNK] @ e_ad_AxD.T
        own = scores[np.arange(len(scores)), own_N[start:start + RETRIEVAL_CHUNK]]
        rank_N[start:start + RETRIEVAL_CHUNK] = np.sum(scores > own[:, None], axis=1)
    out: dict[str, Any] = {"retrieval_num_queries": int(len(q_NxD)), "retrieval_num_ads": int(len(ads))}
    for k in ks:
        out[f"hit_rate_at_{k}"] = float(np.mean(rank_N < k)) if len(q_NxD) else None
    out["retrieval_mrr"] = float(np.mean(1.0 / (rank_N + 1))) if len(q_NxD) else None
    return out


def report(pred: Mapping[str, np.ndarray], implicit: bool = False, l2_normalize: bool = True) -> dict[str, Any]:
    """Per head: CTR over all impressions, CVR over clicked ones, CTCVR over all; same for the
    oracle; the retrieval hit rates when `pred` has the embeddings. Under `implicit` feedback
    (every row a positive) the heads are not trained and have no AUC: only the hit rates."""
    click, conversion = pred["click"], pred["conversion"]
    clicked = click > 0.5
    out: dict[str, Any] = {"num_examples": int(len(click))}
    if EMBEDDING_KEYS[0] in pred:
        out.update(retrieval_report(pred, l2_normalize=l2_normalize, every_row=implicit))
    if implicit:
        return out
    out.update(metrics.binary_report("ctr", pred["pctr"], click))
    if "pcvr" in pred:
        out.update(metrics.binary_report("cvr", pred["pcvr"][clicked], conversion[clicked]))
        out.update(metrics.binary_report("ctcvr", pred["pctcvr"], click * conversion))
        # ESMM's claim: pCVR should rank conversions over the entire impression space, not
        # only over the clicked impressions a plain CVR head is trained on.
        out["cvr_entire_space_auc"] = metrics.auc(pred["pcvr"], conversion)
    if "p_click" in pred:
        oracle_ctcvr = pred["p_click"] * pred["p_convert_given_click"]
        out.update(metrics.binary_report("oracle_ctr", pred["p_click"], click))
        out.update(metrics.binary_report("oracle_cvr", pred["p_convert_given_click"][clicked], conversion[clicked]))
        out.update(metrics.binary_report("oracle_ctcvr", oracle_ctcvr, click * conversion))
        out["oracle_cvr_entire_space_auc"] = metrics.auc(pred["p_convert_given_click"], conversion)
        # Expected AUCs against the oracle's probabilities: what the test AUC would be without label
        # noise (CVR over every impression, as if each were clicked). Compare runs with these.
        expected = {"ctr": (pred["pctr"], pred["p_click"])}
        if "pcvr" in pred:
            expected.update(cvr=(pred["pcvr"], pred["p_convert_given_click"]), ctcvr=(pred["pctcvr"], oracle_ctcvr))
        for name, (score, prob) in expected.items():
            out[f"expected_{name}_auc"] = metrics.expected_auc(score, prob)
            out[f"oracle_expected_{name}_auc"] = metrics.expected_auc(prob, prob)
    out.update(seen_report(pred))
    return out


def seen_report(pred: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """AUCs over the rows whose user (ad) was seen in the train split and over the rest.

    Needs the rows' ``seen_user`` / ``seen_ad`` flags (`pipeline.SEEN_COLUMNS`, from the
    statistics pass); a flag that is absent gives no keys. For each of ``user`` and ``ad``:
    ``num_examples_{seen,unseen}_<x>``, ``num_clicks_{seen,unseen}_<x>``, and
    ``ctr_auc_{seen,unseen}_<x>`` (also ``ctcvr_`` with a CVR head, ``oracle_ctr_`` on synthetic
    data). An AUC is None (JSON null) where the segment is empty or has a single class.
    """
    click = np.asarray(pred["click"]) > 0.5
    scores = {"ctr": (pred["pctr"], click)}
    if "pctcvr" in pred:
        scores["ctcvr"] = (pred["pctcvr"], click & (np.asarray(pred["conversion"]) > 0.5))
    if "p_click" in pred:
        scores["oracle_ctr"] = (pred["p_click"], click)
    out: dict[str, Any] = {}
    for entity in ("user", "ad"):
        if f"seen_{entity}" not in pred:
            continue
        seen = np.asarray(pred[f"seen_{entity}"]) > 0
        for segment, rows in ((f"seen_{entity}", seen), (f"unseen_{entity}", ~seen)):
            out[f"num_examples_{segment}"] = int(rows.sum())
            out[f"num_clicks_{segment}"] = int(click[rows].sum())
            for name, (score, label) in scores.items():
                auc = metrics.auc(np.asarray(score)[rows], label[rows])
                out[f"{name}_auc_{segment}"] = None if np.isnan(auc) else auc
    return out


def write_predictions(pred: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """One row per impression: ids, labels (int64 0 / 1, as in the logs), predictions and the
    oracle columns when present."""
    labels = ("click", "conversion")
    with fileio.replacing(path) as tmp:
        pq.write_table(pa.table({k: np.asarray(v).astype(np.int64) if k in labels else np.asarray(v)
                                 for k, v in pred.items() if k not in EMBEDDING_KEYS}), str(tmp))
