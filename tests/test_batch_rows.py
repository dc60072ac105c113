"""`train.batch_rows`: the large tables seen through the batch's rows give the plain step's result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, get_path, tiny_config

from multitower_jax import features as F
from multitower_jax.data import fake
from multitower_jax.train import batch_rows, sharding
from multitower_jax.train.trainer import Trainer

ADVERTISER = ("ad_tower", "features", "embed_advertiser_id", "embedding")
USER_ID = ("user_tower", "features", "embed_user_id", "embedding")
CATEGORIES = ("context_towers_search", "features", "embed_categories", "embedding")
WIDE_CATEGORIES = ("context_wides_search", "wide_categories", "embedding")
WIDE_CITY = ("context_wides_search", "wide_city", "embedding")
TOKENS = ("text_encoder", "token_embed", "embedding")


def _config(tmp_path, *overrides):
    """The tiny model with the wide part, a user id with OOV dropout and a multi-hot context
    feature; tables of 30,000 bytes and more take row-wise Adagrad: the advertiser, brand, city,
    country, user id and categories tables (the wide part's are smaller) and the token table."""
    config = tiny_config(tmp_path, *TINY_MODEL, "--config.model.wide=True", "--config.model.vocab_multiple=8",
                         "--config.model.tower_dropout=0.2", *overrides)
    config.features.user.user_id = dict(type="categorical", size=1000, dim=16, oov_rate=0.25)
    config.features.context.search.categories = dict(type="multi_hot", size=600, max_items=4, dim=16)
    config.optim.large_table_optimizer = "rowwise_adagrad"
    config.optim.large_table_bytes = 30_000
    config.optim.rowwise_learning_rate = 0.5  # rows move visibly in two steps
    return config


def test_the_view_relabels_ids_by_their_rank_among_the_batch_ids_with_0_first():
    """Hand-worked: a multi-hot feature read by a large table and a small one, and a categorical
    one; the rows are the sorted distinct ids with 0 first, one slot per id, unused slots past
    every table; the ids become their positions; a small reader's gradient goes back to its rows."""
    spec = F.parse_spec({"user": {"uid": dict(type="categorical", size=20, dim=2)},
                         "ad": {"n": dict(type="numeric")},
                         "context": {"search": {"cats": dict(type="multi_hot", size=12, max_items=2, dim=2)}}})
    params = {"user_tower": {"features": {"embed_uid": {"embedding": jnp.arange(42.0).reshape(21, 2)}}},
              "context_towers_search": {"features": {"embed_cats": {"embedding": jnp.arange(26.0).reshape(13, 2)}}},
              "context_wides_search": {"wide_cats": {"embedding": jnp.ones((13, 1))}},
              "text_encoder": {"token_embed": {"embedding": jnp.ones((50, 2))}}}
    large = frozenset({USER_ID[:2] + ("embed_uid", "embedding"), CATEGORIES[:2] + ("embed_cats", "embedding"),
                       TOKENS})
    rows = batch_rows.BatchRows(params, spec, ("search",), large)
    assert set(rows.readers) == {("user_tower", "features", "embed_uid", "embedding"),
                                 ("context_towers_search", "features", "embed_cats", "embedding"),
                                 ("context_wides_search", "wide_cats", "embedding")}  # not the token table
    assert ("context_wides_search", "wide_cats", "embedding") not in rows.large

    batch = {"search": {"user": {"uid": np.array([7, 3, 7])}, "context": {"cats": np.array([[5, 0], [5, 9], [0, 0]])},
                        "ad": {"n": np.zeros(3)}}}
    view, new, found = rows.view(params, batch)
    unused = batch_rows.UNUSED_ROW
    np.testing.assert_array_equal(found[("user_tower", "features", "embed_uid", "embedding")], [0, 3, 7, unused])
    np.testing.assert_array_equal(new["search"]["user"]["uid"], [2, 1, 2])
    np.testing.assert_array_equal(found[("context_towers_search", "features", "embed_cats", "embedding")],
                                  [0, 5, 9] + [unused] * 4)
    np.testing.assert_array_equal(new["search"]["context"]["cats"], [[1, 0], [1, 2], [0, 0]])
    np.testing.assert_array_equal(view["user_tower"]["features"]["embed_uid"]["embedding"],
                                  [[0, 1], [6, 7], [14, 15], [0, 0]])
    assert view["text_encoder"]["token_embed"]["embedding"].shape == (50, 2)
    np.testing.assert_array_equal(batch["search"]["user"]["uid"], [7, 3, 7])  # the caller's batch is kept

    grads = jax.tree.map(jnp.ones_like, view)
    dense = rows.dense_gradients(grads, params, found)
    wide = np.asarray(dense["context_wides_search"]["wide_cats"]["embedding"])
    assert wide.shape == (13, 1) and wide[[0, 5, 9], 0].tolist() == [1, 1, 1] and wide.sum() == 3
    assert dense["context_towers_search"]["features"]["embed_cats"]["embedding"].shape == (7, 2)


def _two_steps(trainer):
    state = trainer.init_state()
    metrics = []
    for seed in (3, 4):
        batch = fake.random_batch(trainer.spec, "search", 256, seed=seed)
        state, m = trainer.train_step(state, {"search": sharding.shard_batch(batch, trainer.mesh)})
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics)


def _assert_same(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_the_step_through_the_batch_rows_equals_the_plain_step(tmp_path):
    """Two train steps (dropout and OOV dropout on) with ``optim.sparse_row_updates`` on 1 and on
    8 fake devices (the large tables row-sharded) give the plain single-device step's parameters,
    accumulators, Adam moments, loss and gradient norm; the large tables really took the batch-row
    path (their rows outside the batches are bit for bit unchanged, as in the plain step)."""
    config = _config(tmp_path)
    config.sharding.large_table_bytes = 30_000  # row-sharded over the devices
    plain_trainer = Trainer(_config(tmp_path, "--config.optim.sparse_row_updates=False"), None,
                            devices=jax.devices()[:1])
    assert plain_trainer.batch_rows is None
    want_state, want_metrics = _two_steps(plain_trainer)
    start = jax.device_get(plain_trainer.init_state())["params"]
    ids = [fake.random_batch(plain_trainer.spec, "search", 256, seed=s)["ad"]["advertiser_id"] for s in (3, 4)]
    untouched = np.setdiff1d(np.arange(get_path(start, ADVERTISER).shape[0]), np.concatenate(ids))
    assert len(untouched) > 100

    for devices in (1, 8):
        trainer = Trainer(config, None, devices=jax.devices()[:devices])
        rows = trainer.batch_rows
        assert {ADVERTISER, USER_ID, CATEGORIES} <= rows.large and TOKENS not in rows.readers
        assert {WIDE_CATEGORIES, WIDE_CITY} <= set(rows.readers) - rows.large  # small readers of large features
        state, metrics = _two_steps(trainer)
        for got, want in zip(metrics, want_metrics):
            for key in ("loss", "grad_norm"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{key} on {devices}")
        # atol as for 8 devices against 1 elsewhere: Adam turns rounding in near-zero gradients into ~1e-6
        _assert_same(state["params"], want_state["params"], rtol=1e-5, atol=1e-5)
        _assert_same(state["opt_state"], want_state["opt_state"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(get_path(state["params"], ADVERTISER)[untouched], get_path(start, ADVERTISER)[untouched])
        moved = np.abs(get_path(state["params"], USER_ID) - get_path(start, USER_ID)).max(axis=1)
        assert moved[0] > 0  # the OOV row, where OOV dropout sends a quarter of the rows


def test_sparse_row_updates_refuse_gradient_accumulation(tmp_path):
    with pytest.raises(ValueError, match="optim.accumulation_steps: expected 1 with optim.sparse_row_updates"):
        Trainer(_config(tmp_path, "--config.optim.accumulation_steps=2"), None, devices=jax.devices()[:1])


def test_bench_rows_refuses_a_config_without_row_wise_tables(tmp_path):
    """`multitower bench rows` needs tables that take row-wise Adagrad, and says which settings."""
    from multitower_jax.bench import row_updates

    with pytest.raises(ValueError, match="optim.large_table_optimizer=rowwise_adagrad"):
        row_updates.run(tiny_config(tmp_path, *TINY_MODEL), steps=1)
