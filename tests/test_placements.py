"""Several placements in one run: pooled statistics, a joint step over every placement's batch,
per-placement evaluation; the shared user and ad towers learn from all of them."""

import json

import jax
import numpy as np
import optax
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.data.preprocess import compute_stats, pool_stats
from multitower_jax.train import loop, losses, sharding
from multitower_jax.train import trainer as trainer_lib
from tests.conftest import QUICKSTART, random_chunks, synthetic_config


def test_pooled_statistics_equal_the_statistics_of_the_union():
    spec = F.parse_spec(config_lib.load(QUICKSTART, []).features)
    search = list(random_chunks(spec, "search", 3000, seed=1))
    homepage = list(random_chunks(spec, "homepage", 2000, seed=2))
    pooled = pool_stats([compute_stats(search, spec, "search"), compute_stats(homepage, spec, "homepage")])

    assert pooled.num_rows == 5000
    for column in ("user.total_clicks_30d", "ad.historical_ctr", "context.pages_viewed"):
        values = np.concatenate([b[column] for b in search + homepage if column in b]).astype(np.float64)
        logs = np.log1p(np.maximum(values, 0.0))
        expected = {"mean": values.mean(), "std": values.std(), "log1p_mean": logs.mean(), "log1p_std": logs.std()}
        for key, value in expected.items():
            assert pooled.numeric[column][key] == pytest.approx(value, rel=1e-9), (column, key)
    assert "context.pages_viewed" in pooled.numeric  # search only
    ad_ids = np.concatenate([b["ad_id"] for b in search + homepage])
    ids, counts = np.unique(ad_ids, return_counts=True)
    np.testing.assert_array_equal(pooled.ad_ids, ids)
    np.testing.assert_array_equal(pooled.ad_counts, counts)
    np.testing.assert_allclose(pooled.ad_log_q(ids), np.log(counts / 5000), rtol=1e-5)


@pytest.fixture(scope="module")
def two_placements(tmp_path_factory):
    """A tiny synthetic world with two placements: search (query text) and homepage (categories)."""
    from multitower_jax.data.generate import generate

    data_dir = tmp_path_factory.mktemp("two_placements")
    generate(_config(data_dir), data_dir)
    return data_dir


def _config(data_dir, *overrides):
    return synthetic_config(data_dir, "--config.data.placements=('search','homepage')",
                            "--config.synthetic.impressions.train=6000", "--config.synthetic.impressions.validation=1000",
                            "--config.synthetic.impressions.test=1000", *overrides)


def test_one_step_trains_every_placement_and_shares_the_user_and_ad_towers(two_placements, tmp_path):
    trainer = trainer_lib.Trainer(_config(two_placements), tmp_path)
    state = trainer.init_state()
    params = jax.tree.map(np.asarray, state["params"])
    batches = {p: sharding.shard_batch(next(it), trainer.mesh) for p, it in trainer.train_iterators().items()}

    # Reference: each placement's loss and gradient on its own batch, straight from the model.
    def placement_loss(params, placement, i):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl="rbg"), 0)
        rng = rng if i == 0 else jax.random.fold_in(rng, i)
        out = trainer.model.apply({"params": params}, batches[placement], placement, train=True, rngs={"dropout": rng})
        return losses.total_loss(out, batches[placement], trainer.loss_config, trainer.mesh)[0]

    reference = jax.jit(jax.value_and_grad(placement_loss), static_argnums=(1, 2))
    refs = {p: reference(params, p, i) for i, p in enumerate(trainer.placements)}
    new_state, metrics = trainer.train_step(state, batches)

    assert float(metrics["loss"]) == pytest.approx(np.mean([float(v) for v, _ in refs.values()]), rel=1e-5)
    for p, (value, grads) in refs.items():
        assert float(metrics[f"{p}/loss"]) == pytest.approx(float(value), rel=1e-5)
        assert optax.global_norm(grads["context_towers_" + p]) > 0  # each context tower learns ...
        assert optax.global_norm(refs[[q for q in refs if q != p][0]][1]["context_towers_" + p]) == 0  # ... only from its own
    mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, refs["search"][1], refs["homepage"][1])
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(mean_grads)), rtol=1e-4)
    # The shared towers get both placements' gradients: neither one alone explains the norm.
    for p in trainer.placements:
        assert abs(float(optax.global_norm(refs[p][1]["ad_tower"])) - float(optax.global_norm(mean_grads["ad_tower"]))) > 1e-6
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new_state["params"], params)
    assert moved["context_towers_search"] and moved["context_towers_homepage"] and moved["user_tower"]


def test_joint_run_reports_every_placement_and_resumes_exactly(two_placements, tmp_path):
    common = ["--config.train.checkpoint_every=6", "--config.train.eval_every=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = loop.train(_config(two_placements, "--config.train.num_steps=10", *common), straight)
    loop.train(_config(two_placements, "--config.train.num_steps=6", *common), resumed)
    loop.train(_config(two_placements, "--config.train.num_steps=10", *common), resumed)

    saved = json.loads((straight / "eval_test.json").read_text())
    assert saved["placement"] == "search" and set(saved["placements"]) == {"search", "homepage"}
    for p, report in saved["placements"].items():
        assert report["num_examples"] == 1000 and 0 < report["ctr_auc"] < 1 and report["oracle_ctr_auc"] > 0.5, p
    assert saved["ctr_auc"] == saved["placements"]["search"]["ctr_auc"]
    assert saved["mean_ctr_auc"] == pytest.approx(np.mean([r["ctr_auc"] for r in saved["placements"].values()]))
    assert result["placements"]["homepage"]["ctr_auc"] == saved["placements"]["homepage"]["ctr_auc"]
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("homepage/ranking_loss" in line for line in lines)
    assert any("validation/homepage/ctr_auc" in line for line in lines)
    assert (straight / "checkpoints" / "10" / "data_homepage").is_dir()

    again = loop.evaluate_workdir(_config(two_placements, *common), straight, "test",
                                  str(tmp_path / "pred.parquet"))
    assert again["placements"]["homepage"]["ctr_auc"] == pytest.approx(saved["placements"]["homepage"]["ctr_auc"])
    for p in ("search", "homepage"):
        table = pq.read_table(tmp_path / f"pred.{p}.parquet")
        assert table.num_rows == 1000
        assert roc_auc_score(table["click"].to_numpy(), table["pctr"].to_numpy()) == pytest.approx(
            saved["placements"][p]["ctr_auc"], abs=1e-9)

    def final_params(workdir):
        t = trainer_lib.Trainer(_config(two_placements, *common), workdir)
        return jax.tree.leaves(t.restore(t.checkpoint_manager())["params"])

    for a, b in zip(final_params(straight), final_params(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
