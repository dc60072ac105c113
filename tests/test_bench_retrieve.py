"""Exact search, tuning for a target recall, and `bench retrieve`'s data sets, against numpy references."""

import json
import math

import numpy as np
import pytest

from multitower_jax.bench import retrieve
from multitower_jax.retrieval import tuning
from multitower_jax.retrieval.exact import ExactSearch
from multitower_jax.retrieval.index import AdIndex, AdStore, query_rule
from multitower_jax.retrieval import targeting as T
from multitower_jax.retrieval.settings import RetrievalSettings


def _numpy_top(q, db, k):
    s = q @ db.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


@pytest.mark.parametrize("n,block,k", [(1000, 128, 10), (1000, 1000, 10), (130, 64, 100), (5, 4, 10)])
def test_exact_search_matches_numpy(n, block, k):
    rng = np.random.default_rng(n)
    db, q = rng.normal(size=(n, 12)).astype(np.float32), rng.normal(size=(37, 12)).astype(np.float32)
    exact = ExactSearch(db, block_rows=block, query_chunk=16)  # 37 queries: 3 chunks, the last one padded
    rows, scores = exact.search(q, k)
    want, s = _numpy_top(q, db, min(k, n))
    np.testing.assert_array_equal(rows, want)  # padding rows (block does not divide n) never win
    np.testing.assert_allclose(scores, np.take_along_axis(s, want, 1), rtol=1e-5, atol=1e-5)
    one_rows, _ = exact.search_one(q[3], k)
    np.testing.assert_array_equal(one_rows[0], want[3])
    np.testing.assert_array_equal(exact.search(q[3:4], k)[0], want[3:4])


def test_exact_search_rejects_an_empty_database():
    with pytest.raises(ValueError, match="non-empty"):
        ExactSearch(np.zeros((0, 4), np.float32))


def test_frontier_finds_the_smallest_leaves_per_budget():
    # A fake searcher: recall = min(1, leaves * reorder / 40_000) exactly, for 10 queries, K = 100.
    exact = np.tile(np.arange(100), (10, 1))

    def search(leaves, reorder):
        hits = min(100, leaves * reorder // 400)
        return np.where(np.arange(100) < hits, np.arange(100), -1)[None].repeat(10, 0)

    points, tried = tuning.frontier(search, exact, 1000, 100, 0.95, reorders=(50, 100, 500, 5000))
    grid = tuning.leaf_grid(1000)
    for p in points:
        want = min(g for g in grid if min(100, g * p.reorder // 400) >= 95)
        assert p.leaves_to_search == want and p.recall >= 0.95 and p.recall_se == 0
    assert [p.reorder for p in points] == [100, 500, 5000]  # 50 < K is raised to K (and not tried twice)
    assert len(tried) <= 3 * math.ceil(math.log2(len(grid)) + 1)  # bisection, not a scan
    # A floor (the index's fewest leaves for a budget) is where that budget's grid starts.
    floored, _ = tuning.frontier(search, exact, 1000, 100, 0.95, reorders=(5000,), floor=lambda r: 300)
    assert [p.leaves_to_search for p in floored] == [300]
    # Unreachable: no frontier point.
    assert tuning.frontier(lambda n, r: np.full((10, 100), -1), exact, 1000, 100, 0.95)[0] == []


def test_recall_median_ratio_and_rounds():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    approx = np.array([[4, 9, 1, 8], [6, 7, 5, 0]])
    np.testing.assert_allclose(tuning.recall_per_query(approx, exact), [0.5, 1.0])
    assert tuning.median_ratio([10, 20, 30], [1, 4, 2]) == 10.0
    calls = []
    out = tuning.time_rounds({"a": lambda: calls.append("a") or 3, "b": lambda: calls.append("b") or 5}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3}
    tune, held = tuning.split_queries(np.arange(11)[:, None])
    assert len(tune) == 6 and len(held) == 5 and sorted(np.concatenate([tune, held])[:, 0]) == list(range(11))


def test_hard_set_is_centres_plus_equal_noise():
    ads, q = retrieve.hard_embeddings(4000, 50, 64, num_centres=100)
    assert ads.shape == (4000, 64) and q.shape == (50, 64)
    np.testing.assert_allclose(np.linalg.norm(ads, axis=1), 1, atol=1e-5)
    # Equal energy: an ad's best centre direction explains about half its squared norm, so the
    # mean of its top cosine to the other ads is far below the structured set's.
    again, _ = retrieve.hard_embeddings(4000, 50, 64, num_centres=100)
    np.testing.assert_array_equal(ads, again)
    top2 = np.sort(ads[:200] @ ads.T, axis=1)[:, -2]  # the best other ad
    s_ads, _ = retrieve.structured_embeddings(4000, 50, 64, num_topics=100)
    top2_s = np.sort(s_ads[:200] @ s_ads.T, axis=1)[:, -2]
    assert 0.35 < top2.mean() < 0.75 and top2.mean() < top2_s.mean()


def test_tune_index_reaches_the_target_on_held_out_queries(tmp_path):
    ads, q = retrieve.structured_embeddings(6000, 400, 32, num_topics=200)
    n = len(ads)
    store = AdStore(np.arange(n, dtype=np.int64), ads, np.ones(n, np.float32), np.ones(n, np.float32),
                    T.untargeted(n))
    index = AdIndex.build(store, {"fingerprint": "f", "embed_dim": 32, "query_rule": query_rule(True)},
                          RetrievalSettings(exact_below=0))
    record = tuning.tune_index(index, q, 100, 0.95, rounds=1, source="test", log=None)
    assert record["mode"] == "scann" and record["target_met"] is (record["recall_at_k_held_out"] >= 0.95)
    assert index.manifest["tuning"] == record and index.manifest["settings"]["leaves_to_search"] > 0
    # The recorded held-out recall is what the index's default search gives on the held-out half,
    # against numpy brute force; and it holds after a save / load.
    _, held = tuning.split_queries(q)
    want, _ = _numpy_top(held, ads, 100)
    index.save(tmp_path / "I")
    loaded = AdIndex.load(tmp_path / "I")
    got = tuning.recall_per_query(loaded.search(held, 100)[0], want).mean()
    assert abs(got - record["recall_at_k_held_out"]) < 1e-3 and got >= 0.93
    assert loaded.settings.search_leaves(loaded.manifest["num_leaves"], 100, n) == record["leaves_to_search"]
    assert loaded.settings.reorder(100) == record["reorder"]


def test_bench_retrieve_tiny(tmp_path):
    figures = retrieve.run(None, num_ads=3000, dim=16, num_queries=200, json_path=tmp_path / "b.json",
                           single_queries=20, rounds=2, exact_single_queries=3, data="hard")
    saved = json.loads((tmp_path / "b.json").read_text())
    for key in ("build_seconds", "recall_at_100", "scann_qps_batched", "scann_qps_single", "brute_force_qps",
                "exact_qps_single", "jax_exact_qps_batched", "jax_exact_qps_single", "speedup_batched",
                "speedup_single"):
        assert saved[key] == figures[key] and saved[key] > 0
    try:
        import faiss  # noqa: F401
        assert "faiss_flat_qps_batched" in saved
    except ImportError:
        assert "faiss_flat_qps_batched" not in saved
    assert figures["num_tuning_queries"] == figures["num_queries"] == 100 and figures["num_leaves"] == 55
    assert saved["target_met"] is (figures["recall_at_100"] >= 0.95 and figures["speedup_batched"] >= 10)


def test_bench_retrieve_on_an_export(tmp_path):
    from multitower_jax.retrieval.index import MANIFEST

    ads, users = retrieve.structured_embeddings(2500, 300, 8, num_topics=50)
    folder = tmp_path / "E"
    folder.mkdir()
    np.save(folder / "embeddings.npy", ads * 3)  # raw (not normalized): the cosine rule normalizes them
    np.save(folder / "user_embeddings.npy", users)
    (folder / MANIFEST).write_text(json.dumps({"kind": "multitower-export", "num_users": 300,
                                               "query_rule": query_rule(True)}))
    got_ads, got_q, what = retrieve.exported_embeddings(str(folder), 100)
    np.testing.assert_allclose(got_ads, ads, atol=1e-5)
    assert got_q.shape == (100, 8) and "user" in what
    assert any(np.allclose(got_q[0], u, atol=1e-5) for u in users)
    with pytest.raises(FileNotFoundError, match="manifest"):
        retrieve.exported_embeddings(str(tmp_path), 10)


def test_soar_spilling_builds_and_searches_exactly_reordered():
    from multitower_jax.config import ConfigError

    ads, q = retrieve.hard_embeddings(3000, 60, 16, num_centres=50)
    n = len(ads)
    store = AdStore(np.arange(n, dtype=np.int64), ads, np.ones(n, np.float32), np.ones(n, np.float32),
                    T.untargeted(n))
    meta = {"fingerprint": "f", "embed_dim": 16, "query_rule": query_rule(True)}
    index = AdIndex.build(store, meta, RetrievalSettings(exact_below=0, soar_lambda=1.5))
    rows, scores = index.search(q, 10, leaves_to_search=index.manifest["num_leaves"], reorder=500)
    want, s = _numpy_top(q, ads, 10)
    assert tuning.recall_per_query(rows, want).mean() >= 0.99  # every leaf searched: spilled duplicates removed
    assert all(len(set(r)) == 10 for r in rows)
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), atol=1e-4)
    with pytest.raises(ConfigError, match="soar_lambda"):
        RetrievalSettings(soar_lambda=-1.0).validate()
