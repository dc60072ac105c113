"""The wide part's logistic warm start: its design matrix is the wide part's input (X @ w + b is
its logit for the weights read off its parameters), the fit recovers planted effects, and
`model.wide_init="logistic"` puts that fit into the trainer's initial CVR column."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from multitower_jax import features as F
from multitower_jax.models import Wide
from multitower_jax.train import trainer as trainer_lib
from multitower_jax.train import wide_init
from tests.conftest import synthetic_config

SPEC = F.TowerSpec("context", (
    F.Categorical("hour", size=5, dim=2),
    F.Text("query", max_len=4, vocab_size=9),
    F.MultiHot("tags", size=4, max_items=3, dim=2),
    F.Numeric("pages"),
    F.Dense("vec", dim=2),
))
FEATURES = {
    "hour": np.array([0, 5, 2], np.int32),
    "query": np.array([[3, 7, 7, 0], [0, 0, 0, 0], [8, 1, 0, 0]], np.int32),  # row 1: an empty query
    "tags": np.array([[1, 4, 0], [2, 0, 0], [0, 0, 0]], np.int32),
    "pages": np.array([0.5, -2.0, 1.0], np.float32),
    "vec": np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], np.float32),
}


def wide_params(seed: int = 0, pooling: str = "mean") -> dict:
    module = Wide(SPEC, num_logits=2, vocab_multiple=4, pooling=pooling)  # tables padded past the vocabulary
    shapes = jax.eval_shape(lambda r: module.init(r, FEATURES), jax.random.key(0))
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)
    return module, nn.meta.unbox(variables)["params"]


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_design_matrix_times_the_cvr_column_is_the_wide_cvr_logit(pooling):
    module, params = wide_params(pooling=pooling)
    X, blocks = wide_init.design_matrix(SPEC, FEATURES, pooling)
    assert X.shape == (3, 6 + 9 + 5 + 3)  # one-hot hour (id 0 included), query tokens, tags, 3 numeric columns
    w = np.zeros(X.shape[1])
    for b in blocks:
        w[b.start:b.stop] = np.asarray(params[b.param][b.leaf])[:b.stop - b.start, 1]
    logits = np.asarray(module.apply({"params": params}, FEATURES))
    np.testing.assert_allclose(X @ w + params["wide_bias"][1], logits[:, 1], rtol=1e-5, atol=1e-6)
    query = np.asarray(params["wide_query"]["embedding"])[:9, 1]  # row 0: tokens 3, 7, 7
    x_query = X[0, blocks[1].start:blocks[1].stop] @ query
    np.testing.assert_allclose(x_query, (query[3] + 2 * query[7]) / (3 if pooling == "mean" else 1), rtol=1e-6)


def test_poolings_per_logit_mean_the_ctr_column_and_sum_the_cvr_column():
    mixed, params = wide_params(pooling=("mean", "sum"))
    out = np.asarray(mixed.apply({"params": params}, FEATURES))
    for column, pooling in ((0, "mean"), (1, "sum")):
        X, blocks = wide_init.design_matrix(SPEC, FEATURES, pooling)
        w = np.zeros(X.shape[1])
        for b in blocks:
            w[b.start:b.stop] = np.asarray(params[b.param][b.leaf])[:b.stop - b.start, column]
        np.testing.assert_allclose(X @ w + params["wide_bias"][column], out[:, column], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.wide_pooling"):
        Wide(SPEC, num_logits=2, pooling=("mean", "max")).init(jax.random.key(0), FEATURES)


def test_set_column_writes_the_fit_into_one_logit_and_keeps_the_rest():
    module, params = wide_params()
    X, blocks = wide_init.design_matrix(SPEC, FEATURES)
    rng = np.random.default_rng(1)
    fit = wide_init.Fit(rng.normal(size=X.shape[1]), -1.5, 1.0, {1.0: 0.3}, 3, 1.0)
    out = wide_init.set_column(params, blocks, fit, column=1)
    before, after = (np.asarray(module.apply({"params": p}, FEATURES)) for p in (params, out))
    np.testing.assert_allclose(after[:, 1], X @ fit.coef - 1.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    table = np.asarray(out["wide_query"]["embedding"])
    np.testing.assert_array_equal(table[9:], np.asarray(params["wide_query"]["embedding"])[9:])  # sharding pad rows


def test_fit_recovers_planted_effects_and_picks_the_penalty_on_held_out_rows():
    rng = np.random.default_rng(0)
    n = 40_000
    hour = rng.integers(1, 4, n)  # ids 1..3 with logit effects -1, 0, +1
    pages = rng.normal(size=n)
    logit = -2.0 + (hour - 2.0) + 0.5 * pages
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    spec = F.TowerSpec("context", (F.Categorical("hour", size=3, dim=2), F.Numeric("pages")))
    X, blocks = wide_init.design_matrix(spec, {"hour": hour, "pages": pages})
    fit = wide_init.fit_logistic(X, y, seed=0)
    assert fit.C in wide_init.C_GRID and fit.held_out_log_loss[fit.C] == min(fit.held_out_log_loss.values())
    hours = fit.coef[blocks[0].start:blocks[0].stop]
    np.testing.assert_allclose(hours[2] - hours[1], 1.0, atol=0.12)  # differences: one-hot + intercept
    np.testing.assert_allclose(hours[3] - hours[2], 1.0, atol=0.12)
    np.testing.assert_allclose(fit.coef[blocks[1].start], 0.5, atol=0.06)
    with pytest.raises(ValueError, match="needs both labels"):
        wide_init.fit_logistic(X, np.zeros(n))


def test_trainer_starts_the_wide_cvr_column_at_the_fitted_regression(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.model.wide=True", "--config.model.wide_init=logistic")
    trainer = trainer_lib.Trainer(config, tmp_path)
    params = trainer.init_state()["params"]["context_wides_search"]
    features, conversion, weight = wide_init.clicked_train_rows(config, trainer.spec, trainer.stats, "search")
    poolings = tuple(config.model.wide_pooling)
    assert poolings == ("mean", "sum")  # the quickstart's: the CVR column sums the query's words
    X, blocks = wide_init.design_matrix(trainer.spec.context("search"), features, poolings[1])
    fit = wide_init.fit_logistic(X, conversion, weight, int(config.seed))  # the same fit, made again here
    module = Wide(trainer.spec.context("search"), 2, int(config.model.vocab_multiple), pooling=poolings)
    logits = np.asarray(module.apply({"params": params}, features))
    np.testing.assert_allclose(logits[:, 1], X @ fit.coef + fit.intercept, rtol=1e-4, atol=1e-4)
    assert not logits[:, 0].any()  # the CTR column still starts at zero
    base_rate = conversion.mean()
    constant = -np.mean(conversion * np.log(base_rate) + (1 - conversion) * np.log(1 - base_rate))
    assert wide_init._log_loss(conversion, logits[:, 1], weight) < constant  # it learned something


def test_a_split_without_conversions_starts_the_column_at_zero_with_a_warning(synthetic_dir, tmp_path, monkeypatch):
    config = synthetic_config(synthetic_dir, "--config.model.wide=True", "--config.model.wide_init=logistic")
    trainer = trainer_lib.Trainer(config, tmp_path)
    real = wide_init.clicked_train_rows
    monkeypatch.setattr(wide_init, "clicked_train_rows",
                        lambda *a: (lambda f, c, w: (f, np.zeros_like(c), w))(*real(*a)))  # no conversions
    with pytest.warns(UserWarning, match=r"0 conversions; needs both labels.*starts at zero"):
        params = trainer.init_state()["params"]["context_wides_search"]
    assert not any(np.asarray(leaf).any() for leaf in jax.tree_util.tree_leaves(params))


def test_logistic_init_needs_the_wide_part_and_the_ctr_head_ignores_it(synthetic_dir, tmp_path):
    with pytest.raises(ValueError, match="model.wide_init"):
        synthetic_config(synthetic_dir, "--config.model.wide=False", "--config.loss.wide_cvr_weight=0.0",
                         "--config.model.wide_init=logistic")
    config = synthetic_config(synthetic_dir, "--config.model.wide=True", "--config.model.head=ctr",
                              "--config.model.wide_init=logistic", "--config.optim.freeze_wide_cvr=True")
    trainer = trainer_lib.Trainer(config, tmp_path)
    assert not np.asarray(trainer.init_state()["params"]["context_wides_search"]["wide_bias"]).any()  # no fit
    ctr_column = {"context_wides_search": {"wide_bias": np.zeros(1, np.float32)}}
    updates, _ = trainer.tx.update({"context_wides_search": {"wide_bias": np.ones(1, np.float32)}},
                                   trainer.tx.init(ctr_column), ctr_column)
    assert np.asarray(updates["context_wides_search"]["wide_bias"]).all()  # the CTR column is not frozen


def test_freeze_wide_cvr_keeps_the_cvr_column_and_trains_the_rest(synthetic_dir):
    from multitower_jax.train import optim

    config = synthetic_config(synthetic_dir, "--config.model.wide=True", "--config.optim.freeze_wide_cvr=True")
    params = {"context_wides_search": {"wide_query": {"embedding": np.ones((5, 2), np.float32)},
                                       "wide_bias": np.zeros(2, np.float32)},
              "fusion": {"kernel": np.ones((3, 2), np.float32)}}
    grads = jax.tree.map(lambda x: np.random.default_rng(0).normal(size=x.shape).astype(np.float32), params)
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    wide = updates["context_wides_search"]
    assert not np.asarray(wide["wide_query"]["embedding"])[:, 1].any() and not np.asarray(wide["wide_bias"])[1]
    assert np.asarray(wide["wide_query"]["embedding"])[:, 0].all() and np.asarray(updates["fusion"]["kernel"]).all()
    with pytest.raises(ValueError, match="optim.freeze_wide_cvr"):
        synthetic_config(synthetic_dir, "--config.model.wide=False", "--config.loss.wide_cvr_weight=0.0",
                         "--config.model.wide_init=zeros", "--config.optim.freeze_wide_cvr=True")
