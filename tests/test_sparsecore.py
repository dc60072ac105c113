"""`train.sparsecore`: the large id tables on the SparseCores.

On a CPU the "reference" kernel runs the placement's train step (MOD-ordered tables, slots,
relabelled ids, one global clipping, Adagrad of the looked-up rows) and must give the plain
step's result with ``optim.large_table_optimizer = "adagrad"``; the "tpu" kernel (jax-tpu-embedding)
is compiled for a v5p slice, its host preprocessing is run on the CPU and decoded by an
independent emulation of the SparseCore lookup."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, get_path, tiny_config

from multitower_jax.config_checks import ConfigError
from multitower_jax.data import fake
from multitower_jax.train import aot, optim, sparsecore
from multitower_jax.train.trainer import Trainer

ADVERTISER = ("ad_tower", "features", "embed_advertiser_id", "embedding")
USER_ID = ("user_tower", "features", "embed_user_id", "embedding")
CATEGORIES = ("context_towers_search", "features", "embed_categories", "embedding")
WIDE_CATEGORIES = ("context_wides_search", "wide_categories", "embedding")
TOKENS = ("text_encoder", "token_embed", "embedding")
ON_SPARSECORE = ["--config.sharding.large_table_placement=sparsecore", "--config.sharding.large_table_bytes=30000"]
NO_CLIP = ["--config.optim.clip_norm=0"]
REFERENCE = [*ON_SPARSECORE, "--config.sharding.sparsecore_kernel=reference", "--config.sharding.sparsecores_per_chip=2"]


def _config(tmp_path, *overrides):
    """The tiny model with the wide part, a user id with OOV dropout and a multi-hot context
    feature; tables of 30,000 bytes and more take Adagrad: the advertiser, brand, city, country,
    user id and categories tables (the wide part's are smaller) and the token table. Rows are
    padded to 128: 8 rows per SparseCore for 16 of them."""
    config = tiny_config(tmp_path, *TINY_MODEL, "--config.model.wide=True", "--config.model.vocab_multiple=128",
                         "--config.model.tower_dropout=0.2", "--config.optim.large_table_optimizer=adagrad",
                         "--config.optim.large_table_bytes=30000", *overrides)
    config.features.user.user_id = dict(type="categorical", size=1000, dim=16, oov_rate=0.25)
    config.features.context.search.categories = dict(type="multi_hot", size=600, max_items=4, dim=16)
    config.optim.rowwise_learning_rate = 0.5  # rows move visibly in two steps
    return config


def _two_steps(trainer):
    state = trainer.init_state()
    metrics = []
    for seed in (3, 4):
        batch = fake.random_batch(trainer.spec, "search", 256, seed=seed)
        state, m = trainer.train_step(state, trainer.shard_batches({"search": batch}))
        metrics.append(m)
    return state, jax.device_get(metrics)


def _accumulator(opt_state, path):
    """The plain step's Adagrad accumulator of the table at `path`."""
    found = [x for p, x in jax.tree_util.tree_leaves_with_path(opt_state)
             if "sum_sq" in jax.tree_util.keystr(p) and optim.param_names(p)[-len(path):] == path]
    assert len(found) == 1, path
    return np.asarray(found[0])


def test_mod_order_puts_row_i_at_i_mod_g_times_rows_per_shard_plus_i_div_g():
    rows, shards = 48, 6
    table = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    stored = np.asarray(sparsecore.mod_order(jnp.asarray(table), shards))
    for i in range(rows):
        np.testing.assert_array_equal(stored[(i % shards) * (rows // shards) + i // shards], table[i])
    np.testing.assert_array_equal(np.asarray(sparsecore.mod_rows(jnp.arange(rows), rows, shards)),
                                  [(i % shards) * 8 + i // shards for i in range(rows)])
    np.testing.assert_array_equal(np.asarray(sparsecore.natural_order(jnp.asarray(stored), shards)), table)
    if importlib.util.find_spec("jax_tpu_embedding") is not None:  # jax-tpu-embedding's own order: 3 chips x 2
        from jax_tpu_embedding.sparsecore.utils import utils
        theirs = utils.shard_emb_table(table, num_devices=3, num_sc_per_device=2)
        np.testing.assert_array_equal(np.asarray(theirs).reshape(rows, 2), stored)


def test_the_step_on_the_sparsecores_equals_the_plain_adagrad_step(tmp_path):
    """Two train steps (dropout, OOV dropout, a multi-hot feature, the wide part reading placed
    features) with the tables on 16 emulated SparseCores (8 fake devices, 2 each) give the
    plain single-device step's loss, parameters and Adagrad accumulators (in natural order);
    rows outside the batches keep their values bit for bit. No clipping: the placement's global
    norm counts a repeated id's slots one by one."""
    plain = Trainer(_config(tmp_path, *NO_CLIP, "--config.optim.sparse_row_updates=False"), None,
                    devices=jax.devices()[:1])
    assert plain.sparsecore is None and plain.batch_rows is None
    want_state, want_metrics = _two_steps(plain)
    want_params = jax.device_get(plain.model_params(want_state))
    start = jax.device_get(plain.model_params(plain.init_state()))
    ids = [fake.random_batch(plain.spec, "search", 256, seed=s)["ad"]["advertiser_id"] for s in (3, 4)]
    untouched = np.setdiff1d(np.arange(get_path(start, ADVERTISER).shape[0]), np.concatenate(ids))
    assert len(untouched) > 100
    for devices in (8,):
        trainer = Trainer(_config(tmp_path, *NO_CLIP, *REFERENCE), None, devices=jax.devices()[:devices])
        sc = trainer.sparsecore
        assert sc.shards == 2 * devices and trainer.batch_rows is None
        assert {ADVERTISER, USER_ID, CATEGORIES} <= sc.paths and TOKENS not in sc.paths  # a token table stays
        assert WIDE_CATEGORIES in set(sc.view_of.readers) - sc.paths
        state, metrics = _two_steps(trainer)
        for got, want in zip(metrics, want_metrics):
            np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, err_msg=f"loss on {devices}")
        params = jax.device_get(trainer.model_params(state))
        # atol: the attention key biases' gradient is rounding noise (softmax ignores them), which
        # Adam scales to ~1e-5 steps whose signs differ with the summation order
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-5, err_msg=jax.tree_util.keystr(path))
        stored = jax.device_get(state["params"])
        for path in sc.paths:
            natural = np.asarray(sparsecore.natural_order(get_path(state["sparsecore"]["accumulators"], path), sc.shards))
            np.testing.assert_allclose(natural, _accumulator(want_state["opt_state"], path), rtol=1e-5,
                                       err_msg=str(path))
            # the state keeps the table in MOD order: natural row i at (i % G) * (rows / G) + i // G
            rows = get_path(stored, path).shape[0]
            np.testing.assert_array_equal(get_path(stored, path)[np.asarray(sparsecore.mod_rows(np.arange(rows), rows, sc.shards))],
                                          get_path(params, path))
        np.testing.assert_array_equal(get_path(params, ADVERTISER)[untouched], get_path(start, ADVERTISER)[untouched])
        moved = np.abs(get_path(params, USER_ID) - get_path(start, USER_ID)).max(axis=1)
        assert moved[0] > 0  # the OOV row, where OOV dropout sends a quarter of the rows
        assert int(state["sparsecore"]["shards"]) == sc.shards


def test_slots_built_on_the_host_are_the_steps(tmp_path):
    """The ids the host preprocesses for the SparseCores are the step's slots: per chip, 0 and the
    chip's ids; the model sees each id as its slot on its chip, 0 as 0; the slots it never reads
    (ids 0 of the multi-hot padding, the padding) spread over the shards."""
    trainer = Trainer(_config(tmp_path, *REFERENCE), None, devices=jax.devices()[:4])
    sc = trainer.sparsecore
    batch = fake.random_batch(trainer.spec, "search", 256, seed=5)
    batch["context"]["categories"][:3] = 0  # padding
    relabelled = sc.relabel({"search": batch})["search"]
    for key in sc.features():
        host, read = sc.host_slots({"search": batch}, key, 4)
        np.testing.assert_array_equal(host.ravel(), np.asarray(sc.slot_ids({"search": batch}, key)))
        assert host.shape == (4, sc.slots_per_chip[key]) and (host[:, 0] == 0).all() and read[:, 0].all()
        ids, slots = batch[key[1]][key[2]].reshape(4, -1), np.asarray(relabelled[key[1]][key[2]]).reshape(4, -1)
        # each nonzero id's slot on its chip (the rows are split over the chips in order) holds
        # the id; the model reads exactly those slots and slot 0
        np.testing.assert_array_equal(np.take_along_axis(host, slots, axis=1), ids)
        assert ((slots == 0) == (ids == 0)).all()
        assert read.sum() == 4 + (ids != 0).sum()
        # the unread slots spread evenly over the shards, on each chip
        for chip in range(4):
            unread = host[chip][~read[chip]] % sc.shards
            assert np.bincount(unread).max() == -(-unread.size // sc.shards)


def test_the_placement_needs_adagrad_row_sharding_and_rows_in_eights_per_sparsecore(tmp_path):
    with pytest.raises(ConfigError, match="optim.large_table_optimizer: expected 'adagrad'"):
        tiny_config(tmp_path, *TINY_MODEL, *REFERENCE, "--config.optim.large_table_optimizer=rowwise_adagrad",
                    "--config.optim.large_table_bytes=30000")
    with pytest.raises(ConfigError, match="sharding.large_table_bytes: expected > 0 and at most"):
        tiny_config(tmp_path, *TINY_MODEL, *REFERENCE, "--config.sharding.large_table_bytes=0",
                    "--config.optim.large_table_optimizer=adagrad", "--config.optim.large_table_bytes=30000")
    with pytest.raises(ValueError, match="not a multiple of 8 x 16 SparseCores .*model.vocab_multiple=128"):
        Trainer(_config(tmp_path, *REFERENCE, "--config.model.vocab_multiple=64"), None, devices=jax.devices()[:8])


def test_a_checkpoint_of_another_sparsecore_count_is_refused(tmp_path):
    trainer = Trainer(_config(tmp_path, *REFERENCE), None, devices=jax.devices()[:2])
    trainer.sparsecore.check_restored({"sparsecore": {"shards": np.int32(4)}})
    with pytest.raises(ValueError, match="sharded over 8 SparseCores, this run's over 4"):
        trainer.sparsecore.check_restored({"sparsecore": {"shards": np.int32(8)}})


# -- the "tpu" kernel: compiled for a v5p slice; its inputs preprocessed on this CPU ---------------

needs_tpu_embedding = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or importlib.util.find_spec("jax_tpu_embedding") is None,
    reason="libtpu / jax-tpu-embedding not installed (pip install -e '.[tpu]')")


@pytest.fixture(scope="module")
def v5p_2x2x1():
    return aot.topology_devices(aot.tpu_settings(tiny_config("unused"), "v5:2x2x1"))


@needs_tpu_embedding
def test_the_tpu_kernel_compiles_for_v5p_and_its_host_inputs_look_up_the_slots(v5p_2x2x1, tmp_path):
    """The train step with jax-tpu-embedding's lookup and Adagrad compiles for a v5p 2x2x1 slice
    (4 chips x 4 SparseCores): its program runs SparseCore custom calls and holds a quarter of
    each placed table per chip. The host preprocessing of a real batch has the compiled program's
    input shapes, and a numpy emulation of the SparseCore lookup over it (`_emulate_lookup`) gives
    each slot's row (what the reference kernel looks up), zeros for the slots the model never
    reads."""
    config = _config(tmp_path, *ON_SPARSECORE, "--config.data.batch_size=256")
    programs = aot.compile_programs(config, v5p_2x2x1, programs=("train_step",))
    trainer, compiled = programs["trainer"], programs["train_step"]
    sc = trainer.sparsecore
    assert sc.per_chip == 4 and sc.shards == 16
    hlo = compiled.as_text()
    assert 'execution_thread="sparsecore"' in hlo and "SparseGather" in hlo, "no SparseCore program in the step"
    for path in sc.paths:
        table = get_path(trainer.abstract_state["params"], path)
        assert aot._per_chip_bytes(table) * 4 == aot._nbytes(table), path

    batch = fake.random_batch(trainer.spec, "search", 256, seed=7)
    inputs = sc.host_inputs({"search": batch})
    want = jax.tree.map(lambda s: s.shape, sc.abstract_inputs())
    assert jax.tree.map(np.shape, inputs) == want
    rng = np.random.default_rng(0)
    for path in sorted(sc.paths):
        key, (rows, dim) = sc.view_of.readers[path], sc.shapes[path]
        table = rng.normal(size=(rows, dim)).astype(np.float32)
        name = "/".join(path)
        buffers = [np.asarray(getattr(inputs.sparse_dense_matmul_input, f)[name])
                   for f in ("lhs_row_pointers", "lhs_embedding_ids", "lhs_sample_ids", "lhs_gains")]
        got = _emulate_lookup(*buffers, np.asarray(sparsecore.mod_order(table, sc.shards)), chips=4, per_chip=4,
                              slots_per_chip=sc.slots_per_chip[key])
        slots, read = sc.host_slots({"search": batch}, key, 4)
        want = np.where(read.ravel()[:, None], table[slots.ravel()], 0.0)  # weight 0: zeros
        np.testing.assert_array_equal(got, want, err_msg=name)


def _emulate_lookup(row_pointers, embedding_ids, sample_ids, gains, table_mod, *, chips, per_chip, slots_per_chip):
    """What the SparseCore lookup computes from jax-tpu-embedding's preprocessed buffers (one
    table, MOD order, one host), in numpy: the activations ``[chips * slots_per_chip, dim]``.

    The buffers are, per chip and per SparseCore of it, one section of equal size; in it, the
    entries of each of the G = chips x per_chip shards (partitions) in turn, each shard's starting
    at a multiple of 8; ``row_pointers`` (G per SparseCore) are the shards' end offsets in the
    section. An entry is (the row within the shard, ``id // G``; the sample within the
    SparseCore's share of the chip's slots; its gain); shard ``p``'s row ``r`` is row
    ``p * rows / G + r`` of the MOD-ordered table. Unused entries hold 2^31 - 1."""
    shards, rows = chips * per_chip, table_mod.shape[0]
    section = embedding_ids.size // shards
    pointers = row_pointers.reshape(chips, per_chip, shards)
    ids, samples, weights = (a.reshape(chips, per_chip, section) for a in (embedding_ids, sample_ids, gains))
    out = np.zeros((chips * slots_per_chip, table_mod.shape[1]), table_mod.dtype)
    per_sc = slots_per_chip // per_chip
    for chip, sc in np.ndindex(chips, per_chip):
        start = 0
        for shard, end in enumerate(pointers[chip, sc]):
            for e in range(start, end):
                slot = chip * slots_per_chip + sc * per_sc + samples[chip, sc, e]
                out[slot] += weights[chip, sc, e] * table_mod[shard * (rows // shards) + ids[chip, sc, e]]
            start = -(-end // 8) * 8
    return out


@needs_tpu_embedding
def test_too_many_ids_for_one_shard_is_a_clear_error_not_an_abort(v5p_2x2x1, tmp_path):
    """jax-tpu-embedding's preprocessing aborts the process when a SparseCore sends more ids to
    one shard than its bound; the host checks first and names the table and the option. With the
    bound at 0 (every id a SparseCore holds) the same batch goes through."""
    batch = None
    for limit in (0, 8):
        config = _config(tmp_path, *ON_SPARSECORE, "--config.data.batch_size=256",
                         f"--config.sharding.sparsecore_max_ids_per_partition={limit}")
        trainer = Trainer(config, None, devices=v5p_2x2x1)
        if batch is None:
            batch = fake.random_batch(trainer.spec, "search", 256, seed=1)
            batch["ad"]["advertiser_id"][:] = 17  # every id in one shard
        if limit == 0:
            assert trainer.sparsecore.host_inputs({"search": batch}) is not None
            # noted for the train log: a SparseCore's 24 slots all hold advertiser 17
            assert trainer.host_metrics() == {"sparsecore_max_ids_per_shard": 24}
        else:
            with pytest.raises(ValueError, match=r"embed_advertiser_id/embedding: 24 ids of one SparseCore's share .* "
                                                 r"sharding.sparsecore_max_ids_per_partition=8"):
                trainer.sparsecore.host_inputs({"search": batch})
