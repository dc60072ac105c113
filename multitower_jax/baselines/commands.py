"""`multitower baseline`: fit the built-in baselines on a workdir's train split, tune them on
validation, score them on the chosen split and write ``<workdir>/eval_baseline.json``.

    {"split": "test", "placement": "search",
     "baselines": {name: <the keys of eval_test.json: ctr_auc, ctr_logloss, cvr_auc, ctcvr_auc, ...>},
     "details": {name: what was chosen on validation, seconds, ...}, "notes": [...]}
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from multitower_jax import fileio
from multitower_jax.baselines import BaselineError, data, features, models, rates, text
from multitower_jax.baselines.data import Table
from multitower_jax.baselines.report import RESULT_FILE
from multitower_jax.train import evaluate


def _log(message: str) -> None:
    print(f"baseline: {message}", file=sys.stderr, flush=True)


def _columns_present(table: Table, names) -> tuple[list[str], list[str]]:
    """(names whose every part ("a*b") is a column of the table, the others)."""
    ok = [n for n in names if all(p in table for p in n.split("*"))]
    return ok, [n for n in names if n not in ok]


def _short(name: str) -> str:
    return "_x_".join(p.split(".")[-1] for p in name.split("*"))


def _labels(table: Table) -> dict[str, np.ndarray]:
    return {"click": table.click, "ctcvr": table.ctcvr}


def _report(table: Table, pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """The keys `evaluate.report` writes into eval_<split>.json, for these predictions (with the
    expected AUCs against the oracle's probabilities on synthetic data, as the model's report)."""
    oracle = {k: table[k] for k in data.ORACLE} if all(k in table for k in data.ORACLE) else {}
    return evaluate.report({"click": table["click"], "conversion": table["conversion"], **oracle, **pred})


def fit_rates(s: ml_collections.ConfigDict, tables: dict[str, Table], split: str, out: dict, details: dict, notes: list) -> None:
    train, val, target = tables["train"], tables["validation"], tables[split]
    present, missing = _columns_present(train, s.rates.ids)
    if missing:
        notes.append(f"rates: no column {missing} in the data, skipped")
    for column in present:
        start = time.perf_counter()
        model = rates.IdRates.fit(train, column)
        chosen = model.tune(val, tuple(float(m) for m in s.rates.prior_strengths))
        name = f"rate_{_short(column)}"
        out[name] = _report(target, model.predict(target))
        details[name] = {"column": column, **chosen, "seconds": round(time.perf_counter() - start, 1)}
        _log(f"{name}: {split} CTR AUC {out[name]['ctr_auc']:.4f}, CTCVR AUC {out[name]['ctcvr_auc']:.4f}")


def fit_logistic(s: ml_collections.ConfigDict, tables: dict[str, Table], words: dict, split: str,
                 out: dict, details: dict, notes: list) -> None:
    start = time.perf_counter()
    train = tables["train"]
    crosses, missing = _columns_present(train, s.lr.id_crosses)
    if missing:
        notes.append(f"lr: crosses {missing} name absent columns, skipped")
    hashed = features.HashedFeatures(bits=int(s.lr.hash_bits), num_bins=int(s.lr.num_bins),
                                     max_cross_size=int(s.lr.max_cross_size), id_crosses=tuple(crosses),
                                     word_crosses=bool(s.lr.word_crosses)).fit(train)
    X = {name: hashed.transform(t, words[name]) for name, t in tables.items()}
    kept = features.frequent_columns(X["train"], int(s.lr.min_count))
    X = {name: features.select_columns(m, kept) for name, m in X.items()}
    _log(f"lr: {X['train'].nnz / max(len(train), 1):.0f} hashed features per row, {len(kept):,} weights "
         f"(buckets of 2^{s.lr.hash_bits} seen in >= {s.lr.min_count} train rows; {time.perf_counter() - start:.0f} s)")

    def fit_one(rows, y, val_rows, y_val):
        X_val = X["validation"] if val_rows is None else X["validation"][val_rows]
        return models.LogisticModel(s.lr.C, s.lr.max_iter, s.lr.tol).fit(
            X["train"] if rows is None else X["train"][rows], y, X_val, y_val)

    fitted, chosen = models.fit_heads(fit_one, lambda m: m.predict(X["validation"]), _labels(train),
                                      _labels(tables["validation"]))
    out["logistic_regression"] = _report(tables[split], models.head_predictions(
        fitted, lambda m: m.predict(X[split]), chosen["ctcvr_from"]))
    details["logistic_regression"] = {**chosen, "features_per_row": round(X["train"].nnz / max(len(train), 1), 1),
                                      "weights": int(len(kept)),
                                      "crossed_columns": ["*".join(c) for c in hashed.crossed_columns(train)]
                                      + crosses + features.text_crosses(train),
                                      "seconds": round(time.perf_counter() - start, 1)}
    r = out["logistic_regression"]
    _log(f"logistic_regression: {split} CTR AUC {r['ctr_auc']:.4f}, CTCVR AUC {r['ctcvr_auc']:.4f}")


def fit_trees(s: ml_collections.ConfigDict, tables: dict[str, Table], words: dict, split: str,
              out: dict, details: dict, notes: list) -> None:
    if not models.lightgbm_available():
        note = "gbdt: LightGBM is not installed, skipped (pip install 'multitower_jax[baselines]')"
        notes.append(note)
        _log(note)
        return
    start = time.perf_counter()
    g = s.gbdt
    train = tables["train"]
    columns, missing = _columns_present(train, g.target_encode)
    if "topic:ad" in train and "user_id" in train:
        columns.append("user_id*topic:ad")  # a user's click rate on an LSA topic
    if missing:
        notes.append(f"gbdt: target encodings {missing} name absent columns, skipped")
    encodings = {"train": rates.out_of_fold_encodings(train, columns, int(g.folds), float(g.prior_strength), int(s.seed))}
    for name, t in tables.items():
        if name != "train":
            encodings[name] = rates.full_train_encodings(train, t, columns, float(g.prior_strength))
    tabular = features.Tabular()
    X = {name: tabular.transform(t, words[name], encodings[name]) for name, t in tables.items()}
    labels = _labels(train)
    if 0 < int(g.max_train_rows) < len(train):
        keep = np.sort(np.random.default_rng(int(s.seed)).choice(len(train), int(g.max_train_rows), replace=False))
        X["train"], labels = X["train"][keep], {k: v[keep] for k, v in labels.items()}
        notes.append(f"gbdt: fitted on a random {len(keep):,}-row subsample of the {len(train):,} train rows "
                     f"(config.baselines.gbdt.max_train_rows)")
        _log(notes[-1])
    params = {"learning_rate": float(g.learning_rate), "num_leaves": int(g.num_leaves),
              "min_data_in_leaf": int(g.min_data_in_leaf), "feature_fraction": float(g.feature_fraction),
              "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": float(g.lambda_l2), "seed": int(s.seed)}
    if int(g.num_threads) > 0:
        params["num_threads"] = int(g.num_threads)

    def fit_one(rows, y, val_rows, y_val):
        X_val = X["validation"] if val_rows is None else X["validation"][val_rows]
        return models.BoostedTrees(params, int(g.max_rounds), int(g.early_stopping)).fit(
            X["train"] if rows is None else X["train"][rows], y, X_val, y_val, tabular.names, tabular.categorical)

    fitted, chosen = models.fit_heads(fit_one, lambda m: m.predict(X["validation"]), labels,
                                      _labels(tables["validation"]))
    out["gbdt"] = _report(tables[split], models.head_predictions(fitted, lambda m: m.predict(X[split]),
                                                                 chosen["ctcvr_from"]))
    details["gbdt"] = {**chosen, "features": tabular.names, "target_encodings": columns,
                       "train_rows": int(len(X["train"])), "seconds": round(time.perf_counter() - start, 1)}
    _log(f"gbdt: {split} CTR AUC {out['gbdt']['ctr_auc']:.4f}, CTCVR AUC {out['gbdt']['ctcvr_auc']:.4f}")


def run(config: ml_collections.ConfigDict, workdir: str, split: str = "test") -> dict[str, Any]:
    """Fit every learner of ``config.baselines.run`` on train (tuned on validation), score `split`,
    write ``<workdir>/eval_baseline.json`` atomically; returns what it wrote."""
    if split not in ("validation", "test"):
        raise BaselineError(f"--split {split}: the baselines are fitted on train and tuned on validation; "
                            "score them on validation or test")
    s = config.baselines
    placement = s.placement or config.data.placements[0]
    workdir = epath.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    start = time.perf_counter()
    tables = {name: data.load_split(config, placement, name) for name in dict.fromkeys(("train", "validation", split))}
    if len(tables["train"]) == 0:
        raise BaselineError(f"{config.data.dir}: the {placement} train split is empty")
    _log(f"read {', '.join(f'{n} {len(t):,}' for n, t in tables.items())} rows ({time.perf_counter() - start:.0f} s)")

    words = {}
    if {"lr", "gbdt"} & set(s.run):  # the learners on features: text similarities and words
        lsa_start = time.perf_counter()
        space = text.TextSpace(int(s.text.dims), int(s.text.topics), int(s.seed)).fit(tables["train"])
        tables = {name: t.with_columns(space.features(t)) for name, t in tables.items()}
        words = {name: data.text_words(t) for name, t in tables.items()}
        if space.svd is not None:
            _log(f"text: LSA of the train texts ({space.svd.n_components} dims, {len(space.centroids)} topics, "
                 f"{time.perf_counter() - lsa_start:.0f} s)")

    results: dict[str, dict] = {}
    details: dict[str, dict] = {}
    notes: list[str] = []
    if "rates" in s.run:
        fit_rates(s, tables, split, results, details, notes)
    if "lr" in s.run:
        fit_logistic(s, tables, words, split, results, details, notes)
    if "gbdt" in s.run:
        fit_trees(s, tables, words, split, results, details, notes)

    report = {"split": split, "placement": placement, "data_dir": str(config.data.dir),
              "rows": {name: len(t) for name, t in tables.items()}, "baselines": results, "details": details,
              "notes": notes, "seconds": round(time.perf_counter() - start, 1)}
    fileio.write_json(workdir / RESULT_FILE, report)
    return report


def summary(report: dict[str, Any]) -> str:
    """A small table of the main figures, one row per baseline."""
    keys = ("ctr_auc", "ctr_logloss", "ctcvr_auc", "cvr_auc")
    rows = [f"{'baseline':<24}" + "".join(f"{k:>13}" for k in keys)]
    for name, r in report["baselines"].items():
        rows.append(f"{name:<24}" + "".join(f"{r.get(k, float('nan')):>13.4f}" for k in keys))
    return "\n".join(rows)
