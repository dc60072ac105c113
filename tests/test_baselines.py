"""`multitower baseline`: per-id rates equal a hand computation, the learners recover a planted
cross-tower effect, the report has eval_test.json's keys, and `evaluate` prints the comparison."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from multitower_jax import cli
from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.baselines import commands, data, models, rates, report, settings
from multitower_jax.data import builders
from multitower_jax.train import evaluate
from tests.conftest import random_chunks, tiny_config

SIZES = {"train": 30000, "validation": 3000, "test": 3000}
AD_EFFECT = np.random.default_rng(7).normal(0.0, 0.5, 100)  # a planted quality per ad


def _planted(spec, split: str, n: int):
    """Random raw impressions whose click depends on a cross-tower match (user device type ==
    ad campaign type, no main effect of either), a step in a numeric context column and a per-ad
    quality; 200 users, 100 ads."""
    seed = {"train": 1, "validation": 2, "test": 3}[split]
    for chunk in random_chunks(spec, "search", n, seed):
        rng = np.random.default_rng((seed, int(chunk["impression_id"][0])))
        m = len(chunk["click"])
        chunk["user_id"] = rng.integers(0, 200, m)
        chunk["ad_id"] = rng.integers(0, 100, m)
        chunk["user.device_type"] = rng.integers(0, 5, m)
        chunk["ad.campaign_type"] = rng.integers(0, 5, m)
        words = np.array([b"red", b"shoe", b"bag", b"lamp", b"tent", b"sale"], dtype=object)
        for column, k in (("context.query", 1), ("ad.title", 2), ("ad.description", 2)):  # short texts
            chunk[column] = np.array([b" ".join(rng.choice(words, k)) for _ in range(m)], dtype=object)
        match = chunk["user.device_type"] == chunk["ad.campaign_type"]
        busy = chunk["context.pages_viewed"] > np.e  # above the median of the lognormal(1, 1) values
        p = 1 / (1 + np.exp(-(-2.5 + 2.5 * match + 1.2 * busy + AD_EFFECT[chunk["ad_id"]])))
        chunk["p_click"] = p.astype(np.float32)
        chunk["click"] = (rng.random(m) < p).astype(np.int64)
        chunk["conversion"] = chunk["click"] * (rng.random(m) < 0.3 + 0.4 * match)
        yield chunk


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A workdir with only config.json (as `generate` leaves one) over the planted data."""
    data_dir = tmp_path_factory.mktemp("planted_data")
    config = tiny_config(data_dir)
    spec = F.parse_spec(config.features)
    builders.SyntheticImpressions(
        spec=spec, placement="search", block_size=256, with_oracle=True,
        chunk_source=lambda split: _planted(spec, split, SIZES[split]), data_dir=str(data_dir)).download_and_prepare()
    workdir = tmp_path_factory.mktemp("planted_workdir")
    config_lib.write_resolved(config, workdir)
    return workdir


def _config(workdir, *overrides):
    return settings.baseline_config(workdir, None, ["--config.baselines.lr.hash_bits=18", *overrides])


def _tables(config):
    return {s: data.load_split(config, "search", s, progress=False) for s in ("train", "validation", "test")}


def test_per_id_rates_equal_a_hand_computation(planted):
    config = _config(planted, "--config.baselines.run=('rates',)", "--config.baselines.rates.prior_strengths=(20.0,)")
    tables = _tables(config)
    train, test = tables["train"], tables["test"]
    # By hand: an ad's smoothed train click rate, conversions per click, unseen ads at the prior.
    ctr = train["click"].mean()
    cvr = (train["click"] * train["conversion"]).sum() / train["click"].sum()
    expected = {}
    for key in ("pctr", "pcvr"):
        values = []
        for ad in test["ad_id"]:
            rows = train["ad_id"] == ad
            clicks, imps = train["click"][rows].sum(), rows.sum()
            convs = (train["click"] * train["conversion"])[rows].sum()
            values.append((clicks + 20 * ctr) / (imps + 20) if key == "pctr" else (convs + 20 * cvr) / (clicks + 20))
        expected[key] = np.array(values)
    model = rates.IdRates.fit(train, "ad_id")
    model.tune(tables["validation"], (20.0,))
    pred = model.predict(test)
    np.testing.assert_allclose(pred["pctr"], expected["pctr"], rtol=1e-12)
    np.testing.assert_allclose(pred["pcvr"], expected["pcvr"], rtol=1e-12)
    np.testing.assert_allclose(pred["pctcvr"], expected["pctr"] * expected["pcvr"], rtol=1e-12)
    # An id never seen in train gets the global rates.
    unseen = data.Table({**test.columns, "ad_id": np.full(len(test), 10_000)}, test.features)
    np.testing.assert_allclose(model.predict(unseen)["pctr"], ctr)

    # The command writes the same figures (independent AUC), one entry per id column.
    result = commands.run(config, str(planted), "test")
    saved = json.loads((planted / report.RESULT_FILE).read_text())
    assert saved["baselines"].keys() == {"rate_ad_id", "rate_user_id", "rate_advertiser_id"}
    assert saved["baselines"]["rate_ad_id"]["ctr_auc"] == pytest.approx(roc_auc_score(test["click"], expected["pctr"]))
    ctcvr = test["click"] * test["conversion"]
    assert saved["baselines"]["rate_ad_id"]["ctcvr_auc"] == pytest.approx(
        roc_auc_score(ctcvr, expected["pctr"] * expected["pcvr"]))
    np.testing.assert_equal(result["baselines"], saved["baselines"])  # NaN equals NaN here
    assert saved["split"] == "test"
    assert not list(planted.glob(".*tmp"))  # written through a temporary file


def test_prior_strength_is_chosen_on_validation_log_loss(planted):
    tables = _tables(_config(planted))
    model = rates.IdRates.fit(tables["train"], "ad_id")
    grid = (0.1, 10.0, 1e6)
    chosen = model.tune(tables["validation"], grid)
    losses = {m: np.mean([-np.log(p) if y else -np.log(1 - p) for p, y in zip(
        model.predict(tables["validation"], m_ctr=m)["pctr"], tables["validation"]["click"])]) for m in grid}
    assert chosen["prior_strength_ctr"] == min(losses, key=losses.get)


def test_out_of_fold_target_encodings_never_see_their_own_row():
    rng = np.random.default_rng(0)
    n = 300
    table = data.Table({"user_id": rng.integers(0, 20, n), "click": rng.integers(0, 2, n),
                        "conversion": rng.integers(0, 2, n)}, {})
    enc = rates.out_of_fold_encodings(table, ["user_id"], folds=3, strength=5.0, seed=4)
    fold = np.random.default_rng(4).integers(0, 3, n)
    click = table["click"].astype(float)
    ctr = click.mean()
    for i in range(n):
        others = (table["user_id"] == table["user_id"][i]) & (fold != fold[i])
        expected = (click[others].sum() + 5.0 * ctr) / (others.sum() + 5.0)
        assert enc["te_ctr:user_id"][i] == pytest.approx(expected)
        assert enc["te_count:user_id"][i] == pytest.approx(np.log1p(others.sum()))


def _reference_auc(tables, cross: bool) -> float:
    """Test CTR AUC of a logistic regression on exactly the planted terms (device x campaign when
    `cross`, the numeric step, the ad id), one-hot."""

    def terms(t):
        columns = [t["context.pages_viewed"] > np.e, 2 + t["ad_id"]]
        if cross:
            columns.append(200 + t["user.device_type"] * 5 + t["ad.campaign_type"])
        return np.stack(columns, axis=1)

    encoder = OneHotEncoder(handle_unknown="ignore").fit(terms(tables["train"]))
    reference = LogisticRegression(C=1.0).fit(encoder.transform(terms(tables["train"])), tables["train"]["click"])
    test = tables["test"]
    return roc_auc_score(test["click"], reference.decision_function(encoder.transform(terms(test))))


def test_logistic_regression_recovers_a_planted_cross(planted):
    settings = ("--config.baselines.run=('lr',)", "--config.baselines.lr.C=(0.03,0.3)")
    config = _config(planted, *settings)
    with_crosses = commands.run(config, str(planted), "test")["baselines"]["logistic_regression"]
    no_crosses = commands.run(_config(planted, *settings, "--config.baselines.lr.max_cross_size=0"),
                              str(planted), "test")["baselines"]["logistic_regression"]
    tables = _tables(config)
    assert with_crosses["ctr_auc"] > _reference_auc(tables, cross=True) - 0.03
    assert with_crosses["ctr_auc"] > no_crosses["ctr_auc"] + 0.05  # device x campaign is the cross's to carry
    # Same keys as the model's eval_test.json (`evaluate.report`), the oracle's and the expected AUCs included.
    test = tables["test"]
    keys = evaluate.report({"click": test["click"], "conversion": test["conversion"], "pctr": test["p_click"],
                            "pcvr": test["p_click"], "pctcvr": test["p_click"], "p_click": test["p_click"],
                            "p_convert_given_click": test["p_convert_given_click"]}).keys()
    assert "expected_ctcvr_auc" in keys
    assert with_crosses.keys() == keys


def test_trees_learn_the_planted_main_effects_or_are_skipped_without_lightgbm(planted, monkeypatch, capsys):
    """Greedy trees do not find a pure interaction among 50 noise columns, but they must find
    the numeric step and the ad's quality (through its out-of-fold target encoding)."""
    config = _config(planted, "--config.baselines.run=('gbdt',)", "--config.baselines.gbdt.num_threads=1")
    if models.lightgbm_available():
        result = commands.run(config, str(planted), "test")
        assert result["baselines"]["gbdt"]["ctr_auc"] > _reference_auc(_tables(config), cross=False) - 0.02
        assert "te_ctr:ad_id" in result["details"]["gbdt"]["features"]
    monkeypatch.setattr(models, "lightgbm_available", lambda: False)
    result = commands.run(config, str(planted), "test")
    assert "gbdt" not in result["baselines"] and "LightGBM is not installed" in result["notes"][0]
    assert "LightGBM is not installed" in capsys.readouterr().err


def test_evaluate_prints_the_model_next_to_the_baselines(tmp_path):
    model = {"ctr_auc": 0.7, "ctr_logloss": 0.1, "ctcvr_auc": 0.8, "cvr_auc": 0.6, "cvr_entire_space_auc": 0.75}
    assert report.comparison(model, tmp_path, "test") is None
    (tmp_path / report.RESULT_FILE).write_text(json.dumps(
        {"split": "test", "baselines": {"gbdt": {"ctr_auc": 0.7812, "ctcvr_auc": 0.85}}}))
    table = report.comparison(model, tmp_path, "test").splitlines()
    assert table[1].split() == ["model", "0.7000", "0.1000", "0.8000", "0.6000", "0.7500"]
    assert table[2].split() == ["gbdt", "0.7812", "-", "0.8500", "-", "-"]
    assert "validation split" not in report.comparison(model, tmp_path, "test")
    assert "scores the test split" in report.comparison(model, tmp_path, "validation")
    # On synthetic data both sides also have the expected AUCs against the oracle's probabilities.
    (tmp_path / report.RESULT_FILE).write_text(json.dumps({"split": "test", "baselines": {"lr": {
        "ctr_auc": 0.78, "ctcvr_auc": 0.85, "expected_ctr_auc": 0.774, "expected_ctcvr_auc": 0.8304}}}))
    table = report.comparison({**model, "expected_ctr_auc": 0.775, "expected_ctcvr_auc": 0.832}, tmp_path,
                              "test").splitlines()
    assert table[0].split()[-2:] == ["exp_ctr_auc", "exp_ctcvr_auc"]
    assert table[1].split()[-2:] == ["0.7750", "0.8320"] and table[2].split()[-2:] == ["0.7740", "0.8304"]


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert cli.main(["baseline", "--workdir", str(tmp_path / "missing")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    config_lib.write_resolved(tiny_config(tmp_path / "no_data"), tmp_path)
    assert cli.main(["baseline", "--workdir", str(tmp_path)]) == 2
    assert "no synthetic dataset" in capsys.readouterr().err
    assert cli.main(["baseline", "--workdir", str(tmp_path), "--config.baselines.run=('knn',)"]) == 2
    assert "config.baselines.run" in capsys.readouterr().err
