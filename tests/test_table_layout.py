"""`sharding.large_table_layout`: the large tables keep a pinned memory layout through init, the
train step, a checkpoint and a restore.

On a CPU the default layout of a 2-D array is row-major, so these tests pin the large tables
column-major: the same code path a TPU takes with "row_major" (its default for an [N, 64] float32
table being column-major)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_MODEL, get_path, tiny_config

from multitower_jax.config_checks import ConfigError
from multitower_jax.data import fake
from multitower_jax.train import sharding
from multitower_jax.train.trainer import Trainer

ADVERTISER = ("ad_tower", "features", "embed_advertiser_id", "embedding")
CITY = ("context_towers_search", "features", "embed_city", "embedding")


def _config(tmp_path, layout):
    config = tiny_config(tmp_path, *TINY_MODEL, "--config.model.vocab_multiple=8", "--config.optim.ema_decay=0.9",
                         "--config.sharding.large_table_bytes=100000",  # advertiser and brand: 520 x 64 x 4 bytes
                         f"--config.sharding.large_table_layout={layout}")
    return config


def _major_to_minor(x) -> tuple[int, ...]:
    return tuple(x.format.layout.major_to_minor)


def test_pinned_tables_keep_their_layout_through_a_checkpoint_and_train_as_the_default_layout(tmp_path):
    """On 2 devices: after init, a step and a restore the large tables (parameters, moving
    average, Adam moments) are column-major and the small ones are not; a restored checkpoint is
    laid out again (straight from orbax the step refuses it); the steps' numbers are those of the
    default layout."""
    pinned = Trainer(_config(tmp_path, "column_major"), None, devices=jax.devices()[:2])
    plain = Trainer(_config(tmp_path, "default"), None, devices=jax.devices()[:2])
    batches = [sharding.shard_batch(fake.random_batch(pinned.spec, "search", 64, seed=s), pinned.mesh) for s in (1, 2)]

    state = pinned.init_state()
    tables = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (520, 64)]
    assert len(tables) == 8 and {_major_to_minor(x) for x in tables} == {(1, 0)}  # 2 tables, 2 EMA, 4 moments
    assert _major_to_minor(get_path(state["params"], CITY)) == (0, 1)

    state, _ = pinned.train_step(state, batches[0])
    assert _major_to_minor(get_path(state["params"], ADVERTISER)) == (1, 0)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", options=ocp.CheckpointManagerOptions(create=True))
    pinned.save(manager, state, None, force=True)
    manager.wait_until_finished()

    raw = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(pinned.abstract_state)))["state"]
    assert _major_to_minor(get_path(raw["params"], ADVERTISER)) == (0, 1)  # orbax gives the default layout
    with pytest.raises(ValueError, match="Layout passed to jit does not match"):
        pinned.train_step(raw, batches[1])
    restored = pinned.restore(manager)
    assert _major_to_minor(get_path(restored["params"], ADVERTISER)) == (1, 0)
    got, got_metrics = pinned.train_step(restored, batches[1])

    want = plain.init_state()
    for batch in batches:
        want, want_metrics = plain.train_step(want, batch)
    np.testing.assert_allclose(float(got_metrics["loss"]), float(want_metrics["loss"]), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_an_unknown_layout_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sharding.large_table_layout: expected .*got 'diagonal'"):
        _config(tmp_path, "diagonal")
