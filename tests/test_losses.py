"""Loss tests against independent numpy references (float64), plus stability and sharding."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from multitower_jax.train import losses as eager

# These tests compile many small programs and run each once or twice: skipping LLVM's
# optimizations halves the compile time on a small CPU and changes nothing but float rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


# Compiled once each: op-by-op dispatch would compile every primitive separately.
_STATIC = ("head", "ctr_weight", "cvr_weight", "wide_cvr_weight", "temperature", "logq_correction", "l2_normalize", "mesh", "config",
           "positives")


class _Jitted:
    def __getattr__(self, name):
        fn = getattr(eager, name)
        if not callable(fn) or isinstance(fn, type):
            return fn
        static = [n for n in inspect.signature(fn).parameters if n in _STATIC]
        return jit(fn, static_argnames=static)


losses = _Jitted()


def np_bce(logits, labels, weights=None) -> float:
    """The textbook formula on probabilities, in float64 (fine at moderate logits)."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    per_row = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    w = np.ones_like(per_row) if weights is None else np.asarray(weights, np.float64)
    return float(np.sum(w * per_row) / np.sum(w))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0, 2, 64).astype(np.float32)
LABELS = (RNG.random(64) < 0.3).astype(np.float32)
WEIGHTS = np.where(LABELS > 0, 1.0, 10.0).astype(np.float32)  # negatives downsampled 10x


# --- binary cross-entropy ---------------------------------------------------------------------


def test_weighted_bce_matches_the_formula():
    np.testing.assert_allclose(float(losses.weighted_bce(LOGITS, LABELS)), np_bce(LOGITS, LABELS), rtol=1e-5)
    np.testing.assert_allclose(float(losses.weighted_bce(LOGITS, LABELS, WEIGHTS)),
                               np_bce(LOGITS, LABELS, WEIGHTS), rtol=1e-5)
    # Importance weights: a row of weight 10 counts as ten rows of weight 1.
    repeated = np.concatenate([LOGITS[:2]] + [LOGITS[2:3]] * 10)
    labels = np.concatenate([LABELS[:2]] + [LABELS[2:3]] * 10)
    np.testing.assert_allclose(float(losses.weighted_bce(LOGITS[:3], LABELS[:3], np.array([1, 1, 10.0]))),
                               np_bce(repeated, labels), rtol=1e-5)


def test_bce_is_finite_and_right_at_extreme_logits():
    logits = np.array([-1000.0, -100.0, 100.0, 1000.0], np.float32)
    labels = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    per_row = np.asarray(losses.sigmoid_bce(logits, labels))
    np.testing.assert_allclose(per_row, [1000.0, 0.0, 100.0, 0.0], atol=1e-4)
    grad = jit(jax.grad(lambda x: eager.weighted_bce(x, labels)))(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grad)).all()


# --- ESMM: BCE on pCTCVR = pCTR x pCVR ----------------------------------------------------------


def test_ctcvr_bce_matches_the_naive_product_at_moderate_logits():
    a = RNG.normal(0, 2, 64).astype(np.float32)
    b = RNG.normal(0, 2, 64).astype(np.float32)
    p = sigmoid(a) * sigmoid(b)
    naive = -(LABELS * np.log(p) + (1 - LABELS) * np.log(1 - p))
    expected = float(np.sum(WEIGHTS * naive) / np.sum(WEIGHTS))
    np.testing.assert_allclose(float(losses.ctcvr_bce(a, b, LABELS, WEIGHTS)), expected, rtol=1e-5)
    log_p, log_1mp = losses.ctcvr_log_probs(a, b)
    np.testing.assert_allclose(np.asarray(log_p), np.log(p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(log_1mp), np.log1p(-p), rtol=1e-5, atol=1e-6)


def test_ctcvr_bce_is_finite_with_the_right_gradient_at_extreme_logits():
    a = np.array([1000, 100, -100, -1000, 1000, 100, -1000, 0], np.float32)
    b = np.array([1000, 100, -100, -1000, -1000, 95, 1000, 0], np.float32)
    loss_and_grads = jit(jax.value_and_grad(eager.ctcvr_bce, argnums=(0, 1)))
    for label in (0.0, 1.0):
        labels = np.full(a.shape, label, np.float32)
        loss, (ga, gb) = loss_and_grads(a, b, labels)
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()
    # Confidently wrong (p ~ 1, no conversion): the loss is ~ -log(e^-a + e^-b), not a clamped
    # constant, and the gradient still pushes both logits down.
    loss, (ga, gb) = loss_and_grads(np.array([100.0], np.float32), np.array([95.0], np.float32),
                                    np.zeros(1, np.float32))
    np.testing.assert_allclose(float(loss), -np.logaddexp(-100.0, -95.0), rtol=1e-5)
    assert float(ga[0]) > 0 and float(gb[0]) > 0.9


# --- the three ranking heads ---------------------------------------------------------------------


def ranking_batch():
    click = LABELS
    conversion = click * (RNG.random(64) < 0.5).astype(np.float32)
    return {"click": click, "conversion": conversion, "weight": WEIGHTS}


def test_ranking_loss_ctr_cvr_uses_clicked_rows_for_cvr():
    batch = ranking_batch()
    ctr_logit, cvr_logit = LOGITS, RNG.normal(0, 2, 64).astype(np.float32)
    loss, terms = losses.ranking_loss({"ctr_logit": ctr_logit, "cvr_logit": cvr_logit}, batch, "ctr_cvr", 0.7, 0.3)
    clicked = batch["click"] > 0
    expected_cvr = np_bce(cvr_logit[clicked], batch["conversion"][clicked], WEIGHTS[clicked])
    np.testing.assert_allclose(float(terms["cvr_loss"]), expected_cvr, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * np_bce(ctr_logit, batch["click"], WEIGHTS) + 0.3 * expected_cvr,
                               rtol=1e-5)
    # Whatever the CVR head says on an unclicked impression is not penalized.
    scrambled = np.where(clicked, cvr_logit, 50.0).astype(np.float32)
    loss2, _ = losses.ranking_loss({"ctr_logit": ctr_logit, "cvr_logit": scrambled}, batch, "ctr_cvr")
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_ranking_loss_esmm_and_ctr():
    batch = ranking_batch()
    ctr_logit, cvr_logit = LOGITS, RNG.normal(0, 2, 64).astype(np.float32)
    loss, terms = losses.ranking_loss({"ctr_logit": ctr_logit, "cvr_logit": cvr_logit}, batch, "esmm")
    p = sigmoid(ctr_logit) * sigmoid(cvr_logit)
    y = batch["click"] * batch["conversion"]
    ctcvr = float(np.sum(WEIGHTS * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(WEIGHTS))
    np.testing.assert_allclose(float(loss), np_bce(ctr_logit, batch["click"], WEIGHTS) + ctcvr, rtol=1e-5)
    assert set(terms) == {"ctr_loss", "ctcvr_loss"}  # no direct CVR loss
    loss_ctr, _ = losses.ranking_loss({"ctr_logit": ctr_logit}, batch, "ctr")
    np.testing.assert_allclose(float(loss_ctr), np_bce(ctr_logit, batch["click"], WEIGHTS), rtol=1e-5)


@pytest.mark.parametrize("head", ["esmm", "ctr_cvr"])
def test_the_wide_cvr_term_adds_a_clicked_rows_bce_of_the_wide_logit(head):
    batch = ranking_batch()
    ctr_logit, cvr_logit = LOGITS, RNG.normal(0, 2, 64).astype(np.float32)
    wide = RNG.normal(0, 1, 64).astype(np.float32)
    outputs = {"ctr_logit": ctr_logit, "cvr_logit": cvr_logit, "wide_cvr_logit": wide}
    plain, _ = losses.ranking_loss(outputs, batch, head)  # weight 0: the wide logit is not a term
    loss, terms = losses.ranking_loss(outputs, batch, head, wide_cvr_weight=0.5)
    clicked = batch["click"] > 0
    expected = np_bce(wide[clicked], batch["conversion"][clicked], WEIGHTS[clicked])
    np.testing.assert_allclose(float(terms["wide_cvr_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(plain) + 0.5 * expected, rtol=1e-5)
    with pytest.raises(ValueError, match="model.wide=True"):
        losses.ranking_loss({"ctr_logit": ctr_logit, "cvr_logit": cvr_logit}, batch, head, wide_cvr_weight=0.5)
    ctr_only, _ = losses.ranking_loss(outputs, batch, "ctr", wide_cvr_weight=0.5)  # no CVR logit: ignored
    np.testing.assert_allclose(float(ctr_only), np_bce(ctr_logit, batch["click"], WEIGHTS), rtol=1e-5)


# --- retrieval: in-batch sampled softmax with logQ correction ------------------------------------


def np_retrieval_loss(e_user, e_context, e_ad, ad_id, log_q, click, weight, temperature, logq, normalize):
    """Row by row, in float64: softmax over the batch's ads, duplicates of the positive dropped."""
    q = (e_user + e_context).astype(np.float64)
    ads = e_ad.astype(np.float64)
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        ads = ads / np.linalg.norm(ads, axis=1, keepdims=True)
    total, norm = 0.0, 0.0
    for i in range(len(q)):
        if click[i] == 0:
            continue
        candidates = [j for j in range(len(q)) if j == i or ad_id[j] != ad_id[i]]
        scores = np.array([q[i] @ ads[j] / temperature - (log_q[j] if logq else 0.0) for j in candidates])
        positive = scores[candidates.index(i)]
        nll = np.log(np.sum(np.exp(scores - scores.max()))) + scores.max() - positive
        total += weight[i] * nll
        norm += weight[i]
    return total / norm


def retrieval_inputs(size: int = 16, dim: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    e_user, e_context, e_ad = (rng.normal(size=(size, dim)).astype(np.float32) for _ in range(3))
    ad_id = rng.integers(0, size // 2, size).astype(np.int32)  # plenty of duplicates
    e_ad = e_ad[ad_id]  # one embedding per ad, as the ad tower gives
    counts = np.bincount(ad_id, minlength=size)
    log_q = np.log(counts[ad_id] / size).astype(np.float32)
    click = (rng.random(size) < 0.5).astype(np.float32)
    click[0] = 1.0
    weight = rng.uniform(0.5, 2.0, size).astype(np.float32)
    return e_user, e_context, e_ad, {"ad_id": ad_id, "ad_log_q": log_q, "click": click, "weight": weight}


@pytest.mark.parametrize("temperature, logq, normalize", [(0.1, True, True), (1.0, False, False), (2.0, True, False)])
def test_retrieval_loss_matches_a_numpy_softmax(temperature, logq, normalize):
    e_user, e_context, e_ad, batch = retrieval_inputs()
    got = losses.retrieval_loss(e_user, e_context, e_ad, batch, temperature, logq, normalize)
    expected = np_retrieval_loss(e_user, e_context, e_ad, batch["ad_id"], batch["ad_log_q"], batch["click"],
                                 batch["weight"], temperature, logq, normalize)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_duplicate_ads_are_not_negatives_of_each_other():
    e_user, e_context, e_ad, batch = retrieval_inputs()
    logits = np.asarray(losses.retrieval_logits(e_user, e_context, e_ad, batch["ad_id"], batch["ad_log_q"], 0.5))
    ad_id = batch["ad_id"]
    same = (ad_id[:, None] == ad_id[None, :]) & ~np.eye(len(ad_id), dtype=bool)
    assert same.any()
    assert (logits[same] < -1e8).all()
    assert (logits[~same] > -1e3).all()  # the diagonal (positives) and real negatives untouched


def test_logq_correction_pushes_a_popular_ads_logit_down():
    # Identical embeddings: without the correction every candidate scores the same.
    e = np.ones((3, 4), np.float32)
    ad_id = np.array([0, 1, 2], np.int32)
    log_q = np.log(np.array([0.5, 0.01, 0.01], np.float32))  # ad 0 is popular
    plain = np.asarray(losses.retrieval_logits(e, e, e, ad_id, log_q, 1.0, logq_correction=False))
    corrected = np.asarray(losses.retrieval_logits(e, e, e, ad_id, log_q, 1.0, logq_correction=True))
    np.testing.assert_allclose(plain[:, 0], plain[:, 1])
    # log q(popular) > log q(rare): subtracting it leaves the popular ad lower in every row.
    assert (corrected[:, 0] < corrected[:, 1]).all()
    assert (corrected[:, 0] - plain[:, 0] < corrected[:, 1] - plain[:, 1]).all()
    # So as a negative it takes less probability mass from a rare positive: lower loss there.
    batch = {"ad_id": ad_id, "ad_log_q": log_q, "click": np.array([0, 1, 0], np.float32), "weight": np.ones(3, np.float32)}
    with_q = losses.retrieval_loss(e, e, e, batch, 1.0, logq_correction=True, l2_normalize=False)
    without = losses.retrieval_loss(e, e, e, batch, 1.0, logq_correction=False, l2_normalize=False)
    assert float(with_q) < float(without)


def test_total_loss_combines_alpha_and_beta():
    e_user, e_context, e_ad, batch = retrieval_inputs()
    batch = dict(batch, conversion=batch["click"] * 0)
    outputs = {"ctr_logit": LOGITS[:16], "cvr_logit": LOGITS[16:32], "e_user": e_user, "e_context": e_context, "e_ad": e_ad}
    config = losses.LossConfig(head="esmm", alpha=0.8, beta=0.25, temperature=0.2)
    total, metrics = losses.total_loss(outputs, batch, config)
    np.testing.assert_allclose(float(total), 0.8 * float(metrics["ranking_loss"]) + 0.25 * float(metrics["retrieval_loss"]),
                               rtol=1e-6)
    _, metrics = losses.total_loss(outputs, batch, losses.LossConfig(head="ctr", beta=0.0))
    assert "retrieval_loss" not in metrics


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (fake) devices; see tests/conftest.py")
def test_retrieval_loss_sharded_keeps_a_local_block_of_rows():
    devices = jax.device_count()
    size, local, dim = 4 * devices, 4, 8
    rng = np.random.default_rng(0)
    e_user, e_context, e_ad = (rng.normal(size=(size, dim)).astype(np.float32) for _ in range(3))
    batch = {"ad_id": rng.integers(0, size // 3, size).astype(np.int32),
             "ad_log_q": rng.normal(size=size).astype(np.float32),
             "click": (rng.random(size) < 0.5).astype(np.float32), "weight": np.ones(size, np.float32)}
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def loss(mesh):
        return jit(lambda u, c, a, b: eager.retrieval_loss(u, c, a, b, 0.1, True, True, mesh=mesh))

    args = (e_user, e_context, e_ad, batch)  # replicated inputs: the constraints alone must shard
    plain = loss(None).lower(*args).compile()
    assert f"f32[{size},{size}]" in plain.as_text()  # the control: without a mesh the full block is built
    sharded = loss(mesh)
    hlo = sharded.lower(*args).compile().as_text()
    # Each device scores its own query rows against every ad of the batch, never B x B.
    assert f"f32[{local},{size}]" in hlo, "no B_local x B_global block"
    assert f"f32[{size},{size}]" not in hlo, "a B_global x B_global block was materialized"
    want = float(plain(*args))
    np.testing.assert_allclose(float(sharded(*args)), want, rtol=1e-5)
    rows = jax.device_put(args, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(float(sharded(*rows)), want, rtol=1e-5)


def test_retrieval_loss_over_every_impression_matches_the_numpy_softmax():
    e_user, e_context, e_ad, batch = retrieval_inputs()
    got = losses.retrieval_loss(e_user, e_context, e_ad, batch, 0.1, True, True, positives="impressions")
    every_row = np.ones_like(batch["click"])  # each impression's own ad is its positive, clicked or not
    expected = np_retrieval_loss(e_user, e_context, e_ad, batch["ad_id"], batch["ad_log_q"], every_row,
                                 batch["weight"], 0.1, True, True)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    clicks_only = losses.retrieval_loss(e_user, e_context, e_ad, batch, 0.1, True, True)
    assert abs(float(clicks_only) - expected) > 1e-3  # the two choices differ on this batch
    with pytest.raises(ValueError, match="positives"):
        eager.retrieval_loss(e_user, e_context, e_ad, batch, 0.1, True, True, positives="views")
