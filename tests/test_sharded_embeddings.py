"""Embedding tables sharded row-wise over the "model" mesh axis: same numbers, 1/n of the rows each."""

import jax
import numpy as np
import pytest

from multitower_jax import config as config_lib
from multitower_jax.train import losses, sharding
from multitower_jax.train import trainer as trainer_lib
from tests.conftest import synthetic_config

SHARDED_RULES = ("--config.sharding.rules=(('vocab', 'model'), ('embed', None), ('embed_in', None), "
                 "('mlp', None), ('heads', None), ('kv', None), ('pos', None))")


def _loss_and_grads(trainer, state, batch):
    def loss_fn(params, batch):
        out = trainer.model.apply({"params": params}, batch, trainer.placement)
        return losses.total_loss(out, batch, trainer.loss_config, trainer.mesh)[0]

    params_sharding = trainer.state_shardings["params"]
    fn = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(params_sharding, sharding.batch_sharding(trainer.mesh)),
                 out_shardings=(sharding.replicated(trainer.mesh), params_sharding))
    return fn(state["params"], sharding.shard_batch(batch, trainer.mesh))


def test_sharded_tables_match_replicated_and_hold_a_slice_each(synthetic_dir, tmp_path):
    assert jax.device_count() == 8
    common = ["--config.model.vocab_multiple=8"]
    replicated = trainer_lib.Trainer(synthetic_config(synthetic_dir, *common), tmp_path, devices=jax.devices()[:1])
    sharded = trainer_lib.Trainer(
        synthetic_config(synthetic_dir, *common, "--config.mesh.data=2", "--config.mesh.model=4", SHARDED_RULES),
        tmp_path, devices=jax.devices())
    s1, s8 = replicated.init_state(), sharded.init_state()

    table = s8["params"]["ad_tower"]["features"]["embed_advertiser_id"]["embedding"]
    assert table.shape == (520, 64)  # 512 ids + OOV row, padded to a multiple of 8
    shards = table.addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (130, 64) for s in shards)  # 1/4 of the rows each
    assert len({s.index[0].start for s in shards}) == 4  # 4 distinct row slices, each on the 2 "data" devices
    token_table = s8["params"]["text_encoder"]["token_embed"]["embedding"]
    assert {s.data.shape[0] for s in token_table.addressable_shards} == {token_table.shape[0] // 4}
    kernel = s8["params"]["ad_tower"]["mlp"]["block_0"]["dense"]["kernel"]
    assert all(s.data.shape == kernel.shape for s in kernel.addressable_shards)  # dense layers replicated

    batch = next(iter(replicated.dataset("train", train=True)))
    loss1, grads1 = _loss_and_grads(replicated, s1, batch)
    loss8, grads8 = _loss_and_grads(sharded, s8, batch)
    np.testing.assert_allclose(float(loss1), float(loss8), rtol=1e-5)
    g8 = grads8["ad_tower"]["features"]["embed_advertiser_id"]["embedding"]
    assert g8.sharding.spec == table.sharding.spec  # the gradient of a sharded table stays sharded
    assert np.abs(np.asarray(g8)).sum() > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))

    # One full train step (optimizer included) gives the same parameters.
    n1, _ = replicated.train_step(s1, sharding.shard_batch(batch, replicated.mesh))
    n8, _ = sharded.train_step(s8, sharding.shard_batch(batch, sharded.mesh))
    for a, b in zip(jax.tree.leaves(n1["params"]), jax.tree.leaves(n8["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_sharding_tables_needs_rows_divisible_by_the_model_axis(synthetic_dir):
    with pytest.raises(config_lib.ConfigError, match="model.vocab_multiple"):
        synthetic_config(synthetic_dir, "--config.mesh.model=4", SHARDED_RULES)
    with pytest.raises(config_lib.ConfigError, match="sharding.rules"):
        synthetic_config(synthetic_dir, "--config.sharding.rules=(('vocab', 'tensor'),)")
