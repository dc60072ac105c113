"""Implicit feedback (`data.feedback="implicit"`): logs without label columns ingest as clicks, the
towers train by retrieval alone, and validation, early stopping and eval_test.json use in-split
retrieval hit rates (no NaN AUCs); the hit rates agree with a brute-force ranking."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from multitower_jax import config as config_lib
from multitower_jax.train import evaluate, loop
from tests.conftest import synthetic_config
from tests.test_logs import make_config, make_rows, read_back, write

IMPLICIT = ["--config.data.feedback=implicit", "--config.loss.alpha=0.0", "--config.loss.beta=1.0",
            "--config.loss.retrieval_positives=impressions", "--config.train.early_stopping_metric=hit_rate_at_10",
            "--config.model.wide=False", "--config.model.wide_init=zeros", "--config.loss.wide_cvr_weight=0.0",
            "--config.optim.freeze_wide_cvr=False"]


def brute_force_hit_rates(q, e_ad, ad_id, rows, ks):
    """Rank each row's own ad among the distinct ads by cosine, one row at a time."""
    ads = sorted(set(ad_id.tolist()))
    vectors = {a: e_ad[list(ad_id).index(a)] for a in ads}
    hits, rr = {k: 0 for k in ks}, 0.0
    for i in rows:
        cos = {a: float(q[i] @ v / (np.linalg.norm(q[i]) * np.linalg.norm(v))) for a, v in vectors.items()}
        above = sum(c > cos[ad_id[i]] for c in cos.values())
        for k in ks:
            hits[k] += above < k
        rr += 1.0 / (above + 1)
    return {k: hits[k] / len(rows) for k in ks}, rr / len(rows)


def test_hit_rates_agree_with_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    n, ads, dim = 300, 40, 6
    ad_id = rng.integers(0, ads, n)
    table = rng.normal(size=(ads, dim))
    e_ad = table[ad_id]
    q = e_ad * 0.3 + rng.normal(size=(n, dim))  # queries near their own ad, noisily
    click = rng.random(n) < 0.4
    pred = {"e_query": q, "e_ad": e_ad, "ad_id": ad_id, "click": click.astype(float)}
    for every_row, rows in ((False, np.flatnonzero(click)), (True, np.arange(n))):
        got = evaluate.retrieval_report(pred, ks=(1, 5, 10), every_row=every_row)
        want, mrr = brute_force_hit_rates(q, e_ad, ad_id, rows, (1, 5, 10))
        assert got["retrieval_num_queries"] == len(rows) and got["retrieval_num_ads"] == len(set(ad_id.tolist()))
        for k in (1, 5, 10):
            assert got[f"hit_rate_at_{k}"] == pytest.approx(want[k], abs=1e-12)
        assert got["retrieval_mrr"] == pytest.approx(mrr, rel=1e-9)
        assert 0.05 < got["hit_rate_at_1"] < got["hit_rate_at_10"] < 1.0  # informative, not degenerate


def test_implicit_logs_need_no_label_columns(tmp_path):
    config, spec = make_config([tmp_path / "a.jsonl"], f"--config.data.dir={tmp_path / 'data'}", *IMPLICIT)
    rows = make_rows(spec, 60, seed=3)
    del rows["click"], rows["conversion"]
    write(tmp_path / "a.jsonl", rows)
    from multitower_jax.data import logs

    logs.ingest(config, spec, tmp_path / "data")
    got = read_back(tmp_path / "data", "train")
    assert len(got["click"]) > 0 and (got["click"] == 1).all() and (got["conversion"] == 0).all()
    explicit, _ = make_config([tmp_path / "a.jsonl"], f"--config.data.dir={tmp_path / 'other'}")
    with pytest.raises(logs.LogError, match="missing column 'click'"):
        logs.ingest(explicit, spec, tmp_path / "other")


def test_implicit_training_stops_on_hit_rate_and_reports_no_nan(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.train.num_steps=40", "--config.train.eval_every=20",
                              "--config.train.checkpoint_every=20", *IMPLICIT)
    result = loop.train(config, tmp_path)
    saved = json.loads((tmp_path / "eval_test.json").read_text())  # strict JSON: no NaN anywhere
    assert "ctr_auc" not in saved and "ctcvr_auc" not in saved
    assert saved["retrieval_num_queries"] == saved["num_examples"] == 2000  # every test row is a positive
    random_rate = 10 / saved["retrieval_num_ads"]
    assert saved["hit_rate_at_10"] > 2 * random_rate  # the towers learned to retrieve
    assert saved["params_from"] == "best" and saved["best_validation_hit_rate_at_10"] > 2 * random_rate
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in saved.values())
    assert result["hit_rate_at_10"] == saved["hit_rate_at_10"]


def test_implicit_feedback_config_errors_name_the_key(synthetic_dir):
    with pytest.raises(config_lib.ConfigError, match="loss.alpha"):
        synthetic_config(synthetic_dir, *IMPLICIT, "--config.loss.alpha=1.0")
    with pytest.raises(config_lib.ConfigError, match="train.early_stopping_metric"):
        synthetic_config(synthetic_dir, *IMPLICIT, "--config.train.early_stopping_metric=ctr_auc")
    with pytest.raises(config_lib.ConfigError, match="data.feedback"):
        synthetic_config(synthetic_dir, "--config.data.feedback=implicitly")
    with pytest.raises(config_lib.ConfigError, match="train.early_stopping_metric"):
        synthetic_config(synthetic_dir, "--config.train.early_stopping_metric=hit_rate_at_5")


def test_explicit_training_can_stop_on_a_hit_rate(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.train.num_steps=20", "--config.train.eval_every=20",
                              "--config.train.early_stopping_metric=hit_rate_at_100")
    result = loop.train(config, tmp_path)
    assert 0 < result["ctr_auc"] < 1 and result["best_validation_hit_rate_at_100"] > 0
    assert 0 < result["retrieval_num_queries"] < result["num_examples"]  # the clicked test rows
