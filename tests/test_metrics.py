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
