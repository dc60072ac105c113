"""The training loop: compiles once, resumes exactly, shards exactly, writes its metrics."""

import json
import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from multitower_jax.train import trainer as trainer_lib
from multitower_jax.train import loop, metrics, sharding
from tests.conftest import synthetic_config


def test_train_step_compiles_once_and_learns(synthetic_dir, tmp_path):
    config = synthetic_config(synthetic_dir, "--config.train.num_steps=60")
    trainer = trainer_lib.Trainer(config, tmp_path)
    state = trainer.init_state()
    it = iter(trainer.dataset("train", train=True))
    losses = []
    for _ in range(60):
        state, metrics = trainer.train_step(state, sharding.shard_batch(next(it), trainer.mesh))
        losses.append(float(metrics["ranking_loss"]))
    assert trainer.train_step._cache_size() == 1  # no recompilation after the first step
    assert np.mean(losses[-10:]) < np.mean(losses[:5])


def test_sharded_step_equals_single_device_step(synthetic_dir, tmp_path):
    assert jax.device_count() == 8
    config = synthetic_config(synthetic_dir)
    single = trainer_lib.Trainer(config, tmp_path, devices=jax.devices()[:1])
    multi = trainer_lib.Trainer(config, tmp_path, devices=jax.devices())
    batch = next(iter(single.dataset("train", train=True)))
    s1, m1 = single.train_step(single.init_state(), sharding.shard_batch(batch, single.mesh))
    s8, m8 = multi.train_step(multi.init_state(), sharding.shard_batch(batch, multi.mesh))
    assert len(s8["params"]["ad_tower"]["mlp"]["block_0"]["dense"]["kernel"].sharding.device_set) == 8
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_sharded_step_with_the_pallas_kernels_equals_the_single_device_xla_step(synthetic_dir, tmp_path):
    """The text encoder and the in-batch softmax as Pallas kernels (in the interpreter here), per
    shard of 8 devices, inside the real train step and evaluation: the XLA model's loss, updated
    parameters and predictions on one device."""
    common = ["--config.model.text.dropout=0.0"]
    config = synthetic_config(synthetic_dir, *common)
    fused_config = synthetic_config(synthetic_dir, *common, "--config.model.text.kernel=pallas_interpret",
                                    "--config.loss.retrieval_kernel=pallas_interpret")
    single = trainer_lib.Trainer(config, tmp_path, devices=jax.devices()[:1])
    fused = trainer_lib.Trainer(fused_config, tmp_path, devices=jax.devices())
    batch = next(iter(single.dataset("train", train=True)))
    s1, m1 = single.train_step(single.init_state(), sharding.shard_batch(batch, single.mesh))
    s8, m8 = fused.train_step(fused.init_state(), sharding.shard_batch(batch, fused.mesh))
    assert float(m1["retrieval_loss"]) > 0
    for key in ("loss", "retrieval_loss"):
        np.testing.assert_allclose(float(m1[key]), float(m8[key]), rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    p1 = single.predict(single.model_params(s1), sharding.shard_batch(batch, single.mesh))
    p8 = fused.predict(fused.model_params(s8), sharding.shard_batch(batch, fused.mesh))
    assert "pallas_call" in str(jax.make_jaxpr(fused.predict)(fused.model_params(s8), sharding.shard_batch(batch, fused.mesh)))
    assert "pallas_call" not in str(jax.make_jaxpr(single.predict)(single.model_params(s1),
                                                                    sharding.shard_batch(batch, single.mesh)))
    for key in p1:
        np.testing.assert_allclose(np.asarray(p1[key]), np.asarray(p8[key]), atol=1e-5, rtol=1e-5, err_msg=key)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(synthetic_dir, tmp_path):
    common = ["--config.train.checkpoint_every=10", "--config.data.negative_downsample_rate=0.5"]
    straight = tmp_path / "straight"
    loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=24", *common), straight)
    resumed = tmp_path / "resumed"
    loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=14", *common), resumed)
    loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=24", *common), resumed)

    def final_params(workdir):
        t = trainer_lib.Trainer(synthetic_config(synthetic_dir, *common), workdir)
        state = t.restore(t.checkpoint_manager())
        assert int(state["step"]) == 24
        return jax.tree.leaves(state["params"])

    for a, b in zip(final_params(straight), final_params(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps == sorted(steps)
    assert (straight / "tensorboard").is_dir() and any((straight / "tensorboard").iterdir())


def test_eval_report_and_predictions(synthetic_dir, tmp_path):
    workdir = tmp_path / "run"
    result = loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=10"), workdir)
    for key in ("ctr_auc", "ctr_logloss", "cvr_auc", "ctcvr_auc", "oracle_ctr_auc", "oracle_ctcvr_auc", "num_examples"):
        assert key in result
    assert result["num_examples"] == 2000
    saved = json.loads((workdir / "eval_test.json").read_text())
    assert saved["ctr_auc"] == pytest.approx(result["ctr_auc"])
    config = synthetic_config(synthetic_dir)
    again = loop.evaluate_workdir(config, workdir, "test", str(tmp_path / "pred.parquet"))
    table = {k: v.to_numpy() for k, v in zip(*[pq.read_table(tmp_path / "pred.parquet").column_names,
                                                  pq.read_table(tmp_path / "pred.parquet").columns])}
    assert len(table["click"]) == 2000 and {"pctr", "pcvr", "pctcvr", "click", "p_click", "ad_id"} <= set(table)
    # Each row carries its impression's full int64 ids (the synthetic ids have the split in bit 41):
    # the same impressions as the stored test split, and each row's own ad and user.
    stored = _stored_split(synthetic_dir, "test")
    assert table["impression_id"].dtype == table["click"].dtype == table["conversion"].dtype == np.int64
    assert table["impression_id"].max() >= 1 << 40
    assert sorted(table["impression_id"]) == sorted(stored["impression_id"])
    order = {i: r for r, i in enumerate(stored["impression_id"])}
    rows = np.array([order[i] for i in table["impression_id"]])
    for key in ("user_id", "ad_id", "click", "p_click"):
        np.testing.assert_array_equal(table[key], stored[key][rows].astype(table[key].dtype))
    assert again["ctr_auc"] == pytest.approx(roc_auc_score(table["click"], table["pctr"]), abs=1e-9)
    assert again["oracle_ctr_auc"] == pytest.approx(roc_auc_score(table["click"], table["p_click"]), abs=1e-9)
    clicked = table["click"] > 0
    assert again["cvr_auc"] == pytest.approx(roc_auc_score(table["conversion"][clicked], table["pcvr"][clicked]), abs=1e-9)
    oracle_ctcvr = table["p_click"] * table["p_convert_given_click"]
    assert again["expected_ctcvr_auc"] == pytest.approx(metrics.expected_auc(table["pctcvr"], oracle_ctcvr), abs=1e-12)
    assert again["expected_ctr_auc"] == pytest.approx(metrics.expected_auc(table["pctr"], table["p_click"]), abs=1e-12)
    assert again["oracle_expected_ctr_auc"] > max(again["expected_ctr_auc"], 0.5)  # 10 steps: far below the oracle
    assert (workdir / "eval_test.json").exists()


def test_int64_ids_survive_the_cross_host_gather():
    """JAX arrays are 32-bit here: ids above 2**31 (hashed, or the synthetic split bits) go as int32 pairs."""
    from multitower_jax.train import evaluate

    ids = np.array([0, 1, -1, 2**31, 2**40 + 7, -(2**62) + 3, 2**63 - 1], np.int64)
    gathered = evaluate._allgather_int64(ids)
    assert gathered.dtype == np.int64
    np.testing.assert_array_equal(gathered, ids)


def test_bench_train_reports_its_figures_against_the_peak_in_the_compute_dtype(synthetic_dir, tmp_path, monkeypatch):
    from multitower_jax.bench import train as bench_train

    measured = {}
    real_peak = bench_train.matmul_peak_flops

    def small_peak(dtype=np.float32, **_):
        measured["dtype"] = np.dtype(dtype)
        return real_peak(sizes=(128,), repeats=2, dtype=dtype)

    monkeypatch.setattr(bench_train, "matmul_peak_flops", small_peak)
    config = synthetic_config(synthetic_dir, "--config.model.dtype=bfloat16")
    figures = bench_train.run(config, str(tmp_path / "train.json"), steps=2)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert measured["dtype"] == jax.numpy.bfloat16
    for key in ("examples_per_sec", "flops_per_example", "peak_flops", "fraction_of_peak",
                "examples_per_sec_median", "peak_flops_median", "fraction_of_peak_median"):
        assert np.isfinite(saved[key]) and saved[key] > 0, key
    assert saved["fraction_of_peak"] == pytest.approx(
        saved["examples_per_sec"] * saved["flops_per_example"] / saved["peak_flops"], rel=1e-9)
    assert saved["examples_per_sec"] >= saved["examples_per_sec_median"]
    assert saved["examples_per_sec"] == pytest.approx(saved["batch_size"] * 1000 / saved["step_ms"], rel=1e-9)
    # XLA's count covers at least the first dense layer of the user and ad towers, forward and
    # backward (2 FLOPs per multiply-add, x 3): a lower bound computed from the feature spec.
    from multitower_jax import features as F
    from multitower_jax.models.towers import tower_input_dim

    spec = F.parse_spec(config.features)
    first_layers = sum(tower_input_dim(s, config.model.text.dim) * 32 for s in (spec.user, spec.ad))
    assert figures["flops_per_example"] > 3 * 2 * first_layers
    # The count is of the whole model, not of one device's shard: half as many data shards
    # (each twice as big) count the same.
    config.mesh.data, config.mesh.model = 4, 2
    four_shards = bench_train.run(config, None, steps=1)
    assert figures["flops_per_example"] == pytest.approx(four_shards["flops_per_example"], rel=0.05)


def test_resumed_run_tests_the_best_parameters_and_keeps_its_early_stopping_progress(synthetic_dir, tmp_path):
    # min_delta = 1: only the first evaluation counts as a gain, so the best parameters are
    # step 4's and the run stops early at step 8 (patience 1). The resumed run restarts from
    # step 6, after the gain: it must test step 4's parameters, which it never held in memory.
    common = ["--config.train.eval_every=4", "--config.train.checkpoint_every=6", "--config.train.patience=1",
              "--config.train.min_delta=1.0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=12", *common), straight)
    loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=6", *common), resumed)
    b = loop.train(synthetic_config(synthetic_dir, "--config.train.num_steps=12", *common), resumed)
    assert a["stopped_early"] and b["stopped_early"] and a["step"] == b["step"] == 8
    assert b["best_validation_ctr_auc"] == pytest.approx(a["best_validation_ctr_auc"], abs=1e-12)
    assert b["ctr_auc"] == pytest.approx(a["ctr_auc"], abs=1e-9)
    # ... and those are step 4's parameters, not the last ones.
    t = trainer_lib.Trainer(synthetic_config(synthetic_dir, *common), resumed)
    last = t.evaluate(t.restore(t.checkpoint_manager())["params"], "test")
    assert t.best_manager().latest_step() == 4 and last["ctr_auc"] != pytest.approx(b["ctr_auc"], abs=1e-9)
    # `evaluate`, calibration, export and serving load the same best parameters; --step picks a checkpoint.
    from multitower_jax.inference import load_trained

    again = loop.evaluate_workdir(synthetic_config(synthetic_dir, *common), resumed, "test")
    assert again["params_step"] == 4 and again["step"] == 8 and again["params_from"] == "best"
    assert again["ctr_auc"] == pytest.approx(b["ctr_auc"], abs=1e-9)
    assert load_trained(resumed).step == 4 and load_trained(resumed, step=8).step == 8


def _stored_split(data_dir, split: str) -> dict:
    """The split's impressions as the synthetic world draws them (not through the pipeline)."""
    from multitower_jax import features as F
    from multitower_jax.data.synthetic import World

    config = synthetic_config(data_dir)
    world = World(config.synthetic, F.parse_spec(config.features))
    chunks = list(world.impressions(config.data.placements[0], split, int(config.synthetic.impressions[split])))
    return {k: np.concatenate([c[k] for c in chunks]) for k in ("impression_id", "user_id", "ad_id", "click", "p_click")}


def test_train_without_a_data_dir_generates_the_world_into_the_workdir(tmp_path):
    """The README's first command: `train` with config.data.dir empty writes <workdir>/data first."""
    workdir = tmp_path / "w"
    config = synthetic_config("", "--config.train.num_steps=2", "--config.train.eval_every=2",
                              "--config.synthetic.impressions.train=1024", "--config.synthetic.impressions.validation=512",
                              "--config.synthetic.impressions.test=512")
    result = loop.train(config, workdir)
    assert (workdir / "data" / "synthetic_impressions" / "search" / "1.0.0").is_dir()
    assert json.loads((workdir / "config.json").read_text())["data"]["dir"] == str(workdir / "data")
    assert result["num_examples"] == 512 and json.loads((workdir / "eval_test.json").read_text())["num_examples"] == 512
