import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from multitower_jax.train import metrics


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(2000) < 0.1
    scores = np.round(rng.random(2000) + 0.3 * labels, 1)  # few distinct values: many ties
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_known_values():
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert np.isnan(metrics.auc([0.1, 0.2], [1, 1]))


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(0)
    p, y = rng.random(500), rng.random(500) < 0.3
    assert metrics.logloss(p, y) == pytest.approx(log_loss(y, p), rel=1e-6)


def test_expected_auc_is_the_pair_weighted_share_with_ties_and_the_mean_of_sampled_aucs():
    rng = np.random.default_rng(4)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    probs = rng.uniform(0.0, 0.4, 300)
    weights = probs[:, None] * (1 - probs)[None, :]
    np.fill_diagonal(weights, 0.0)
    wins = (scores[:, None] > scores[None, :]) + 0.5 * (scores[:, None] == scores[None, :])
    np.testing.assert_allclose(metrics.expected_auc(scores, probs), (wins * weights).sum() / weights.sum(), rtol=1e-12)
    # The mean AUC over label draws converges to it (the ratio of expectations, to O(1/n)).
    sampled = [metrics.auc(scores, rng.random(300) < probs) for _ in range(2000)]
    assert abs(np.mean(sampled) - metrics.expected_auc(scores, probs)) < 0.004
    # Labels that are certain give the ordinary AUC; a constant score gives 1/2.
    labels = rng.random(300) < 0.3
    np.testing.assert_allclose(metrics.expected_auc(scores, labels.astype(float)), metrics.auc(scores, labels))
    assert metrics.expected_auc(np.zeros(300), probs) == pytest.approx(0.5)
    assert np.isnan(metrics.expected_auc(scores, np.zeros(300)))
