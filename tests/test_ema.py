"""The parameters' moving average (`optim.ema_decay`): the train step keeps it as a numpy
recursion over the steps' parameters says, and a run evaluates, keeps as best and restores it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from multitower_jax.train import loop, optim, sharding
from multitower_jax.train import trainer as trainer_lib
from tests.conftest import synthetic_config


def test_decay_is_capped_early_and_reaches_the_configured_value():
    np.testing.assert_allclose(float(optim.ema_decay_at(0.999, 0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(optim.ema_decay_at(0.999, 90)), 0.91, rtol=1e-6)
    np.testing.assert_allclose(float(optim.ema_decay_at(0.999, 100_000)), 0.999, rtol=1e-6)


def test_train_step_keeps_the_moving_average_of_the_parameters(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.optim.ema_decay=0.5")
    trainer = trainer_lib.Trainer(config, tmp_path)
    state = trainer.init_state()
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    expected = leaves(state["params"])
    np.testing.assert_array_equal(np.concatenate([x.ravel() for x in leaves(state["ema_params"])]),
                                  np.concatenate([x.ravel() for x in expected]))
    it = iter(trainer.dataset("train", train=True))
    for step in range(4):
        state, _ = trainer.train_step(state, sharding.shard_batch(next(it), trainer.mesh))
        d = min(0.5, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p for e, p in zip(expected, leaves(state["params"]))]
    got = leaves(state["ema_params"])
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    moved = sum(float(np.abs(p - g).max()) for p, g in zip(leaves(state["params"]), got))
    assert moved > 0  # the average lags the parameters
    assert trainer.model_params(state) is state["ema_params"]


def test_a_run_tests_and_restores_the_average(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.optim.ema_decay=0.9", "--config.train.num_steps=6",
                              "--config.train.eval_every=6", "--config.train.checkpoint_every=6")
    result = loop.train(config, tmp_path)
    trainer = trainer_lib.Trainer(config, tmp_path)
    state = trainer.restore(trainer.checkpoint_manager())
    params, step = trainer.restore_final()
    assert step == 6 and trainer.restored_from == "best"
    for best, ema, last in zip(*(jax.tree_util.tree_leaves(t) for t in (params, state["ema_params"], state["params"]))):
        np.testing.assert_array_equal(np.asarray(best), np.asarray(ema))
    assert any(not np.array_equal(np.asarray(e), np.asarray(p))
               for e, p in zip(jax.tree_util.tree_leaves(state["ema_params"]), jax.tree_util.tree_leaves(state["params"])))
    assert trainer.evaluate(params, "test")["ctr_auc"] == pytest.approx(result["ctr_auc"], abs=1e-9)
    with pytest.raises(ValueError, match="optim.ema_decay"):
        synthetic_config(synthetic_dir, "--config.optim.ema_decay=1.0")
