"""The factorized, calibrated, bucketed scorer against the model's own `score_embeddings` and numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multitower_jax import features as F
from multitower_jax.calibration import Calibration
from multitower_jax.models import model as model_lib
from multitower_jax.serving.scorer import AdCatalogue, Scorer, device_catalogue
from multitower_jax.serving.settings import ServingConfigError, ServingSettings, bucket_for
from tests.conftest import TINY_MODEL, synthetic_config

D = 16


def fusion_model(fusion: str, head: str):
    """A tiny model with random fusion + head params (LayerNorm scale/bias perturbed too)."""
    config = synthetic_config("/nonexistent", *TINY_MODEL, f"--config.model.fusion={fusion}",
                              f"--config.model.head={head}")
    model = model_lib.build_model(config, F.parse_spec(config.features))
    z = jnp.zeros((1, D))
    params = nn.meta.unbox(model.init(jax.random.key(0), z, z, z, "search", method=model.score_embeddings))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return config, model, jax.tree_util.tree_unflatten(tree, leaves)


def reference(model, params, e_user, e_ctx, e_ad):
    """Unfactorized: broadcast each request to its candidates and run score_embeddings."""
    b, n, d = e_ad.shape
    rep = lambda x: np.repeat(x, n, axis=0)  # noqa: E731
    out = model.apply(params, rep(e_user), rep(e_ctx), e_ad.reshape(b * n, d), "search",
                      method=model.score_embeddings)
    return {k: np.asarray(v).reshape(b, n) for k, v in out.items()}


def inputs(b, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, D)).astype(np.float32), rng.normal(size=(b, D)).astype(np.float32),
            rng.normal(size=(b, n, D)).astype(np.float32), rng.uniform(0.1, 3.0, (b, n)).astype(np.float32),
            rng.uniform(0.5, 1.5, (b, n)).astype(np.float32))


@pytest.mark.parametrize("fusion", ["dot", "concat", "product"])
@pytest.mark.parametrize("head", ["ctr", "ctr_cvr", "esmm"])
def test_factorized_equals_score_embeddings_and_ranks_by_ecpm(fusion, head):
    config, model, params = fusion_model(fusion, head)
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), "search",
                    settings=ServingSettings(buckets=(8, 16), num_candidates=16, top_n=5, max_batch_size=4))
    e_user, e_ctx, e_ad, bid, quality = inputs(3, 13)
    num_valid = np.array([13, 7, 5])
    out = scorer.score(e_user, e_ctx, e_ad, bid, quality, num_valid_B=num_valid)
    ref = reference(model, params, e_user, e_ctx, e_ad)
    keys = ["pctr"] + (["pcvr", "pctcvr"] if head != "ctr" else [])
    for key in keys:
        np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=1e-5, err_msg=key)
    ecpm = bid * ref["pctr"] * quality * 1000.0
    for i, nv in enumerate(num_valid):
        np.testing.assert_allclose(out["ecpm"][i, :nv], ecpm[i, :nv], rtol=1e-5)
        assert np.all(np.isneginf(out["ecpm"][i, nv:]))  # padding never ranks
        order = np.argsort(-ecpm[i, :nv], kind="stable")[:5]
        np.testing.assert_array_equal(out["top_index"][i], order)
        np.testing.assert_allclose(out["top_ecpm"][i], ecpm[i, order], rtol=1e-5)


@pytest.mark.parametrize("fusion", ["dot", "concat", "product"])
def test_bfloat16_scorer_stays_close_to_the_float32_model(fusion):
    """`serving.compute_dtype="bfloat16"`: the matmuls take bf16 inputs (the outputs move off the
    float32 ones, so the dtype is really used) yet stay within bf16 rounding of the float32 model,
    and the top of the ranking agrees."""
    config, model, params = fusion_model(fusion, "esmm")
    settings = dict(buckets=(64,), num_candidates=64, top_n=10, max_batch_size=4)
    scorers = {dt: Scorer(params, model_lib.ModelConfig.from_config(config), "search",
                          settings=ServingSettings(**settings, compute_dtype=dt)) for dt in ("float32", "bfloat16")}
    e_user, e_ctx, e_ad, bid, quality = inputs(4, 64, seed=3)
    out = {dt: s.score(e_user, e_ctx, e_ad, bid, quality) for dt, s in scorers.items()}
    ref = reference(model, params, e_user, e_ctx, e_ad)
    for key in ("pctr", "pcvr", "pctcvr"):
        assert np.abs(out["bfloat16"][key] - out["float32"][key]).max() > 1e-6, key
        rel = np.abs(np.log(out["bfloat16"][key]) - np.log(ref[key]))  # relative error of the probability
        assert np.median(rel) < 0.005 and rel.max() < 0.05, (key, np.median(rel), rel.max())
    for i in range(4):
        assert len(set(out["bfloat16"]["top_index"][i]) & set(out["float32"]["top_index"][i])) >= 9


@pytest.mark.parametrize("fusion", ["dot", "concat", "product"])
@pytest.mark.parametrize("head", ["ctr", "ctr_cvr", "esmm"])
def test_batched_serving_path_equals_each_request_alone_and_the_model(fusion, head):
    """`score_rows` (catalogue rows gathered inside the compiled call from the catalogue on the
    device, one vectorised call for the batch, only the top-N rows fetched) against the same
    requests scored one at a time, from the host catalogue, and against the unfactorized model
    with numpy's ranking."""
    config, model, params = fusion_model(fusion, head)
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), "search",
                    settings=ServingSettings(buckets=(8, 16), num_candidates=16, top_n=5, max_batch_size=4))
    rng = np.random.default_rng(7)
    n_ads, k = 40, 13
    e_cat = rng.normal(size=(n_ads, D)).astype(np.float32)
    catalogue = AdCatalogue(e_cat, scorer.ad_part(e_cat), rng.uniform(0.1, 3.0, n_ads).astype(np.float32),
                            rng.uniform(0.5, 1.5, n_ads).astype(np.float32))
    rows = np.stack([rng.choice(n_ads, k, replace=False) for _ in range(3)])
    rows[1, 7:] = -1  # fewer candidates than K: the retriever's padding
    e_user, e_ctx = (rng.normal(size=(3, D)).astype(np.float32) for _ in range(2))
    on_device = device_catalogue(catalogue)
    assert [x.shape[0] for x in on_device] == [64] * 4  # rows padded to a power of two
    np.testing.assert_array_equal(np.asarray(on_device.ad_part)[:n_ads], catalogue.ad_part)
    batched = scorer.score_rows(e_user, e_ctx, rows, on_device)
    alone = [scorer.score_rows(e_user[i:i + 1], e_ctx[i:i + 1], rows[i:i + 1], catalogue) for i in range(3)]
    out_keys = ["top_index", "top_ecpm", "top_pctr"] + (["top_pcvr", "top_pctcvr"] if head != "ctr" else [])
    assert sorted(batched) == sorted(out_keys) and batched["top_index"].shape == (3, 5)
    for key in out_keys:  # the batch's program gives each request what it gets alone
        np.testing.assert_allclose(batched[key], np.concatenate([a[key] for a in alone]), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    ref = reference(model, params, e_user, e_ctx, e_cat[np.maximum(rows, 0)])
    ecpm = catalogue.bid[np.maximum(rows, 0)] * ref["pctr"] * catalogue.quality[np.maximum(rows, 0)] * 1000.0
    for i in range(3):
        valid = np.flatnonzero(rows[i] >= 0)
        order = valid[np.argsort(-ecpm[i, valid], kind="stable")][:5]
        np.testing.assert_array_equal(batched["top_index"][i], order)
        np.testing.assert_allclose(batched["top_ecpm"][i], ecpm[i, order], rtol=1e-5)
        for key in out_keys[2:]:
            np.testing.assert_allclose(batched[key][i], ref[key.removeprefix("top_")][i, order], rtol=1e-5,
                                       atol=1e-6, err_msg=key)
    # A request with fewer valid candidates than top_n: the tail ranks last with eCPM -inf.
    few = rows[1:2].copy()
    few[0, 3:] = -1
    got = scorer.score_rows(e_user[1:2], e_ctx[1:2], few, catalogue)
    assert np.all(np.isfinite(got["top_ecpm"][0, :3])) and np.all(np.isneginf(got["top_ecpm"][0, 3:]))


def test_weighted_objective_and_calibration_inside_the_compiled_function():
    config, model, params = fusion_model("dot", "esmm")

    grid = np.linspace(0.0, 1.0, 11)
    cal = Calibration.create({"ctr": {"x": grid, "y": np.sqrt(grid) * 0.5}, "cvr": {"temperature": 2.5}},
                             (("ctr", "isotonic"), ("cvr", "temperature"), ("ctcvr", "product")), 1.0, 1e-6)
    settings = ServingSettings(buckets=(16,), num_candidates=16, top_n=4, max_batch_size=2, objective="weighted",
                               ctr_weight=0.6, cvr_weight=2.0)
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), "search", cal, settings)
    e_user, e_ctx, e_ad, bid, quality = inputs(2, 16, seed=3)
    out = scorer.score(e_user, e_ctx, e_ad, bid, quality)
    ref = reference(model, params, e_user, e_ctx, e_ad)
    pctr = np.clip(np.interp(np.clip(ref["pctr"], 1e-6, 1 - 1e-6), grid, np.sqrt(grid) * 0.5), 1e-6, 1 - 1e-6)
    logit = np.log(ref["pcvr"]) - np.log1p(-ref["pcvr"])
    pcvr = 1 / (1 + np.exp(-logit / 2.5))
    np.testing.assert_allclose(out["pctr"], pctr, atol=1e-5)
    np.testing.assert_allclose(out["pcvr"], pcvr, atol=1e-5)
    np.testing.assert_allclose(out["pctcvr"], pctr * pcvr, atol=1e-5)
    value = bid * (0.6 * pctr + 2.0 * pcvr)
    np.testing.assert_allclose(out["ecpm"], value, rtol=1e-4)
    np.testing.assert_array_equal(out["top_index"], np.argsort(-value, axis=1)[:, :4])


def test_candidate_counts_within_buckets_do_not_recompile():
    config, model, params = fusion_model("dot", "esmm")
    settings = ServingSettings(buckets=(8, 32), num_candidates=32, top_n=4, max_batch_size=2)
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), "search", settings=settings)
    for n in (8, 32):  # warm up one shape per candidate bucket (batch bucket 1)
        scorer.score(*inputs(1, n))
    assert scorer.trace_count == 2
    compiled = scorer._score._cache_size()
    for n in (5, 8, 9, 13, 17, 30, 32):
        scorer.score(*inputs(1, n, seed=n))
    assert scorer.trace_count == 2 and scorer._score._cache_size() == compiled
    scorer.score(*inputs(2, 20))  # a new batch bucket (2) compiles once ...
    scorer.score(*inputs(2, 25))  # ... and is reused
    assert scorer.trace_count == 3
    with pytest.raises(ValueError, match="exceed the largest bucket 32"):
        scorer.score(*inputs(1, 33))


def test_settings_validation_and_buckets():
    assert bucket_for(1, (64, 128)) == 64 and bucket_for(65, (64, 128)) == 128
    assert ServingSettings(max_batch_size=12).batch_buckets == (1, 2, 4, 8, 12)
    with pytest.raises(ServingConfigError, match="config.serving.top_n: expected at most the smallest bucket 64"):
        ServingSettings(top_n=100)
    with pytest.raises(ServingConfigError, match="config.serving.buckets"):
        ServingSettings(buckets=(128, 64))
    with pytest.raises(ServingConfigError, match="config.serving.objective"):
        ServingSettings(objective="cpa")
    config = synthetic_config("/nonexistent", "--config.serving.top_n=7")
    assert ServingSettings.from_config(config).top_n == 7
    del config.serving
    assert ServingSettings.from_config(config) == ServingSettings()  # old workdirs: defaults


@pytest.mark.parametrize("head", ["ctr", "esmm"])
def test_request_logit_offsets_reach_every_candidate_as_in_the_model(head):
    """The context's `Wide` offsets (one row per request) through `score_rows` and `score`, against
    the unfactorized model given the same offsets for each of the request's candidates."""
    config, model, params = fusion_model("product", head)
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), "search",
                    settings=ServingSettings(buckets=(8, 16), num_candidates=16, top_n=5, max_batch_size=4))
    rng = np.random.default_rng(11)
    n_ads, k, b = 30, 9, 3
    e_cat = rng.normal(size=(n_ads, D)).astype(np.float32)
    catalogue = AdCatalogue(e_cat, scorer.ad_part(e_cat), rng.uniform(0.1, 3.0, n_ads).astype(np.float32),
                            np.ones(n_ads, np.float32))
    rows = np.stack([rng.choice(n_ads, k, replace=False) for _ in range(b)])
    e_user, e_ctx = (rng.normal(size=(b, D)).astype(np.float32) for _ in range(2))
    offsets = rng.normal(0.0, 2.0, (b, 1 if head == "ctr" else 2)).astype(np.float32)
    e_ad = e_cat[rows]
    ref = model.apply(params, np.repeat(e_user, k, 0), np.repeat(e_ctx, k, 0), e_ad.reshape(b * k, D), "search",
                      False, np.repeat(offsets, k, 0), method=model.score_embeddings)
    ref = {key: np.asarray(v).reshape(b, k) for key, v in ref.items()}
    plain = reference(model, params, e_user, e_ctx, e_ad)
    assert np.abs(ref["pctr"] - plain["pctr"]).max() > 1e-3  # the offsets matter to this check
    got = scorer.score(e_user, e_ctx, e_ad, catalogue.bid[rows], catalogue.quality[rows], offsets_BxL=offsets)
    for key in ("pctr", "pcvr", "pctcvr") if head != "ctr" else ("pctr",):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    top = scorer.score_rows(e_user, e_ctx, rows, catalogue, offsets)
    ecpm = catalogue.bid[rows] * ref["pctr"] * 1000.0
    for i in range(b):
        order = np.argsort(-ecpm[i], kind="stable")[:5]
        np.testing.assert_array_equal(top["top_index"][i], order)
        np.testing.assert_allclose(top["top_pctr"][i], ref["pctr"][i, order], rtol=1e-5)
    # Without offsets: zeros, not the previous call's offsets.
    again = scorer.score_rows(e_user, e_ctx, rows, catalogue)
    np.testing.assert_allclose(again["top_pctr"], np.take_along_axis(plain["pctr"], again["top_index"], 1), rtol=1e-5)
