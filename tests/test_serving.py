"""The serving path: TTL cache, micro-batcher, request parsing, the Ranker against a brute-force
reference built from the model's unfactorized towers and numpy, and the portable scorer."""

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from multitower_jax import cli
from multitower_jax.bench.serve import random_features, random_trained
from multitower_jax.calibration import Calibration
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.index import AdIndex, AdStore, query_rule
from multitower_jax.retrieval.retriever import Retriever
from multitower_jax.retrieval.settings import RetrievalSettings
from multitower_jax.serving import requests as requests_lib
from multitower_jax.serving.batcher import MicroBatcher
from multitower_jax.serving.cache import TTLCache
from multitower_jax.serving.portable import PortableScorer
from multitower_jax.serving.portable_export import write_portable
from multitower_jax.serving.ranker import Ranker
from multitower_jax.serving.scorer import Scorer
from tests.conftest import REPO, synthetic_config

NUM_ADS, K, TOP_N = 60, 24, 5
RESTRICTED = 12  # ads 0..11 may only be shown in country 5


def test_ttl_cache_expiry_lru_and_batched_misses():
    now = [0.0]
    cache = TTLCache(ttl_s=10, max_size=3, clock=lambda: now[0])
    calls = []

    def compute(missing):
        calls.append(list(missing))
        return np.array([[10.0 * keys[i]] for i in missing])

    keys = [1, 2, 1, 3]
    np.testing.assert_array_equal(cache.get_many(keys, compute)[:, 0], [10, 20, 10, 30])
    np.testing.assert_array_equal(cache.get_many(keys, compute)[:, 0], [10, 20, 10, 30])
    assert calls == [[0, 1, 3]]  # one batched call, "a" computed once
    assert (cache.hits, cache.misses) == (4, 3)  # the second get_many hit everything
    now[0] = 5.0
    assert cache.get(2) is not None
    now[0] = 10.5  # everything was written at 0: expired (the TTL counts from the write, not the read)
    assert cache.get(1) is None and cache.get(2) is None
    for i, k in enumerate("wxyz"):
        cache.put(k, np.array([i]))
    assert len(cache) == 3 and cache.get("w") is None and cache.get("z")[0] == 3  # LRU eviction


def test_micro_batcher_groups_concurrent_callers_and_returns_each_its_own():
    seen = []

    def fn(items):
        seen.append(len(items))
        time.sleep(0.01)  # releases the GIL, as the compiled call does: callers meanwhile queue up
        if -1 in items:
            raise RuntimeError("bad item")
        return [x * x for x in items]

    n = 40
    results = [None] * n
    barrier = threading.Barrier(n)
    with MicroBatcher(fn, max_batch_size=8, max_wait_s=0.05) as batcher:
        def call(i):
            barrier.wait()
            results[i] = batcher(i)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with pytest.raises(RuntimeError, match="bad item"):
            batcher(-1)
    assert results == [i * i for i in range(n)]
    assert max(seen) == 8 and sum(seen) == n + 1 and len(seen) < n  # grouped, never above the max


def test_request_validation_names_the_field():
    ok = {"placement": "search", "user_id": 3, "context": {}}
    assert requests_lib.parse(ok, ("search",), 20).user_id == 3
    for bad, match in [({**ok, "placement": "cart"}, r"request.placement: expected one of \['search'\]"),
                       ({"placement": "search", "context": {}}, "needs a user_id or user features"),
                       ({**ok, "top_n": 50}, r"request.top_n: expected 1..20"),
                       ({**ok, "user_id": "x"}, "request.user_id: expected an integer"),
                       ({**ok, "extra": 1}, "unknown keys"),
                       ([1], "expected a JSON object")]:
        with pytest.raises(requests_lib.RequestError, match=match):
            requests_lib.parse(bad, ("search",), 20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random-weight tiny model with the context's wide logit offsets, 60 ads (12 targeted to
    country 5) in an exact index, and a Ranker."""
    tmp = tmp_path_factory.mktemp("serving")
    config = synthetic_config(tmp, "--config.serving.buckets=(16,32)", f"--config.serving.num_candidates={K}",
                              f"--config.serving.top_n={TOP_N}", "--config.serving.max_batch_size=2",
                              "--config.serving.max_wait_ms=30", "--config.model.wide=True")
    trained = random_trained(config, tmp)
    rng = np.random.default_rng(0)
    e_ad = rng.normal(size=(NUM_ADS, trained.embed_dim)).astype(np.float32)
    targeting = targeting_lib.encode({"countries": [[5]] * RESTRICTED + [None] * (NUM_ADS - RESTRICTED)}, NUM_ADS)
    store = AdStore(np.arange(1000, 1000 + NUM_ADS, dtype=np.int64), e_ad, rng.uniform(0.5, 3, NUM_ADS).astype(np.float32),
                    rng.uniform(0.5, 1.5, NUM_ADS).astype(np.float32), targeting)
    manifest = {"fingerprint": trained.fingerprint, "embed_dim": trained.embed_dim, "query_rule": query_rule(True)}
    index = AdIndex.build(store, manifest, RetrievalSettings.from_config(config))
    ranker = Ranker(trained, Retriever(index))
    ranker.warmup()
    yield ranker, store
    ranker.close()


def make_request(ranker, seed, country=3):
    rng = np.random.default_rng(seed)
    user = random_features(ranker.trained.spec.user, rng)
    user["country"] = country
    return {"placement": "search", "user_id": seed, "user": user,
            "context": random_features(ranker.trained.spec.context("search"), rng)}


def reference_answer(ranker, store, request, filtered=True):
    """Unfactorized towers + numpy brute force over the eligible ads + model.score_embeddings
    (`filtered=False`: over every ad, as if the request's country were not checked)."""
    trained = ranker.trained
    model, variables = trained.model, {"params": trained.params}
    pre = trained.preprocessor("search").transforms

    def feats(tower, spec, row):
        return {f.name: pre[tower][f.name](requests_lib.raw_column(f, [row[f.name]], "t")) for f in spec.features}

    u = np.asarray(model.apply(variables, feats("user", trained.spec.user, request["user"]), method=model.embed_user))
    c, offsets = model.apply(variables, feats("context", trained.spec.context("search"), request["context"]),
                             "search", method=model.embed_context_wide)
    c, offsets = np.asarray(c), np.asarray(offsets)
    assert np.abs(offsets).min() > 0  # the wide part is in play
    q = (u + c) / np.linalg.norm(u + c)
    sim = (store.embeddings / np.linalg.norm(store.embeddings, axis=1, keepdims=True)) @ q[0]
    eligible = (np.arange(NUM_ADS) >= RESTRICTED if filtered and request["user"]["country"] != 5
                else np.ones(NUM_ADS, bool))
    cands = np.argsort(-np.where(eligible, sim, -np.inf))[:K]
    out = model.apply(variables, np.repeat(u, K, 0), np.repeat(c, K, 0), store.embeddings[cands], "search",
                      False, np.repeat(offsets, K, 0), method=model.score_embeddings)
    ecpm = store.bid[cands] * np.asarray(out["pctr"]) * store.quality[cands] * 1000
    top = np.argsort(-ecpm)[:TOP_N]
    return store.ad_ids[cands[top]], ecpm[top], np.asarray(out["pctcvr"])[top]


def test_ranker_matches_brute_force_reference_and_caches_users(served):
    ranker, store = served
    req = make_request(ranker, 1)
    answer = ranker.rank_batch([req])[0]
    ids, ecpm, pctcvr = reference_answer(ranker, store, req)
    assert [a["ad_id"] for a in answer["ads"]] == ids.tolist()
    np.testing.assert_allclose([a["ecpm"] for a in answer["ads"]], ecpm, rtol=1e-4)
    np.testing.assert_allclose([a["pctcvr"] for a in answer["ads"]], pctcvr, rtol=1e-4)
    assert answer["num_candidates"] == K and all(a["ad_id"] >= 1000 + RESTRICTED for a in answer["ads"])
    # The same user again: served from the cache even without features; the answer is unchanged.
    hits = ranker.cache.hits
    again = ranker.rank_batch([{**{k: v for k, v in req.items() if k != "user"}, "country": 3}])[0]
    assert ranker.cache.hits == hits + 1 and again["ads"] == answer["ads"]
    with pytest.raises(requests_lib.RequestError, match="user_id 999 is not cached"):
        ranker.rank_batch([{"user_id": 999, "context": req["context"]}])
    bad = make_request(ranker, 2)
    del bad["context"]["query"]
    with pytest.raises(requests_lib.RequestError, match=r"request 0\.context\.query: missing"):
        ranker.rank_batch([bad])


def test_concurrent_requests_are_micro_batched_without_recompiling(served):
    ranker, store = served
    reqs = [make_request(ranker, 100 + i, country=5 if i % 3 == 0 else 3) for i in range(6)]
    alone = [ranker.rank_batch([r])[0] for r in reqs]
    traces = ranker.scorers["search"].trace_count
    before = len(ranker.batcher.batch_sizes)
    with ranker.batcher.paused():  # what concurrent `rank` callers do, queued at the same moment
        futures = [ranker.batcher.submit(ranker.prepare(r)) for r in reqs]
    results = [f.result(timeout=120) for f in futures]
    sizes = ranker.batcher.batch_sizes[before:]
    assert sizes == [2, 2, 2]  # grouped, never above max_batch_size
    for got, want in zip(results, alone):
        assert [a["ad_id"] for a in got["ads"]] == [a["ad_id"] for a in want["ads"]]
        np.testing.assert_allclose([a["ecpm"] for a in got["ads"]], [a["ecpm"] for a in want["ads"]], rtol=1e-5)
    assert ranker.scorers["search"].trace_count == traces  # warmup compiled every batch bucket
    country5 = results[0]["ads"]  # a country-5 user may see the restricted ads; others never do
    assert all(a["ad_id"] >= 1000 + RESTRICTED for r in results[1:3] for a in r["ads"])
    assert results[0]["num_candidates"] == K and len(country5) == TOP_N


def test_portable_scorer_runs_without_model_code_and_matches(served, tmp_path):
    ranker, _ = served
    grid = np.linspace(0, 1, 6)
    cal = Calibration.create({"ctr": {"x": grid, "y": grid ** 1.5}, "cvr": {"a": 0.8, "b": -0.2}},
                             (("ctr", "isotonic"), ("cvr", "platt"), ("ctcvr", "product")), 1.0, 1e-6)
    write_portable(ranker.trained, cal, tmp_path / "scorer")
    scorer = Scorer.from_trained(ranker.trained, "search", cal, ranker.settings)
    rng = np.random.default_rng(5)
    d = ranker.trained.embed_dim
    inputs = {"e_user": rng.normal(size=(2, d)), "e_context": rng.normal(size=(2, d)),
              "e_ad": rng.normal(size=(2, 20, d)), "bid": rng.uniform(0.5, 2, (2, 20)),
              "quality": rng.uniform(0.5, 1.5, (2, 20)), "num_valid": np.array([20, 9]),
              "offsets": rng.normal(size=(2, 2))}
    inputs = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in inputs.items()}
    np.savez(tmp_path / "inputs.npz", **inputs)
    want = scorer.score(inputs["e_user"], inputs["e_context"], inputs["e_ad"], inputs["bid"], inputs["quality"],
                        num_valid_B=inputs["num_valid"], offsets_BxL=inputs["offsets"])
    program = f"""
import sys, numpy as np
from multitower_jax.serving.portable import PortableScorer
s = PortableScorer.load({str(tmp_path / 'scorer')!r})
x = np.load({str(tmp_path / 'inputs.npz')!r})
part = s.ad_part(x["e_ad"].reshape(-1, x["e_ad"].shape[-1])).reshape(*x["e_ad"].shape[:2], -1)
out = s(x["e_user"], x["e_context"], x["e_ad"], part, x["bid"], x["quality"], x["num_valid"], offsets_BxL=x["offsets"])
small = s(x["e_user"][:1], x["e_context"][:1], x["e_ad"][:1, :6], part[:1, :6], x["bid"][:1, :6], x["quality"][:1, :6])
np.savez({str(tmp_path / 'out.npz')!r}, **out, small_top=small["top_index"])
banned = [m for m in sys.modules if m.startswith(("flax", "multitower_jax.models", "multitower_jax.config",
                                                   "ml_collections", "multitower_jax.serving.scorer"))]
assert not banned, banned
"""
    subprocess.run([sys.executable, "-c", program], check=True, cwd=REPO)
    got = np.load(tmp_path / "out.npz")
    for key in ("pctr", "pcvr", "pctcvr", "ecpm", "top_ecpm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_array_equal(got["top_index"], want["top_index"])
    assert got["small_top"].shape == (1, TOP_N)  # 6 candidates: a smaller bucket of the same artifact
    manifest = json.loads((tmp_path / "scorer" / "manifest.json").read_text())
    assert manifest["calibration"]["heads"]["ctr"]["method"] == "isotonic"
    with pytest.raises(FileNotFoundError, match="export-scorer"):
        PortableScorer.load(tmp_path / "nowhere")


def test_cli_rank_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["rank", "--workdir", str(tmp_path), "--index", str(tmp_path), "--request", "r.json"]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert cli.main(["export-scorer", "--workdir", str(tmp_path), "--out", str(tmp_path / "s"),
                     "--config.model.head=ctr"]) == 2
    assert "only --config.serving" in capsys.readouterr().err


def test_export_ad_parts_are_used_when_they_match_the_index(served, tmp_path):
    from multitower_jax.serving.scorer import compute_ad_parts, write_ad_parts

    ranker, store = served
    files = write_ad_parts(ranker.trained, store.embeddings, tmp_path)
    np.save(tmp_path / "ad_ids.npy", store.ad_ids)
    other = Ranker(ranker.trained, ranker.retriever, export_dir=tmp_path)
    try:
        got = other.ad_parts("search")
        assert isinstance(got, np.memmap) and files == {"search": "fusion_ad_part_search.npy"}
        np.testing.assert_allclose(got, np.asarray(store.embeddings) @ np.asarray(
            ranker.trained.params["fusions_search"]["mlp"]["block_0"]["dense"]["kernel"])[32:48], rtol=1e-5, atol=1e-5)
        np.save(tmp_path / "ad_ids.npy", store.ad_ids[::-1])  # the index no longer matches: recomputed
        np.testing.assert_array_equal(other.ad_parts("search"), compute_ad_parts(other.scorers["search"],
                                                                                 store.embeddings))
    finally:
        other.close()


def test_micro_batcher_per_item_errors_lone_request_wait_and_close():
    def fn(items):
        return [ValueError(f"item {x} is bad") if x < 0 else x * 10 for x in items]

    # max_wait_s far beyond the result timeouts: a call that waited for company would fail them.
    with MicroBatcher(fn, max_batch_size=2, max_wait_s=600) as batcher:
        with batcher.paused():  # queued together: one (full) batch
            good, bad = batcher.submit(3), batcher.submit(-1)
        assert good.result(timeout=30) == 30
        with pytest.raises(ValueError, match="item -1 is bad"):
            bad.result(timeout=30)
        assert batcher.batch_sizes == [2]
        # A lone request on an idle worker is dispatched at once, not after max_wait_s.
        assert batcher.submit(7).result(timeout=60) == 70
        assert batcher.batch_sizes == [2, 1] and len(batcher.wait_seconds) == 2
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)

    # close() while callers are queued: each is served or fails, none waits forever.
    release = threading.Event()

    def slow(items):
        release.wait(10)
        return list(items)

    batcher = MicroBatcher(slow, max_batch_size=1, max_wait_s=0.0)
    futures = [batcher.submit(i) for i in range(3)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    futures[2].cancel()  # a caller that gave up is skipped, not a crash of the worker
    release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert [f.result(timeout=1) for f in futures[:2]] == [0, 1] and futures[2].cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        batcher(5)


def test_micro_batcher_lone_caller_answers_on_its_own_thread_and_busy_callers_queue():
    threads, release, started = [], threading.Event(), threading.Event()

    def fn(items):
        threads.append(threading.current_thread())
        if items == [0]:  # the first call holds the batcher busy until released
            started.set()
            release.wait(30)
        return [ValueError("bad") if x < 0 else x + 100 for x in items]

    with MicroBatcher(fn, max_batch_size=4, max_wait_s=0.0) as batcher:
        assert batcher(1) == 101 and threads == [threading.current_thread()]  # no hand-off
        with pytest.raises(ValueError, match="bad"):
            batcher(-1)
        busy = threading.Thread(target=batcher, args=(0,))
        busy.start()
        assert started.wait(30)
        # Someone's batch is running: these callers queue and are answered together, by the worker.
        results, submitted, submit = {}, [], batcher.submit
        batcher.submit = lambda item: (submitted.append(item), submit(item))[1]
        callers = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher(i))) for i in (5, 6)]
        for t in callers:
            t.start()
        while len(submitted) < 2:
            time.sleep(0.01)
        release.set()
        busy.join(30)
        for t in callers:
            t.join(30)
        assert results == {5: 105, 6: 106}
        assert batcher.batch_sizes == [1, 1, 1, 2] and threads[-1] is batcher._worker


def test_micro_batcher_waits_to_fill_only_when_others_are_queued():
    with MicroBatcher(lambda items: list(items), max_batch_size=3, max_wait_s=600) as batcher:
        with batcher.paused():
            first = [batcher.submit(i) for i in range(2)]
        # Two were queued together (load): the worker waits (up to max_wait_s) to fill the batch,
        # so a third arriving later still joins it.
        third = batcher.submit(2)
        assert [f.result(timeout=60) for f in (*first, third)] == [0, 1, 2]
        assert batcher.batch_sizes == [3]
        with batcher.paused():  # full batches go at once, without waiting
            rest = [batcher.submit(i) for i in range(3, 9)]
        assert [f.result(timeout=60) for f in rest] == [3, 4, 5, 6, 7, 8]
        assert batcher.batch_sizes[1:] == [3, 3]
    # close() while paused does not leave the worker (or close) waiting.
    batcher = MicroBatcher(lambda items: list(items), max_batch_size=2, max_wait_s=600)
    with batcher.paused():
        pending = batcher.submit(1)
        closer = threading.Thread(target=batcher.close)
        closer.start()
        closer.join(30)
        assert not closer.is_alive()
    assert pending.result(timeout=30) == 1


def test_cache_counts_get_lookups():
    cache = TTLCache(ttl_s=10, max_size=4)
    assert cache.get("a") is None
    cache.put("a", ("any", "value"))
    assert cache.get("a") == ("any", "value") and (cache.hits, cache.misses) == (1, 1)


def test_anonymous_requests_are_never_served_another_users_embedding(served):
    ranker, store = served
    size = len(ranker.cache)
    answers = []
    for seed in (301, 302):  # one after the other: each alone, at batch position 0
        req = make_request(ranker, seed)
        del req["user_id"]
        answer = ranker.rank(req)
        ids, ecpm, _ = reference_answer(ranker, store, req)
        assert [a["ad_id"] for a in answer["ads"]] == ids.tolist()
        np.testing.assert_allclose([a["ecpm"] for a in answer["ads"]], ecpm, rtol=1e-4)
        answers.append(answer)
    assert answers[0]["ads"] != answers[1]["ads"] and len(ranker.cache) == size  # nothing cached


def _bad_requests(ranker):
    missing = make_request(ranker, 402)
    del missing["context"]["query"]
    wrong_type = make_request(ranker, 403)
    wrong_type["context"]["hour_of_day"] = "noon"
    unknown = {"placement": "search", "user_id": 123456, "context": make_request(ranker, 404)["context"]}
    return [(missing, r"request\.context\.query: missing"),
            (wrong_type, r"request\.context\.hour_of_day: expected an integer"),
            (unknown, r"request\.user_id: user_id 123456 is not cached")]


def test_a_bad_request_fails_alone_and_names_its_field(served):
    ranker, _ = served
    good = make_request(ranker, 401)
    want = ranker.rank_batch([good])[0]
    for bad, match in _bad_requests(ranker):
        results, errors = {}, {}
        barrier = threading.Barrier(2)

        def call(name, req):
            barrier.wait()
            try:
                results[name] = ranker.rank(req)
            except requests_lib.RequestError as e:
                errors[name] = e

        threads = [threading.Thread(target=call, args=a) for a in (("good", good), ("bad", bad))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["good"]["ads"] == want["ads"] and "good" not in errors
        assert "bad" not in results
        with pytest.raises(requests_lib.RequestError, match=match):
            raise errors["bad"]
    # Inside one batch call too: the bad request's slot holds its error, the good one its answer.
    before = len(ranker.batcher.batch_sizes)
    with ranker.batcher.paused():
        futures = [ranker.batcher.submit(good), *(ranker.batcher.submit(bad) for bad, _ in _bad_requests(ranker)[:1])]
    assert futures[0].result(timeout=60)["ads"] == want["ads"]
    with pytest.raises(requests_lib.RequestError, match=r"context\.query: missing"):
        futures[1].result(timeout=60)
    assert ranker.batcher.batch_sizes[before:] == [2]  # they did share a batch


def test_request_file_errors_name_the_file(served, tmp_path):
    ranker, _ = served
    req = make_request(ranker, 405)
    del req["context"]["query"]
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req))
    request = requests_lib.load(path, ranker.placements, TOP_N)
    with pytest.raises(requests_lib.RequestError, match=rf"{path}\.context\.query: missing"):
        ranker.rank(request)


def _unfiltered_would_show_restricted(ranker, store, seeds):
    """A user (country 3) whose unfiltered answer contains ads only country 5 may see."""
    for seed in seeds:
        req = make_request(ranker, seed, country=3)
        ids, _, _ = reference_answer(ranker, store, req, filtered=False)
        if (ids < 1000 + RESTRICTED).any():
            return req
    raise AssertionError("no seed whose unfiltered answer holds a restricted ad")


def test_user_id_only_requests_keep_the_users_targeting(served, tmp_path):
    """Country-5-only ads never reach a country-3 user who sends only a user_id: the country comes
    from the cache entry (computed from the request's features) or from the users catalogue."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from multitower_jax.serving.ranker import UserCatalogue

    ranker, store = served
    # Cached from an earlier request that carried the features.
    req = _unfiltered_would_show_restricted(ranker, store, range(500, 560))
    want_ids, want_ecpm, _ = reference_answer(ranker, store, req)
    full = ranker.rank(req)
    assert [a["ad_id"] for a in full["ads"]] == want_ids.tolist()
    by_id = ranker.rank({"placement": "search", "user_id": req["user_id"], "context": req["context"]})
    assert by_id["ads"] == full["ads"] and all(a["ad_id"] >= 1000 + RESTRICTED for a in by_id["ads"])
    # An explicit country in the request still wins (country 5 may see everything).
    as5 = ranker.rank({"placement": "search", "user_id": req["user_id"], "context": req["context"], "country": 5})
    assert any(a["ad_id"] < 1000 + RESTRICTED for a in as5["ads"])

    # Not cached: the embedding and the country come from the users catalogue.
    req = _unfiltered_would_show_restricted(ranker, store, range(600, 660))
    columns = {"user_id": pa.array([req["user_id"]], pa.int64())}
    for f in ranker.trained.spec.user.features:
        col = requests_lib.raw_column(f, [req["user"][f.name]], "t")
        columns[f"user.{f.name}"] = pa.array(col.astype(np.float32).tolist() if col.dtype == np.float16
                                             else col.tolist())
    pq.write_table(pa.table(columns), tmp_path / "users.parquet")
    saved_users = ranker.users
    ranker.users = UserCatalogue(tmp_path / "users.parquet", ranker.trained.spec.user)
    try:
        answer = ranker.rank({"placement": "search", "user_id": req["user_id"], "context": req["context"]})
    finally:
        ranker.users = saved_users
    want_ids, want_ecpm, _ = reference_answer(ranker, store, req)
    assert [a["ad_id"] for a in answer["ads"]] == want_ids.tolist()
    np.testing.assert_allclose([a["ecpm"] for a in answer["ads"]], want_ecpm, rtol=1e-4)
    assert ranker.cache.get(req["user_id"]).country == 3  # cached with its targeting keys


# -- benchmarks and the CLI on tiny inputs ------------------------------------------------------

def _finite_positive(figures, keys):
    for key in keys:
        assert np.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])


def test_bench_score_tiny_writes_json_with_a_realistic_calibration(tmp_path):
    from multitower_jax.bench import score as bench_score

    config = synthetic_config("/nonexistent", "--config.serving.max_batch_size=2")
    figures = bench_score.run(config, num_requests=12, json_path=str(tmp_path / "score.json"), clients=2,
                              num_candidates=100)
    saved = json.loads((tmp_path / "score.json").read_text())
    _finite_positive(saved, ("p50_ms", "p99_ms", "microbatch_requests_per_sec", "flops_per_request"))
    assert saved["p99_ms"] >= saved["p50_ms"] and saved["p50_ms"] == figures["p50_ms"]
    assert saved["candidates"] == 100 and saved["candidate_bucket"] == 128
    # timed with the default calibrators: an isotonic CTR map of realistic size, temperature CVR
    assert saved["calibration"]["cvr"] == "temperature" and saved["calibration"]["ctcvr"] == "product"
    thresholds = int(saved["calibration"]["ctr"].split("(")[1].split()[0])
    assert saved["calibration"]["ctr"].startswith("isotonic") and thresholds >= 20


def test_bench_calibration_is_the_configs_methods_fitted():
    from multitower_jax.bench.score import bench_calibration

    cal = bench_calibration(synthetic_config("/nonexistent"))
    assert cal.methods == (("ctr", "isotonic"), ("cvr", "temperature"), ("ctcvr", "product"))
    assert float(cal.params["cvr"]["temperature"]) == pytest.approx(1.6, abs=0.2)  # the model's over-confidence
    p = np.linspace(0.001, 0.2, 50, dtype=np.float32)
    assert not np.allclose(np.asarray(cal.apply("ctr", p)), p, atol=1e-3)  # not an identity
    cal = bench_calibration(synthetic_config("/nonexistent", "--config.calibration.ctr=platt"))
    assert cal.method("ctr") == "platt"


def test_bench_serve_tiny_writes_json(tmp_path):
    from multitower_jax.bench import serve as bench_serve

    config = synthetic_config(tmp_path, "--config.serving.max_batch_size=2", "--config.serving.buckets=(64,)",
                              "--config.serving.num_candidates=64", "--config.serving.top_n=10")
    figures = bench_serve.run(config, num_ads=1500, num_requests=10, json_path=str(tmp_path / "serve.json"),
                              num_users=6, clients=2)
    saved = json.loads((tmp_path / "serve.json").read_text())
    _finite_positive(saved, ("p50_ms", "p99_ms", "concurrent_requests_per_sec", "score_ms_mean"))
    assert saved["p99_ms"] >= saved["p50_ms"] and saved == json.loads(json.dumps(figures))
    assert (saved["num_ads"], saved["K"], saved["top_n"]) == (1500, 64, 10)
    assert saved["calibration"]["ctr"].startswith("isotonic") and saved["calibration"]["cvr"] == "temperature"


@pytest.fixture(scope="module")
def tiny_workdir(synthetic_dir, tmp_path_factory):
    """A workdir with a checkpoint of random weights (drawn on the host, no init compile), a fitted
    calibration.json, and its ads exported and indexed through the CLI: what `rank` and
    `export-scorer` read."""
    import jax
    import orbax.checkpoint as ocp

    from multitower_jax import calibration as calibration_lib
    from multitower_jax import config as config_lib
    from multitower_jax.bench.score import bench_calibration
    from multitower_jax.bench.serve import random_params
    from multitower_jax.inference import fingerprint
    from multitower_jax.train.trainer import Trainer

    workdir = tmp_path_factory.mktemp("serving_workdir")
    config = synthetic_config(synthetic_dir)
    config_lib.write_resolved(config, workdir)
    trainer = Trainer(config, workdir)
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), trainer.abstract_state)
    state["params"] = random_params(trainer.model)
    manager = trainer.checkpoint_manager()
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    calibration_lib.save(bench_calibration(config), workdir, fingerprint=fingerprint(config), step=0)
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(workdir / "E"), "--users", ""]) == 0
    assert cli.main(["index", "--embeddings", str(workdir / "E"), "--out", str(workdir / "I")]) == 0
    return workdir


def test_cli_export_scorer_and_rank_on_a_tiny_workdir(tiny_workdir, synthetic_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from multitower_jax.retrieval.index import AdStore

    W = str(tiny_workdir)
    before = sorted(p.name for p in tiny_workdir.iterdir())
    assert cli.main(["export-scorer", "--workdir", W, "--out", W]) == 2  # never replaces the workdir
    assert sorted(p.name for p in tiny_workdir.iterdir()) == before
    assert cli.main(["export-scorer", "--workdir", W, "--out", str(tiny_workdir / "E")]) == 2  # nor an export
    assert cli.main(["export-scorer", "--workdir", W, "--out", str(tmp_path / "S")]) == 0
    manifest = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert manifest["calibration"]["heads"]["ctr"]["method"] == "isotonic"
    assert len(manifest["calibration"]["heads"]["ctr"]["x"]) >= 20
    assert (tmp_path / "S" / "score_search.jaxexport").is_file()

    # A user_id-only request (as in the README): the features and the targeting keys come from
    # the users catalogue. The user: the one most ads may not be shown to.
    users = pq.read_table(synthetic_dir / "catalogue" / "users.parquet",
                          columns=["user_id", "user.country", "user.device_type"]).to_pydict()
    store = AdStore.load(tiny_workdir / "E")
    code = targeting_lib.F.PLACEMENTS.index("search")
    masks = [targeting_lib.eligible_mask(store.targeting, (c, d, code))
             for c, d in zip(users["user.country"][:200], users["user.device_type"][:200])]
    u = int(np.argmin([m.sum() for m in masks]))
    assert (~masks[u]).sum() >= 5  # ads this user must never see
    context = random_features_for_context()
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"placement": "search", "user_id": users["user_id"][u], "context": context}))
    capsys.readouterr()
    assert cli.main(["rank", "--workdir", W, "--index", str(tiny_workdir / "I"), "--request", str(request),
                     "--config.serving.top_n=20"]) == 0
    answer = json.loads(capsys.readouterr().out)
    ads = answer["ads"]
    assert answer["user_id"] == users["user_id"][u] and len(ads) == 20
    assert [a["ecpm"] for a in ads] == sorted((a["ecpm"] for a in ads), reverse=True)
    assert all(0 < a["pctr"] < 1 and 0 < a["pcvr"] < 1 for a in ads)
    np.testing.assert_allclose([a["ecpm"] for a in ads], [a["bid"] * a["pctr"] * a["quality"] * 1000 for a in ads],
                               rtol=1e-4)
    row = {int(a): i for i, a in enumerate(store.ad_ids)}
    assert all(masks[u][row[a["ad_id"]]] for a in ads)  # targeting from the catalogue row
    assert answer["num_candidates"] == int(masks[u].sum())  # K = 500 > 400 ads: every eligible one


def random_features_for_context():
    from multitower_jax import features as F

    config = synthetic_config("/nonexistent")
    return random_features(F.parse_spec(config.features).context("search"), np.random.default_rng(7))
