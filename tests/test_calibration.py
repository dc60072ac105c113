"""Calibration: fitted maps against scikit-learn / brute force, ECE against a loop, the downsampling
correction against an importance-weighted fit, files, jit, and `multitower calibrate` end to end."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from multitower_jax import calibration as C
from multitower_jax import cli
from multitower_jax import config as config_lib
from multitower_jax.calibration import workflow
from multitower_jax.train import loop
from multitower_jax.train import metrics as train_metrics
from tests.conftest import synthetic_config, tiny_config


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def miscalibrated(n: int, seed: int, slope: float = 2.0, shift: float = 1.0):
    """True probabilities ~ Beta(1, 20) (CTR-like), labels drawn from them, and an overconfident,
    shifted model p_model = sigmoid(slope * logit(p) + shift)."""
    rng = np.random.default_rng(seed)
    p_true = np.clip(rng.beta(1.0, 20.0, n), 1e-4, 1 - 1e-4)
    y = (rng.random(n) < p_true).astype(np.float64)
    p_model = _sigmoid(slope * _logit(p_true) + shift).astype(np.float32)
    return p_model, y


def _brute_ece(p, y, edges_or_groups):
    total, n = 0.0, len(p)
    for idx in edges_or_groups:
        if len(idx):
            total += len(idx) / n * abs(np.mean(y[idx]) - np.mean(p[idx]))
    return total


def test_ece_equal_width_and_equal_mass_match_a_loop():
    rng = np.random.default_rng(0)
    p = rng.beta(2, 5, 997)
    p[:10] = 1.0  # the last bin is closed on the right
    y = (rng.random(997) < p).astype(float)
    width = [np.array([i for i in range(len(p)) if (b / 10 <= p[i] < (b + 1) / 10) or (b == 9 and p[i] == 1.0)])
             for b in range(10)]
    order = np.argsort(p, kind="stable")
    mass = [order[int(np.ceil(b * len(p) / 10)):int(np.ceil((b + 1) * len(p) / 10))] for b in range(10)]
    assert sorted(len(m) for m in mass)[0] >= 99 and sum(len(m) for m in mass) == len(p)
    assert C.ece(p, y, 10, equal_mass=False) == pytest.approx(_brute_ece(p, y, width), abs=1e-12)
    assert C.ece(p, y, 10, equal_mass=True) == pytest.approx(_brute_ece(p, y, mass), abs=1e-12)
    assert C.ece(y, y, 10) == 0.0  # perfect predictions


def test_isotonic_inside_jit_equals_sklearn_predict():
    p, y = miscalibrated(20_000, 1)
    params = C.fit_isotonic(p, y, eps=1e-6)
    ref = IsotonicRegression(y_min=1e-6, y_max=1 - 1e-6, out_of_bounds="clip").fit(p.astype(np.float64), y)
    cal = C.Calibration.create({"ctr": params}, (("ctr", "isotonic"),), 1.0, 1e-6)
    # in range, between thresholds, and outside the fitted range on both sides
    q = np.concatenate([np.random.default_rng(2).random(2000) * p.max(), [1e-6, p.min() / 2, 0.9999]])
    q = q.astype(np.float32)
    got = np.asarray(jax.jit(cal.apply, static_argnums=0)("ctr", q))
    np.testing.assert_allclose(got, ref.predict(np.clip(q, 1e-6, 1 - 1e-6).astype(np.float64)), atol=2e-6)


def test_platt_matches_unpenalized_logistic_regression_and_keeps_auc():
    p, y = miscalibrated(30_000, 3)
    w = np.random.default_rng(4).uniform(0.5, 2.0, len(y))
    params = C.fit_platt(p, y, w)
    z = _logit(np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6))[:, None]  # apply() clips to [eps, 1 - eps]
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z, y, sample_weight=w)
    assert float(params["a"]) == pytest.approx(ref.coef_[0, 0], rel=1e-3)
    assert float(params["b"]) == pytest.approx(ref.intercept_[0], abs=1e-3)
    # the true map inverts the model's: a = 1/2, b = -1/2
    assert float(params["a"]) == pytest.approx(0.5, abs=0.03) and float(params["b"]) == pytest.approx(-0.5, abs=0.1)
    cal = C.Calibration.create({"ctr": params}, (("ctr", "platt"),), 1.0, 1e-6)
    out = np.asarray(cal.apply("ctr", p))
    np.testing.assert_allclose(out, ref.predict_proba(z)[:, 1], atol=1e-5)
    # a strictly increasing map keeps the order (up to ties from float32 rounding and the eps clip)
    assert train_metrics.auc(out, y) == pytest.approx(train_metrics.auc(p, y), abs=1e-6)


def test_temperature_is_the_brute_force_minimizer():
    p, y = miscalibrated(20_000, 5, slope=1.6, shift=0.0)
    t = float(C.fit_temperature(p, y)["temperature"])
    z = _logit(np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6))
    def argmin(grid):
        return grid[int(np.argmin([train_metrics.logloss(_sigmoid(z / g), y) for g in grid]))]

    coarse = argmin(np.linspace(0.5, 3.0, 251))
    assert t == pytest.approx(argmin(np.linspace(coarse - 0.01, coarse + 0.01, 201)), abs=2e-4)
    assert t == pytest.approx(1.6, abs=0.1)


@pytest.mark.parametrize("method", ["isotonic", "platt", "temperature"])
def test_each_method_lowers_held_out_ece_and_log_loss(method):
    p_fit, y_fit = miscalibrated(40_000, 6, slope=1.5, shift=0.3)
    p_test, y_test = miscalibrated(40_000, 7, slope=1.5, shift=0.3)
    cal = C.fit({"pctr": p_fit, "click": y_fit}, ("ctr",), {"ctr": method})
    after = np.asarray(jax.jit(cal.outputs)(p_test)["pctr"])
    before_ece, after_ece = C.ece(p_test, y_test), C.ece(after, y_test)
    assert after_ece < 0.5 * before_ece, (before_ece, after_ece)
    assert train_metrics.logloss(after, y_test) < train_metrics.logloss(p_test, y_test)


def test_downsampling_correction_matches_the_importance_weighted_fit():
    """Logistic regressions on synthetic clicks: negatives kept at r = 0.1. Unweighted + the closed-form
    correction agrees with the 1/r-weighted fit (and the full-data fit); uncorrected it is ~10x too high."""
    rng = np.random.default_rng(8)
    n, r = 400_000, 0.1
    x = rng.normal(size=(n, 3))
    p_true = _sigmoid(x @ np.array([0.8, -0.5, 0.3]) - 4.0)
    y = (rng.random(n) < p_true).astype(float)
    keep = (y > 0) | (rng.random(n) < r)
    xs, ys = x[keep], y[keep]
    unweighted = LogisticRegression(C=np.inf, tol=1e-10).fit(xs, ys)
    weighted = LogisticRegression(C=np.inf, tol=1e-10).fit(xs, ys, sample_weight=np.where(ys > 0, 1.0, 1 / r))
    full = LogisticRegression(C=np.inf, tol=1e-10).fit(x, y)
    x_eval = rng.normal(size=(5000, 3))
    p_down = unweighted.predict_proba(x_eval)[:, 1].astype(np.float32)
    corrected = np.asarray(C.correct_downsampling(jnp.asarray(p_down), r))
    p_weighted = weighted.predict_proba(x_eval)[:, 1]
    p_full = full.predict_proba(x_eval)[:, 1]
    # the closed form is a shift of the logit by log r
    np.testing.assert_allclose(_logit(corrected.astype(np.float64)), _logit(p_down.astype(np.float64)) + np.log(r),
                               atol=2e-4)
    assert np.mean(np.abs(corrected - p_weighted)) < 0.05 * np.mean(p_weighted)
    assert np.mean(np.abs(corrected - p_full)) < 0.05 * np.mean(p_full)
    assert np.mean(p_down) > 5 * np.mean(p_full)
    # ... and `Calibration` applies it to pCTR (not to pCVR) when the run was downsampled without weights
    cal = C.Calibration.identity(C.HEADS, r)
    np.testing.assert_allclose(np.asarray(cal.apply("ctr", p_down)), corrected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cal.apply("cvr", p_down)), np.clip(p_down, 1e-6, 1 - 1e-6))


def test_correction_rate_comes_from_the_config(tmp_path):
    config = tiny_config(tmp_path)
    assert C.downsample_correction_rate(config) == 1.0
    config.data.negative_downsample_rate = 0.25
    assert C.downsample_correction_rate(config) == 1.0  # importance weights: the loss is already unbiased
    config.data.importance_weights = False
    assert C.downsample_correction_rate(config) == 0.25


def test_fit_heads_and_ctcvr_product_or_own_map():
    p, y = miscalibrated(20_000, 9)
    rng = np.random.default_rng(10)
    pcvr = rng.beta(2, 8, len(p)).astype(np.float32)
    conversion = y * (rng.random(len(p)) < pcvr)
    pred = {"pctr": p, "pcvr": pcvr, "click": y, "conversion": conversion}
    product = C.fit(pred, C.HEADS, {"ctr": "isotonic", "cvr": "platt", "ctcvr": "product"})
    out = jax.jit(product.outputs)(p, pcvr)
    np.testing.assert_allclose(np.asarray(out["pctcvr"]), np.asarray(out["pctr"] * out["pcvr"]), rtol=1e-6)
    # CVR is fitted on clicked impressions only
    clicked = y > 0.5
    ref = C.fit_platt(pcvr[clicked], conversion[clicked])
    assert float(product.params["cvr"]["a"]) == pytest.approx(float(ref["a"]), rel=1e-6)
    with pytest.raises(ValueError, match="outputs"):
        product.apply("ctcvr", p)
    own = C.fit(pred, C.HEADS, {"ctr": "identity", "cvr": "identity", "ctcvr": "temperature"})
    ref_t = C.fit_temperature((np.clip(p, 1e-6, 1) * np.clip(pcvr, 1e-6, 1)).astype(np.float32), y * conversion)
    assert float(own.params["ctcvr"]["temperature"]) == pytest.approx(float(ref_t["temperature"]), rel=1e-4)
    with pytest.raises(C.CalibrationError, match="cvr.*positive"):
        C.fit({**pred, "conversion": np.zeros_like(conversion)}, C.HEADS, {"ctr": "identity", "cvr": "platt",
                                                                          "ctcvr": "product"})


def test_exported_function_takes_a_calibration_argument():
    p, y = miscalibrated(5000, 12)
    cal = C.fit({"pctr": p, "click": y}, ("ctr",), {"ctr": "isotonic"})
    spec = jax.ShapeDtypeStruct((256,), jnp.float32)
    exported = jax.export.export(jax.jit(lambda c, x: c.apply("ctr", x)))(cal, spec)
    loaded = jax.export.deserialize(exported.serialize())
    np.testing.assert_array_equal(np.asarray(loaded.call(cal, p[:256])), np.asarray(cal.apply("ctr", p[:256])))


def test_pytree_jit_without_recompiling_and_json_round_trip():
    p, y = miscalibrated(5000, 11)
    a = C.fit({"pctr": p, "click": y}, ("ctr",), {"ctr": "platt"})
    b = C.fit({"pctr": p[:2500], "click": y[:2500]}, ("ctr",), {"ctr": "platt"})
    traces = []

    @jax.jit
    def f(cal, x):
        traces.append(1)
        return cal.apply("ctr", x)

    np.testing.assert_allclose(np.asarray(f(a, p)), np.asarray(a.apply("ctr", p)), rtol=1e-6)
    f(b, p)
    assert len(traces) == 1  # new parameter values, same compiled function
    back = C.Calibration.from_json(json.loads(json.dumps(a.to_json())))
    np.testing.assert_array_equal(np.asarray(back.apply("ctr", p)), np.asarray(a.apply("ctr", p)))
    with pytest.raises(C.CalibrationError, match="method"):
        C.Calibration.from_json({"version": 1, "negative_rate": 1.0, "clip_eps": 1e-6,
                                 "heads": {"ctr": {"method": "magic"}}})


def test_load_identity_notice_fingerprint_and_bad_files(tmp_path, caplog):
    config = tiny_config(tmp_path / "data", "--config.data.negative_downsample_rate=0.5",
                         "--config.data.importance_weights=false")
    config_lib.write_resolved(config, tmp_path)
    with caplog.at_level(logging.WARNING):
        cal = C.load(tmp_path)
    assert "multitower calibrate" in caplog.text
    assert cal.heads == C.HEADS and float(cal.negative_rate) == 0.5
    assert float(cal.apply("ctr", jnp.float32(0.5))) == pytest.approx(1 / 3)  # 0.5 r / (0.5 r + 0.5)
    from multitower_jax.inference import fingerprint

    C.save(cal, tmp_path, fingerprint=fingerprint(config))
    assert C.load(tmp_path).method("ctr") == "identity"
    C.save(cal, tmp_path, fingerprint="another-model")
    with pytest.raises(C.CalibrationError, match="another-model"):
        C.load(tmp_path)
    (tmp_path / C.FILE).write_text("{not json")
    with pytest.raises(C.CalibrationError, match="not valid JSON"):
        C.load(tmp_path)


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="calibration.ctr"):
        tiny_config(tmp_path, "--config.calibration.ctr=magic")
    with pytest.raises(config_lib.ConfigError, match="calibration.ctr"):
        tiny_config(tmp_path, "--config.calibration.ctr=product")  # only for ctcvr
    with pytest.raises(config_lib.ConfigError, match="calibration.cvr.*identity"):
        tiny_config(tmp_path, "--config.calibration.cvr=none")
    assert tiny_config(tmp_path, "--config.calibration.cvr=identity").calibration.cvr == "identity"
    with pytest.raises(config_lib.ConfigError, match="calibration.ece_bins"):
        tiny_config(tmp_path, "--config.calibration.ece_bins=1")


def untrained_workdir(config, workdir):
    """A workdir with a checkpoint of the initial parameters: everything `calibrate` reads, without
    compiling a training step (the slow part of a tiny training run on a 2-core CPU)."""
    import orbax.checkpoint as ocp

    from multitower_jax.train import trainer as trainer_lib

    trainer = trainer_lib.Trainer(config, workdir)
    config_lib.write_resolved(config, workdir)
    manager = trainer.checkpoint_manager()
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.init_state())))
    manager.wait_until_finished()


def test_calibrate_workdir_end_to_end(synthetic_dir, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    # as if trained with negatives kept at rate 0.5 and no importance weights: calibrate undoes it first
    untrained_workdir(synthetic_config(synthetic_dir, "--config.data.negative_downsample_rate=0.5",
                                       "--config.data.importance_weights=false"), workdir)
    # an old workdir: its config.json has no calibration section, and takes overrides anyway
    saved = json.loads((workdir / "config.json").read_text())
    del saved["calibration"]
    (workdir / "config.json").write_text(json.dumps(saved))
    # (the initial model's pCVR happens to rank conversions the wrong way round: temperature
    # scaling would fall back to identity, isotonic flattens it)
    assert cli.main(["calibrate", "--workdir", str(workdir), "--config.calibration.ctr=platt",
                     "--config.calibration.cvr=isotonic"]) == 0
    report = json.loads((workdir / workflow.REPORT_FILE).read_text())
    assert report["methods"] == {"ctr": "platt", "cvr": "isotonic", "ctcvr": "product"}
    assert report["negative_rate_corrected"] == 0.5
    ctr = report["heads"]["ctr"]
    assert ctr["corrected"]["mean_pred"] < ctr["before"]["mean_pred"]  # p r / (p r + 1 - p) < p
    for head in C.HEADS:
        assert (workdir / f"reliability_{head}.png").read_bytes()[:4] == b"\x89PNG"
    # a strictly monotone map (and the correction): the same AUC (float32 ties aside), or 1 - AUC
    # where the untrained model ranks clicks the wrong way round and Platt's fitted slope is negative
    before, after = ctr["before"]["auc"], ctr["after"]["auc"]
    assert after == pytest.approx(before if before >= 0.5 else 1.0 - before, abs=1e-4)
    # the initial model predicts pCTR ~ 0.5 where ~3% click: calibration brings it to the observed rate
    assert ctr["before"]["ece"] > 0.3 and ctr["after"]["ece"] < 0.1 * ctr["before"]["ece"]
    assert ctr["after"]["mean_pred"] == pytest.approx(ctr["after"]["observed_rate"], rel=0.5)
    # the saved calibration is what the scorer loads, and `evaluate` now reports calibrated metrics
    cal = C.load(workdir)
    assert cal.method("ctr") == "platt" and float(cal.negative_rate) == 0.5
    result = loop.evaluate_workdir(workflow.workdir_config(workdir), workdir, "test",
                                   str(tmp_path / "pred.parquet"))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "pred.parquet").to_pydict()
    np.testing.assert_allclose(table["pctr_calibrated"], np.asarray(cal.apply("ctr", np.float32(table["pctr"]))),
                               rtol=1e-6)
    assert result["calibrated_ctr_auc"] == pytest.approx(report["heads"]["ctr"]["after"]["auc"], abs=1e-9)
    assert result["calibrated_cvr_ece"] == pytest.approx(report["heads"]["cvr"]["after"]["ece"], abs=1e-9)
    assert result["ctr_ece"] == pytest.approx(report["heads"]["ctr"]["before"]["ece"], abs=1e-9)
    # bad input ends with the message and exit code 2
    capsys.readouterr()
    assert cli.main(["calibrate", "--workdir", str(workdir), "--config.calibration.cvr=magic"]) == 2
    assert "calibration.cvr" in capsys.readouterr().err
    assert cli.main(["calibrate", "--workdir", str(tmp_path / "missing")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    # the same workdir with the default methods and a pCVR that cannot be temperature-scaled
    check_default_calibrate_survives_an_unfittable_cvr(workdir, monkeypatch, capsys)


def test_default_methods_are_isotonic_for_ctr_and_temperature_for_cvr(tmp_path):
    defaults = C.default_config()
    assert (defaults.ctr, defaults.cvr, defaults.ctcvr) == ("isotonic", "temperature", "product")
    config = tiny_config(tmp_path)  # experiments/quickstart.py (via base.py)
    assert (config.calibration.ctr, config.calibration.cvr, config.calibration.ctcvr) == \
        ("isotonic", "temperature", "product")
    del config.calibration  # old workdirs without the section get the same defaults
    assert C.validate_config(config).to_dict() == defaults.to_dict()


def _reversed_cvr(n: int, seed: int):
    """CTR predictions that fit, and pCVR that ranks conversions the wrong way round (1/T < 0)."""
    p, y = miscalibrated(n, seed)
    rng = np.random.default_rng(seed + 1)
    pcvr = rng.uniform(0.05, 0.95, n).astype(np.float32)
    conversion = y * (rng.random(n) < 1.0 - pcvr)  # converts with probability 1 - pCVR: 1/T = -1
    return {"pctr": p, "pcvr": pcvr, "pctcvr": p * pcvr, "click": y, "conversion": conversion}


def test_a_head_that_cannot_be_fitted_falls_back_to_identity():
    pred = _reversed_cvr(20_000, 20)
    methods = {"ctr": "isotonic", "cvr": "temperature", "ctcvr": "product"}
    with pytest.raises(C.CalibrationError, match="1/T = .* is not positive"):
        C.fit(pred, C.HEADS, methods)
    reasons = {}
    cal = C.fit(pred, C.HEADS, methods, fallbacks=reasons)
    assert list(reasons) == ["cvr"] and "is not positive" in reasons["cvr"]
    assert (cal.method("ctr"), cal.method("cvr")) == ("isotonic", "identity")
    np.testing.assert_allclose(np.asarray(cal.apply("cvr", pred["pcvr"])), np.clip(pred["pcvr"], 1e-6, 1 - 1e-6))
    assert cal.params["ctr"]["x"].shape[0] > 10  # the other heads are still fitted


def check_default_calibrate_survives_an_unfittable_cvr(workdir, monkeypatch, capsys):
    """`multitower calibrate` with the default methods where CVR's temperature cannot be fitted
    (1/T <= 0): CVR falls back to identity with a warning (printed, and in the report) and the
    command succeeds. The predictions are synthetic (the splits' rows are never read), so the
    outcome does not depend on what the model happens to predict: what is tested is the command."""
    from multitower_jax.train import evaluate

    splits = {"predict validation": _reversed_cvr(20_000, 30), "predict test": _reversed_cvr(20_000, 31)}
    monkeypatch.setattr(evaluate, "collect", lambda *args, desc="", **kw: splits[desc])
    capsys.readouterr()
    assert cli.main(["calibrate", "--workdir", str(workdir)]) == 0
    err = capsys.readouterr().err
    assert "warning: calibration.cvr=temperature could not be fitted" in err and "uses identity" in err
    report = json.loads((workdir / workflow.REPORT_FILE).read_text())
    assert report["methods"] == {"ctr": "isotonic", "cvr": "identity", "ctcvr": "product"}
    assert report["requested_methods"]["cvr"] == "temperature"
    assert report["fallbacks"]["cvr"]["used"] == "identity" and "not positive" in report["fallbacks"]["cvr"]["reason"]
    assert len(report["warnings"]) == 1 and "cvr" in report["warnings"][0]
    assert report["heads"]["cvr"]["after"]["ece"] == pytest.approx(report["heads"]["cvr"]["before"]["ece"], abs=1e-6)
    assert report["heads"]["ctr"]["after"]["ece"] < 0.5 * report["heads"]["ctr"]["before"]["ece"]
    cal = C.load(workdir)
    assert cal.method("cvr") == "identity" and cal.method("ctr") == "isotonic"
    assert json.loads((workdir / C.FILE).read_text())["fallbacks"]["cvr"]["requested"] == "temperature"
