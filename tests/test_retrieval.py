"""Retrieval: export, index, query rule, targeting guarantee, live updates, mismatch errors, eval."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multitower_jax import cli
from multitower_jax.data import pipeline
from multitower_jax.data.synthetic import World
from multitower_jax.inference import load_trained
from multitower_jax.retrieval import export as export_lib
from multitower_jax.retrieval import targeting as T
from multitower_jax.retrieval import evaluate as evaluate_lib
from multitower_jax.retrieval.commands import _workdir_config
from multitower_jax.retrieval.index import (AdIndex, AdStore, IndexMismatchError, OutputExistsError, StaleIndexWarning,
                                            build_from_export, query_rule, scann_builder)
from multitower_jax.retrieval.retriever import Eligibility, Retriever
from multitower_jax.retrieval.settings import RetrievalSettings
from tests.conftest import synthetic_config

SCANN = RetrievalSettings(exact_below=0, leaves_fraction=0.3, exact_eligible_below=0)


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A workdir with one checkpoint of freshly initialized parameters: retrieval needs a model,
    not a good one (every figure below is checked against a reference), and this skips compiling
    and running train steps."""
    from multitower_jax import config as config_lib
    from multitower_jax.train.trainer import Trainer

    workdir = tmp_path_factory.mktemp("retrieval_workdir")
    config = synthetic_config(synthetic_dir)
    config_lib.write_resolved(config, workdir)
    trainer = Trainer(config, workdir)
    manager = trainer.checkpoint_manager()
    trainer.save(manager, trainer.init_state(), iter(trainer.dataset("train", train=True)), force=True)
    manager.wait_until_finished()
    return load_trained(workdir)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "E"
    export_lib.export(trained, out, batch_size=128)  # 400 ads: 3 full batches and a padded one
    return out


@pytest.fixture(scope="module")
def forward(trained):
    """Reference path: every test impression through the training pipeline and the full model."""
    parts = {}
    for batch in pipeline.make_dataset(trained.config, trained.spec, trained.stats, placement="search",
                                       split="test", train=False, batch_size=512):
        out = trained.model.apply({"params": trained.params}, batch, "search")
        keep = batch["valid"] > 0
        for key, value in (("e_user", out["e_user"]), ("e_context", out["e_context"]), ("e_ad", out["e_ad"]),
                           ("ad_id", batch["ad_id"]), ("user_id", batch["user_id"]), ("click", batch["click"])):
            parts.setdefault(key, []).append(np.asarray(value)[keep])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _brute_top(q, e, k, mask=None):
    """numpy reference: exact cosine top-k row indices (ties broken by index)."""
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    if mask is not None:
        s = np.where(mask[None], s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def test_export_matches_the_model_on_pipeline_batches(trained, exported, forward):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["num_ads"] == 400 and manifest["num_users"] == 2000 and manifest["model_step"] == 0
    assert manifest["fingerprint"] == trained.fingerprint and manifest["query_rule"] == query_rule(True)
    store = AdStore.load(exported)
    assert manifest["embed_dim"] == trained.embed_dim == store.embeddings.shape[1] == 16
    # The factorized scorer's per-ad share of the first fusion layer, one file per placement.
    from multitower_jax.serving.scorer import Scorer, compute_ad_parts

    assert manifest["fusion_ad_part"] == {p: f"fusion_ad_part_{p}.npy" for p in trained.config.data.placements}
    for placement, name in manifest["fusion_ad_part"].items():
        scorer = Scorer.from_trained(trained, placement)
        want = np.zeros((400, scorer.spec.fusion_hidden[0]), np.float32)
        compute_ad_parts(scorer, np.asarray(store.embeddings), want)
        np.testing.assert_allclose(np.load(exported / name), want, atol=1e-5)
    user_ids, user_emb = np.load(exported / "user_ids.npy"), np.load(exported / "user_embeddings.npy")
    # Independent path: the TFDS test split through the training pipeline and the full forward pass.
    row = {a: i for i, a in enumerate(store.ad_ids)}
    np.testing.assert_allclose(store.embeddings[[row[a] for a in forward["ad_id"]]], forward["e_ad"], atol=2e-5)
    urow = {u: i for i, u in enumerate(user_ids)}
    np.testing.assert_allclose(user_emb[[urow[u] for u in forward["user_id"]]], forward["e_user"], atol=2e-5)
    # Bids and targeting come through from the world.
    world = World(trained.config.synthetic, trained.spec)
    np.testing.assert_array_equal(store.bid[np.argsort(store.ad_ids)], world.ad_bids)
    np.testing.assert_array_equal(store.quality, 1.0)
    rules = world.ad_targeting()
    for i in range(0, 400, 7):
        got = T.decode(store.targeting[i])
        a = int(store.ad_ids[i])
        assert got == {"countries": rules["target.countries"][a], "devices": rules["target.devices"][a],
                       "placements": rules["target.placements"][a]}


def test_export_rejects_bad_catalogues(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        export_lib.export(trained, tmp_path / "E", tmp_path / "nope.parquet", "")
    table = pq.read_table(export_lib.default_catalogue(trained.config))
    pq.write_table(table.drop(["ad.brand_id"]), tmp_path / "a.parquet")
    with pytest.raises(export_lib.CatalogueError, match=r"missing column\(s\) \['ad.brand_id'\]"):
        export_lib.export(trained, tmp_path / "E", tmp_path / "a.parquet", "")
    bids = table.column("bid").to_pylist()
    bids[5] = None
    pq.write_table(table.set_column(table.schema.get_field_index("bid"), "bid", pa.array(bids)), tmp_path / "b.parquet")
    with pytest.raises(export_lib.CatalogueError, match="row 5, column 'bid' is null"):
        export_lib.export(trained, tmp_path / "E", tmp_path / "b.parquet", "")
    places = table.column("target.placements").to_pylist()
    places[9] = ["moon"]
    pq.write_table(table.set_column(table.schema.get_field_index("target.placements"), "target.placements",
                                    pa.array(places)), tmp_path / "c.parquet")
    with pytest.raises(T.TargetingError, match="row 9.*unknown placement 'moon'"):
        export_lib.export(trained, tmp_path / "E", tmp_path / "c.parquet", "")
    assert not (tmp_path / "E").exists()  # nothing half-written


def test_query_rule_is_the_training_rule(trained, exported, tmp_path):
    from multitower_jax.train.losses import retrieval_logits

    index = build_from_export(exported, tmp_path / "I", RetrievalSettings())
    # 400 ads < exact_below: exact search, no ScaNN tree built or saved.
    assert index.mode == "exact" and index.searcher is None and index.manifest["num_leaves"] == 0
    assert not (tmp_path / "I" / "scann").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same checkpoint: no StaleIndexWarning
        retriever = Retriever.load(tmp_path / "I", trained)
    rng = np.random.default_rng(0)
    e_u, e_c = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32)
    q = retriever.query_embeddings(e_u, e_c)
    rows = np.arange(8) * 50
    ads = index.store.embeddings[rows]
    want = np.asarray(retrieval_logits(e_u, e_c, ads, np.arange(8), None, temperature=1.0,
                                       logq_correction=False, l2_normalize=True))
    got = retriever.search(q, 400)  # exact mode (400 ads < exact_below): every ad, scored
    score = {(b, r): s for b in range(8) for r, s in zip(got.rows[b], got.scores[b])}
    np.testing.assert_allclose([[score[(b, r)] for r in rows] for b in range(8)], want, atol=1e-5)
    top, _ = _brute_top(e_u + e_c, index.store.embeddings, 10)
    np.testing.assert_array_equal(got.rows[:, :10], top)


def test_index_refuses_another_model(trained, exported, tmp_path, capsys):
    build_from_export(exported, tmp_path / "I", RetrievalSettings())
    config = trained.config.copy_and_resolve_references()
    config.loss.l2_normalize = False
    with pytest.raises(IndexMismatchError, match="query_rule"):
        Retriever.load(tmp_path / "I", dataclasses.replace(trained, config=config))
    config = trained.config.copy_and_resolve_references()
    config.model.fusion_hidden = (8,)
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        Retriever.load(tmp_path / "I", dataclasses.replace(trained, config=config))
    manifest = json.loads((tmp_path / "I" / "manifest.json").read_text())
    (tmp_path / "I" / "manifest.json").write_text(json.dumps({**manifest, "embed_dim": 32}))
    code = cli.main(["retrieve-eval", "--workdir", str(trained.workdir), "--index", str(tmp_path / "I")])
    assert code == 2 and "embed_dim is 32 but the model has 16" in capsys.readouterr().err


def _structured(n, d, q, seed=0):
    from multitower_jax.bench.retrieve import structured_embeddings

    return structured_embeddings(n, q, d, seed=seed, num_topics=200)


def _index(e, bits=None, settings=SCANN):
    n = len(e)
    store = AdStore(np.arange(n, dtype=np.int64) * 3 + 1, e, np.linspace(0.5, 2, n).astype(np.float32),
                    np.ones(n, np.float32), T.untargeted(n) if bits is None else bits)
    return AdIndex.build(store, {"fingerprint": "f", "embed_dim": e.shape[1], "query_rule": query_rule(True)},
                         settings)


def test_scann_recall_against_brute_force_and_round_trip(tmp_path):
    e, q = _structured(6000, 32, 200)
    index = _index(e, settings=RetrievalSettings(exact_below=0, leaves_fraction=0.15))
    assert index.mode == "scann" and index.manifest["num_leaves"] == 77  # round(sqrt(6000))
    rows, scores = index.search(q, 10)
    top, s = _brute_top(q, e, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, top)])
    assert recall >= 0.9, recall
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), atol=1e-4)  # reordered exactly
    index.save(tmp_path / "I")
    again = AdIndex.load(tmp_path / "I")
    np.testing.assert_array_equal(again.search(q, 10)[0], rows)
    exact_rows, _ = index.exact(q, 10)
    np.testing.assert_array_equal(exact_rows, top)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_quantized_reordering_keeps_recall_round_trips_and_takes_upserts(dtype, tmp_path):
    """`retrieval.reorder_dtype`: ScaNN re-scores a bf16 / int8 copy of the vectors (its config says
    so); recall and the re-scored scores stay close to exact search, the setting survives save /
    load, and a live upsert is found first with its own vector."""
    e, q = _structured(6000, 32, 200)
    index = _index(e, settings=RetrievalSettings(exact_below=0, leaves_fraction=0.15, reorder_dtype=dtype))
    config = scann_builder(e, index.settings, 77).create_config()
    stanza = {"bfloat16": "bfloat16", "int8": "fixed_point"}[dtype]
    assert re.search(rf"exact_reordering \{{.*?{stanza} \{{\s*enabled: True", config, re.S), config
    rows, scores = index.search(q, 10)
    top, s = _brute_top(q, e, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, top)]) >= 0.9
    exact = np.take_along_axis(s, rows, 1)
    assert np.abs(scores - exact).max() < 0.02 and np.abs(scores - exact).max() > 0  # re-scored, not exact
    index.save(tmp_path / "I")
    again = AdIndex.load(tmp_path / "I")
    assert again.settings.reorder_dtype == dtype
    np.testing.assert_array_equal(again.search(q, 10)[0], rows)
    vec = (e[[123]] + 0.01).astype(np.float32)
    Retriever(again).upsert(AdStore(np.array([99_999]), vec, np.ones(1, np.float32), np.ones(1, np.float32),
                                    T.untargeted(1)))
    assert again.store.ad_ids[again.search(vec, 3)[0][0, 0]] == 99_999


def test_targeting_returns_k_eligible_ads_whenever_k_exist():
    e, q = _structured(4000, 16, 60, seed=1)
    rng = np.random.default_rng(0)
    n = len(e)
    countries = [[3] if i < 4 else sorted(set(rng.integers(0, 6, 2).tolist())) if rng.random() < 0.5 else []
                 for i in range(n)]
    countries[:4] = [[7]] * 4  # country 7: the unrestricted ads and these 4
    devices = [[2] if rng.random() < 0.3 else [] for _ in range(n)]
    places = [["cart"] if rng.random() < 0.2 else [] for _ in range(n)]
    bits = T.encode({"countries": countries, "devices": devices, "placements": places}, n)
    retriever = Retriever(_index(e, bits))
    country = rng.integers(0, 8, len(q))
    country[:5] = 7
    device = rng.integers(0, 4, len(q))
    device[5] = -1  # unknown device: only device-unrestricted ads
    got = retriever.search(q, 50, Eligibility(country=country, device=device, placement="search"))
    overlaps = []
    for b in range(len(q)):  # brute-force reference over the eligible set, straight from the lists
        ok = np.array([(not countries[i] or country[b] in countries[i]) and
                       (not devices[i] or device[b] in devices[i]) and "cart" not in places[i] for i in range(n)])
        want, _ = _brute_top(q[b:b + 1], e, min(50, ok.sum()), ok)
        assert got.valid[b].sum() == min(50, ok.sum())
        assert ok[got.rows[b][got.valid[b]]].all()
        overlaps.append(len(set(got.rows[b][got.valid[b]]) & set(want[0])) / len(want[0]))
    # ScaNN's k-means is not seeded: recall varies a little from build to build.
    assert np.mean(overlaps) >= 0.95 and min(overlaps) >= 0.75, overlaps
    # An audience with fewer than k eligible ads gets all of them, then padding.
    only = T.encode({"countries": [[9] if i % 500 == 0 else [5] for i in range(n)]}, n)
    few = Retriever(_index(e, only)).search(q[:3], 20, Eligibility(country=np.full(3, 9)))
    assert few.valid.sum(1).tolist() == [8, 8, 8] and set(few.rows[0][:8]) == set(range(0, n, 500))
    assert (few.ad_ids[:, 8:] == -1).all() and np.isneginf(few.scores[:, 8:]).all()
    # The per-candidate test agrees with the per-catalogue one.
    keys = Eligibility(country=country, device=device, placement="search").keys(len(q))
    cand = rng.integers(0, n, (len(q), 30))
    full = np.stack([T.eligible_mask(bits, key)[c] for key, c in zip(keys, cand)])
    np.testing.assert_array_equal(T.allowed(bits[cand], keys), full)
    np.testing.assert_array_equal(got.bid[got.valid], retriever.index.store.bid[got.rows[got.valid]])
    np.testing.assert_array_equal(got.embeddings[got.valid], e[got.rows[got.valid]])


def test_live_upsert_delete_and_rebuild(tmp_path):
    e, q = _structured(3000, 16, 40, seed=2)
    index = _index(e, settings=RetrievalSettings(exact_below=0, leaves_fraction=0.3, rebuild_fraction=0.002,
                                                 auto_rebuild=False))
    retriever = Retriever(index)

    def consistent():  # ScaNN datapoint i is store row i: its score is q . normalized(store row i)
        rows, scores = index.search(q, 20)
        e_n = index.store.embeddings / np.linalg.norm(index.store.embeddings, axis=1, keepdims=True)
        np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q / np.linalg.norm(q, axis=1, keepdims=True),
                                                     e_n[rows]), atol=1e-4)
        return rows

    consistent()
    # New ads next to existing ones (in the data's distribution, as a tower would place them),
    # each searched for with its own vector: cosine 1, so it must come first.
    rng = np.random.default_rng(5)
    near = lambda rows: (e[rows] + 0.01 * rng.normal(size=(len(rows), e.shape[1]))).astype(np.float32)
    new_ids, new_vecs = np.array([100_000, 100_001]), near([100, 200])
    retriever.upsert(AdStore(new_ids, new_vecs * 5, np.array([9, 9], np.float32), np.ones(2, np.float32),
                             T.untargeted(2)))
    assert len(index) == 3002
    got = retriever.search(new_vecs, 5)
    assert got.ad_ids[:, 0].tolist() == new_ids.tolist() and (got.bid[:, 0] == 9).all()
    updated_id, moved = int(index.store.ad_ids[10]), near([300])  # move ad 10 next to ad 300
    retriever.upsert(AdStore(np.array([updated_id]), moved, np.ones(1, np.float32), np.ones(1, np.float32),
                             T.untargeted(1)))
    assert retriever.search(moved, 1).ad_ids[0, 0] == updated_id and len(index) == 3002
    assert not index.needs_rebuild()  # 3 mutations: 0.1% of the 3000 it was built on
    gone = np.concatenate([new_ids[:1], index.store.ad_ids[[0, 7, 2999]]])
    retriever.delete(gone)
    assert len(index) == 2998
    rows = consistent()
    assert not np.isin(index.store.ad_ids[rows], gone).any()
    assert retriever.search(new_vecs[:1], 5).ad_ids[0, 0] != new_ids[0]
    with pytest.raises(KeyError):
        retriever.delete([123_456_789])
    assert index.needs_rebuild() and index.manifest["mutations_since_build"] == 7  # > 0.2%, not rebuilt
    index.save(tmp_path / "I")
    loaded = AdIndex.load(tmp_path / "I")
    np.testing.assert_array_equal(loaded.search(q, 20)[0], index.search(q, 20)[0])
    index.rebuild()
    assert index.manifest["mutations_since_build"] == 0 and not index.needs_rebuild()
    consistent()


def test_oracle_replay_reproduces_p_click(synthetic_dir):
    config = synthetic_config(synthetic_dir)
    from multitower_jax import features as F

    world = World(config.synthetic, F.parse_spec(config.features))
    rows = next(world.impressions("search", "test", 2000, chunk_size=2000))
    pick = np.arange(0, 2000, 13)
    logits = world.oracle_click_logits("search", "test", 2000, rows["impression_id"][pick])
    p = 1 / (1 + np.exp(-logits[np.arange(len(pick)), rows["ad_id"][pick]]))
    np.testing.assert_allclose(p, rows["p_click"][pick], rtol=1e-5)


def test_cli_export_index_retrieve_eval(trained, forward, tmp_path):
    W, E, I = str(trained.workdir), str(tmp_path / "E"), str(tmp_path / "I")
    assert cli.main(["export", "--workdir", W, "--out", E, "--users", ""]) == 0
    assert cli.main(["index", "--embeddings", E, "--out", I, "--config.retrieval.exact_below=0",
                     "--config.retrieval.leaves_fraction=1.0"]) == 0  # all leaves: plumbing, not ANN quality
    assert json.loads((tmp_path / "I" / "manifest.json").read_text())["mode"] == "scann"
    assert cli.main(["retrieve-eval", "--workdir", W, "--index", I]) == 0
    report = json.loads((tmp_path / "I" / "retrieval_eval.json").read_text())
    # Reference: every clicked test impression through the training pipeline and the full model,
    # exact cosine top-K over the exported ads in numpy.
    store = AdStore.load(tmp_path / "E")
    clicked = forward["click"] > 0
    clicked_ad = forward["ad_id"][clicked]
    top, _ = _brute_top(forward["e_user"][clicked] + forward["e_context"][clicked], store.embeddings, 400)
    assert report["num_clicked_impressions"] == report["num_clicked_in_split"] == len(clicked_ad)
    assert report["model_step"] == report["index_model_step"] == 0
    for k in (10, 100, 500):
        want = (store.ad_ids[top[:, :k]] == clicked_ad[:, None]).any(1).mean()
        assert abs(report["model_hit_rate_at_k"][str(k)] - want) <= 2 / len(clicked_ad)
        assert report["recall_at_k_vs_exact"][str(k)] >= 0.99
    assert report["model_hit_rate_at_k"]["500"] == 1.0 and report["oracle_hit_rate_at_k"]["500"] == 1.0
    assert report["oracle_hit_rate_at_k"]["10"] > 2 * report["random_hit_rate_at_k"]["10"]
    # Targeting can only drop ineligible clicked ads; with K >= #ads every eligible one comes back.
    assert report["model_hit_rate_at_k_targeted"]["100"] <= report["clicked_ad_eligible_fraction"]
    assert report["model_hit_rate_at_k_targeted"]["500"] == report["clicked_ad_eligible_fraction"] < 1.0
    # Searched 7 queries at a time (no ScaNN knobs changed), the report is the same.
    again = evaluate_lib.evaluate(trained, I, chunk=7)
    assert again == report


def test_cli_index_target_recall_tunes_on_held_out_model_queries(trained, exported, tmp_path, capsys):
    from multitower_jax.retrieval import tuning

    I = tmp_path / "I"
    assert cli.main(["index", "--embeddings", str(exported), "--out", str(I), "--target-recall", "0.9", "--k", "10",
                     "--tuning-queries", "300", "--config.retrieval.exact_below=0"]) == 0
    manifest = json.loads((I / "manifest.json").read_text())
    tuned = manifest["tuning"]
    assert tuned["target_recall"] == 0.9 and tuned["k"] == 10 and "validation" in tuned["queries"]
    assert tuned["qps_batched"] > 0 and tuned["mode"] == "scann"
    # Reference: the same validation queries (the model's Q), the other half, numpy brute force.
    q = evaluate_lib.clicked_queries(trained, "search", "validation", max_rows=300)
    _, held = tuning.split_queries(q["e_user"] + q["e_context"])
    store = AdStore.load(exported)
    want, _ = _brute_top(held, store.embeddings, 10)
    index = AdIndex.load(I)
    got = tuning.recall_per_query(index.search(held / np.linalg.norm(held, axis=1, keepdims=True), 10)[0], want)
    assert abs(got.mean() - tuned["recall_at_k_held_out"]) < 2e-3
    assert tuned["target_met"] is (tuned["recall_at_k_held_out"] >= 0.9)
    # retrieve-eval searches at the tuned settings and shows the target next to them.
    report = evaluate_lib.evaluate(trained, I, ks=(10,))
    assert report["leaves_to_search_at_k"]["10"] == tuned["leaves_to_search"]
    assert report["reorder_at_k"]["10"] == tuned["reorder"] and report["index_tuning"]["target_recall"] == 0.9
    for bad in (["--target-recall", "0"], ["--target-recall", "x"], ["--target-recall", "0.9", "--k", "0"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["index", "--embeddings", str(exported), "--out", str(tmp_path / "J"), *bad])
        assert exit_.value.code == 2
        assert ("--target-recall" if "--k" not in bad else "--k") in capsys.readouterr().err


def test_short_filtered_results_fall_back_to_exact_search():
    e, q = _structured(4000, 16, 20, seed=3)
    # Eligible: the 5 % of ads least similar to the queries' mean, so the few leaves searched
    # near each query hold almost none of them and the over-fetch comes back short.
    far = np.argsort(e @ q.mean(0))[:200]
    countries = [[1] for _ in range(len(e))]
    for i in far:
        countries[i] = []
    bits = T.encode({"countries": countries}, len(e))
    settings = RetrievalSettings(exact_below=0, leaves_to_search=1, overfetch=1.0, exact_eligible_below=0,
                                 min_reorder=1, reorder_multiplier=1)
    retriever = Retriever(_index(e, bits, settings))
    got = retriever.search(q, 30, Eligibility(country=np.full(len(q), 2)))
    assert retriever.counts["exact_fallback"] > 0
    want, _ = _brute_top(q, e, 30, np.isin(np.arange(len(e)), far))
    assert got.valid.all() and np.isin(got.rows, far).all()  # 30 eligible ads for every query
    exact = (np.sort(got.rows, 1) == np.sort(want, 1)).all(1)
    assert exact.sum() >= retriever.counts["exact_fallback"]  # the redone queries are exact


def test_auto_rebuild_after_enough_mutations():
    e, q = _structured(3000, 16, 40, seed=4)
    rng = np.random.default_rng(6)
    settings = RetrievalSettings(exact_below=3010, leaves_fraction=0.3, rebuild_fraction=0.01)
    assert settings.auto_rebuild  # the default
    index = _index(e, settings=settings)
    assert index.mode == "exact" and index.searcher is None  # 3000 < exact_below

    def new_ads(first, n):
        src = rng.integers(0, len(e), n)
        vecs = (e[src] + 0.01 * rng.normal(size=(n, e.shape[1]))).astype(np.float32)
        return AdStore(np.arange(first, first + n, dtype=np.int64), vecs, np.ones(n, np.float32),
                       np.ones(n, np.float32), T.untargeted(n))

    index.upsert(new_ads(100_000, 20))  # 3020 >= exact_below: rebuilt as a ScaNN tree
    assert index.mode == "scann" and index.searcher is not None and index.manifest["rebuilds"] == 1
    assert index.manifest["built_size"] == 3020 and index.manifest["mutations_since_build"] == 0
    for i in range(3):  # 30 mutations: 1 % of 3020, not more
        index.upsert(new_ads(200_000 + 10 * i, 10))
    assert index.manifest["rebuilds"] == 1 and index.manifest["mutations_since_build"] == 30
    gone = index.store.ad_ids[[5, 50, 500, 3030]]
    index.delete(gone)  # 34 > 30.2: drifted, rebuilt on the 3046 ads left
    assert index.manifest["rebuilds"] == 2 and index.manifest["mutations_since_build"] == 0
    assert index.manifest["built_size"] == len(index) == 3046 and index.searcher.size() == 3046
    # Search over the rebuilt index: scores are those of the store rows, near brute force, no deleted ad.
    rows, scores = index.search(q, 10)
    e_now = np.asarray(index.store.embeddings)
    top, s = _brute_top(q, e_now, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), atol=1e-4)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, top)]) >= 0.9
    assert not np.isin(index.store.ad_ids[rows], gone).any()
    probe = index.rows_of([200_005, 100_003])
    got = Retriever(index).search(e_now[probe], 1)
    assert got.ad_ids[:, 0].tolist() == [200_005, 100_003]
    # auto_rebuild=False: the same drift is only reported.
    manual = _index(e, settings=dataclasses.replace(settings, exact_below=0, auto_rebuild=False))
    manual.upsert(new_ads(300_000, 40))
    assert manual.needs_rebuild() and "rebuilds" not in manual.manifest and manual.manifest["built_size"] == 3000


def test_anisotropic_threshold_off_is_nan_for_scann():
    e, _ = _structured(500, 16, 1)

    def ah_threshold(value):  # the asymmetric-hashing stanza's (reordering has a threshold of its own)
        config = scann_builder(e, RetrievalSettings(anisotropic_threshold=value), 10).create_config()
        return re.search(r"asymmetric_hash \{.*?noise_shaping_threshold: (\S+)", config, re.S).group(1)

    assert ah_threshold(0.2) == "0.2"
    assert ah_threshold(0.0) == ah_threshold(-1.0) == "nan"  # ScaNN's "off"


def test_an_older_workdir_takes_overrides_of_newer_retrieval_keys(trained, tmp_path):
    """A workdir whose config predates a retrieval key gets it at its default, so
    `--config.retrieval.<key>=...` works on it (it was refused as an unknown key)."""
    old = json.loads((trained.workdir / "config.json").read_text())
    for key in ("spherical", "reorder_dtype"):
        old["retrieval"].pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = _workdir_config(tmp_path, ["--config.retrieval.spherical=False"])
    settings = RetrievalSettings.from_config(config)
    assert settings.spherical is False and settings.reorder_dtype == "float32"
    assert settings.soar_lambda == old["retrieval"]["soar_lambda"]  # the workdir's own values stay


def test_the_tree_is_spherical_only_for_unit_vectors():
    """`retrieval.spherical`: a cosine index (the query rule L2-normalizes) trains spherical
    k-means; a raw dot-product index, or spherical=False, keeps plain k-means."""
    e, _ = _structured(500, 16, 1)

    def partitioning(settings, unit_norm):
        config = scann_builder(e, settings, 10, unit_norm).create_config()
        return re.search(r"partitioning_type: (\S+)", config).group(1)

    assert partitioning(RetrievalSettings(), True) == "SPHERICAL"
    assert partitioning(RetrievalSettings(), False) == "GENERIC"
    assert partitioning(RetrievalSettings(spherical=False), True) == "GENERIC"


def test_recall_and_overlap_match_a_reference():
    rng = np.random.default_rng(3)

    def reference(approx, exact, ks):  # the direct definition, O(B K^2) memory
        out = {}
        for k in ks:
            a, e = approx[:, :k], exact[:, :k]
            inter = (a[:, :, None] == e[:, None, :]).any(2) & (a >= 0)
            out[str(k)] = float(inter.sum(1).mean() / max(min(k, (e >= 0).sum(1).max()), 1))
        return out

    for n, k in ((50, 20), (30, 30), (1000, 40)):
        exact = np.stack([rng.permutation(n)[:k] for _ in range(64)])
        approx = np.where(rng.random((64, k)) < 0.7, exact, rng.integers(0, n, (64, k)))
        approx = np.stack([rng.permutation(row) for row in approx])
        exact[:5, k // 2:] = -1  # short results (a small audience): -1 padding
        approx[3:8, -3:] = -1
        assert evaluate_lib.recall_vs_exact(approx, exact, [1, k // 2, k]) == reference(approx, exact, [1, k // 2, k])
        want = [sum(x in set(b[b >= 0]) for x in a[a >= 0]) for a, b in zip(approx, exact)]
        np.testing.assert_array_equal(evaluate_lib.overlap_counts(approx, exact), want)
    assert evaluate_lib.overlap_counts(np.full((2, 3), -1), np.full((2, 3), -1)).tolist() == [0, 0]


def test_clicked_queries_is_a_seeded_random_sample(trained):
    everything = evaluate_lib.clicked_queries(trained, "search", "test")
    total = len(everything["ad_id"])
    assert int(everything["num_clicked_in_split"]) == total >= 40
    sample = evaluate_lib.clicked_queries(trained, "search", "test", max_rows=15, seed=0)
    again = evaluate_lib.clicked_queries(trained, "search", "test", max_rows=15, seed=0)
    assert len(sample["ad_id"]) == 15 and int(sample["num_clicked_in_split"]) == total
    np.testing.assert_array_equal(sample["impression_id"], again["impression_id"])
    where = {int(i): n for n, i in enumerate(everything["impression_id"])}
    pos = np.array([where[int(i)] for i in sample["impression_id"]])  # KeyError: not a subset
    assert (np.diff(pos) > 0).all()  # in storage order
    assert pos.max() > total // 2 and pos.tolist() != list(range(15))  # not the first 15
    for key in ("e_user", "e_context", "ad_id", "user.country"):
        np.testing.assert_allclose(sample[key], everything[key][pos], atol=1e-5)


def test_model_step_mismatch_warns(trained, exported, tmp_path):
    build_from_export(exported, tmp_path / "I", RetrievalSettings())
    manifest = json.loads((tmp_path / "I" / "manifest.json").read_text())
    (tmp_path / "I" / "manifest.json").write_text(json.dumps({**manifest, "model_step": 7}))
    with pytest.warns(StaleIndexWarning, match="model_step 7, but the model is at step 0"):
        Retriever.load(tmp_path / "I", trained)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_out_never_replaces_what_it_should_not(trained, exported, tmp_path, capsys):
    W, E = str(trained.workdir), str(exported)
    before = sorted(p.name for p in trained.workdir.iterdir())
    # export --out W: the workdir is an input, and not an export folder.
    assert cli.main(["export", "--workdir", W, "--out", W, "--users", ""]) == 2
    err = capsys.readouterr().err
    assert f"--out {W} would replace the input" in err
    assert sorted(p.name for p in trained.workdir.iterdir()) == before
    # index --out E (== --embeddings) or a folder holding it: refused, the export intact.
    assert cli.main(["index", "--embeddings", E, "--out", E]) == 2
    assert "would replace the input" in capsys.readouterr().err
    with pytest.raises(OutputExistsError, match="would replace the input"):
        build_from_export(exported, exported.parent, RetrievalSettings())
    assert json.loads((exported / "manifest.json").read_text())["kind"] == "multitower-export"
    # A folder of something else, or an export where an index goes: refused, naming what is there.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["index", "--embeddings", E, "--out", str(other)]) == 2
    assert f"--out {other} exists and is not a `multitower-index` folder (found no manifest.json and 1 entries " \
           "(notes.txt))" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    fake_export = tmp_path / "fake_export"
    fake_export.mkdir()
    (fake_export / "manifest.json").write_text(json.dumps({"kind": "multitower-export"}))
    with pytest.raises(OutputExistsError, match="found a manifest.json of kind 'multitower-export'"):
        build_from_export(exported, fake_export, RetrievalSettings())
    with pytest.raises(OutputExistsError, match=r"not a `multitower-export` folder \(found no manifest.json") as info:
        export_lib.export(trained, other, users_path="")
    assert "notes.txt" in str(info.value)
    # An empty folder, and an older index, are replaced.
    (tmp_path / "empty").mkdir()
    build_from_export(exported, tmp_path / "empty", RetrievalSettings())
    build_from_export(exported, tmp_path / "empty", RetrievalSettings(exact_below=0, leaves_fraction=1.0))
    assert AdIndex.load(tmp_path / "empty").mode == "scann"


def test_interrupted_swap_never_loses_the_old_folder(exported, tmp_path, monkeypatch):
    from pathlib import Path

    I = tmp_path / "I"
    build_from_export(exported, I, RetrievalSettings())
    # A hard crash between the two renames: only `.I.old-<pid>` of a dead process is left.
    leftover = tmp_path / f".I.old-{_dead_pid()}"
    I.rename(leftover)
    assert len(AdIndex.load(I)) == 400 and I.is_dir() and not leftover.exists()  # put back on load
    # A leftover of a live process (a write in progress) is not touched.
    live = tmp_path / f".I.old-{os.getppid()}"
    I.rename(live)
    with pytest.raises(FileNotFoundError):
        AdIndex.load(I)
    live.rename(I)
    # An exception in the second rename puts the old folder back.
    real_rename = Path.rename

    def failing(self, target):
        if Path(target) == I and ".partial-" in self.name:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(KeyboardInterrupt):
        build_from_export(exported, I, RetrievalSettings(exact_below=0))
    monkeypatch.undo()
    assert AdIndex.load(I).mode == "exact" and sorted(p.name for p in tmp_path.iterdir()) == ["I"]
    # Writing to `out` while a dead process's old copy waits: it is restored first, then replaced.
    I.rename(leftover)
    build_from_export(exported, I, RetrievalSettings(exact_below=0, leaves_fraction=1.0))
    assert AdIndex.load(I).mode == "scann" and sorted(p.name for p in tmp_path.iterdir()) == ["I"]
