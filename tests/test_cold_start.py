"""Cold start: id features of the synthetic world, its new users, min_count, seen / unseen AUCs."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.data import builders, pipeline, preprocess, schema, synthetic
from multitower_jax.train import evaluate
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
SIZES = dict(num_users=3000, num_ads=700, num_advertisers=60)


def make_world(features=None, **syn) -> synthetic.World:
    return synthetic.World(ml_collections.ConfigDict(dict(seed=1, **SIZES, **syn)),
                           F.parse_spec(features or F.default_features()))


def collect(world, placement: str, split: str, num: int) -> dict[str, np.ndarray]:
    chunks = list(world.impressions(placement, split, num))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def digest(rows: dict[str, np.ndarray]) -> str:
    """sha256 of the integer and text columns. Float columns are left out: numpy's exp / log may
    differ in the last bit between CPUs' SIMD paths; the integers (ids, labels, categorical values,
    timestamps, words) already change if any random stream or draw order changes."""
    h = hashlib.sha256()
    for k in sorted(rows):
        v = rows[k]
        if v.dtype == object:
            h.update(k.encode())
            h.update("\x00".join(map(str, v.tolist())).encode())
        elif v.dtype.kind in "iu":
            h.update(k.encode())
            h.update(np.ascontiguousarray(v, np.int64).tobytes())
    return h.hexdigest()[:16]


def id_features() -> ml_collections.ConfigDict:
    features = F.default_features()
    features.user.user_id = dict(type="categorical", size=1 << 12, dim=4, encoding="hash")
    features.ad.ad_id = dict(type="categorical", size=500, dim=4, encoding="ids")
    return features


# ------------------------------------------------------------------ the synthetic world

def test_default_world_is_unchanged():
    """Digests of the default world as generated before id features and new users existed."""
    world = make_world()
    assert digest(world.users_table()) == "c5646984912e6ce9"
    assert digest(world.ads_table()) == "185b7a3104870d3f"
    expected = {"search": "173aaa186db042c1", "product_page": "359c1fc7a2e62bfa",
                "category_browse": "d52bc4d479cb2790", "homepage": "fdb1b72b6e954ce5", "cart": "ac5dd0f1c1a38f8b"}
    for placement, want in expected.items():  # 5000 rows: two RNG blocks
        assert digest(collect(world, placement, "test", 5000)) == want, placement


def test_id_features_are_emitted_and_change_nothing_else():
    plain, with_ids = make_world(), make_world(id_features())
    a, b = collect(plain, "search", "train", 5000), collect(with_ids, "search", "train", 5000)
    assert set(b) - set(a) == {"user.user_id", "ad.ad_id"}
    for k in a:  # every other column, floats included, is bit-identical
        assert np.array_equal(a[k], b[k]), k
    np.testing.assert_array_equal(b["ad.ad_id"], b["ad_id"] % 500)
    salt = int.from_bytes(hashlib.blake2b(b"user_id", digest_size=8).digest(), "little", signed=True) & (2**63 - 1)
    keys = schema.mix64(b["user_id"].astype(np.uint64) ^ np.uint64(salt)).view(np.int64)
    np.testing.assert_array_equal(b["user.user_id"], keys)
    assert len(np.unique(b["user.user_id"])) == len(np.unique(b["user_id"]))  # one key per user
    users, ads = with_ids.users_table(), with_ids.ads_table()
    np.testing.assert_array_equal(users["user.user_id"][b["user_id"]], b["user.user_id"])
    np.testing.assert_array_equal(ads["ad.ad_id"], np.arange(SIZES["num_ads"]) % 500)
    features = id_features()
    features.user.user_id = dict(type="numeric")
    with pytest.raises(ValueError, match="user.user_id is generated as categorical"):
        make_world(features)
    features = id_features()
    features.ad.user_id = dict(type="categorical", size=10, dim=2)  # an ad has no user id
    with pytest.raises(ValueError, match="unknown feature ad.'user_id'"):
        make_world(features)


def test_cold_start_world_keeps_new_users_out_of_train():
    base = make_world()
    cold = make_world(id_features(), new_users=dict(num=2000, fraction=0.55))
    assert cold.num_users == 5000 and cold.first_new_user == 3000
    train = collect(cold, "search", "train", 30_000)
    base_train = collect(base, "search", "train", 30_000)
    for k in base_train:  # train is the default world's
        assert np.array_equal(train[k], base_train[k]), k
    assert train["user_id"].max() < 3000
    in_train = np.unique(train["user_id"])
    for split in ("validation", "test"):
        rows = collect(cold, "search", split, 8000)
        unseen = ~np.isin(rows["user_id"], in_train)
        assert unseen.mean() >= 0.5, (split, unseen.mean())
        new = rows["user_id"] >= 3000
        assert 0.52 <= new.mean() <= 0.58  # fraction 0.55
        assert new.sum() <= unseen.sum()
        # new users click like the others (same world), and their id features exist
        assert 0.5 < rows["click"][new].mean() / rows["click"][~new].mean() < 2.0
        np.testing.assert_array_equal(cold.users_table()["user.user_id"][rows["user_id"]], rows["user.user_id"])
    # the returning users are the default world's users
    users, base_users = cold.users_table(), base.users_table()
    for k in base_users:
        np.testing.assert_array_equal(users[k][:3000], base_users[k], err_msg=k)
    # new users follow the same demographic structure: each country's main language
    lang, country = users["user.language"], users["user.country"]
    old, new = slice(0, 3000), slice(3000, 5000)
    main = {c: np.bincount(lang[old][country[old] == c]).argmax() for c in range(3)}
    share = np.mean([lang[new][i] == main[c] for i, c in enumerate(country[new]) if c in main])
    assert share > 0.8, share


def test_new_users_config_is_validated():
    for bad, match in ((dict(num=10, fraction=1.5), "fraction"), (dict(num=-1, fraction=0.5), "num"),
                       (dict(num=10), "both"), (dict(num=10, fraction=0.5, share=1), "unknown keys")):
        with pytest.raises(ValueError, match=match):
            make_world(new_users=bad)
    assert make_world(new_users=None).num_users == SIZES["num_users"]


# ------------------------------------------------------------------ min_count

def small_spec(min_count_ids: int = 2, min_count_hash: int = 3) -> F.FeatureSpec:
    return F.parse_spec({
        "user": {"uid": dict(type="categorical", size=10, dim=2, min_count=min_count_ids),
                 "key": dict(type="categorical", size=1, dim=2, encoding="hash", min_count=min_count_hash),
                 "plain": dict(type="categorical", size=10, dim=2)},
        "ad": {"x": dict(type="numeric")},
        "context": {"search": {"hour": dict(type="categorical", size=24, dim=2)}},
    })


def raw_block(uid, key, seed: int = 0) -> dict[str, np.ndarray]:
    n = len(uid)
    rng = np.random.default_rng(seed)
    return {"user.uid": np.asarray(uid, np.int64), "user.key": np.asarray(key, np.int64),
            "user.plain": rng.integers(0, 10, n), "ad.x": rng.random(n).astype(np.float32),
            "context.hour": rng.integers(0, 24, n), "user_id": np.asarray(uid, np.int64) + 100,
            "ad_id": rng.integers(0, 5, n), "click": rng.integers(0, 2, n), "conversion": np.zeros(n, np.int64)}


def test_min_count_parsing():
    assert small_spec().user["plain"].min_count == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(F.SpecError, match="min_count"):
            F.parse_spec({"user": {"u": dict(type="categorical", size=3, dim=2, min_count=bad)},
                          "ad": {"x": dict(type="numeric")}, "context": {"search": {"x": dict(type="numeric")}}})


def test_min_count_maps_rare_values_to_the_oov_row(tmp_path):
    spec = small_spec()
    rng = np.random.default_rng(0)
    # ids 0..9 with very different train counts; two "placements" whose counts add up
    uid_a, uid_b = rng.zipf(1.6, 300) % 12, rng.zipf(1.6, 200) % 12  # 10 and 11 are out of range
    key_a = rng.zipf(1.4, 300) * 7919 - (1 << 40)
    key_b = rng.zipf(1.4, 200) * 7919 - (1 << 40)
    blocks_a = [raw_block(uid_a[:150], key_a[:150], 1), raw_block(uid_a[150:], key_a[150:], 2)]
    stats = preprocess.pool_stats([preprocess.compute_stats(blocks_a, spec, "search"),
                                   preprocess.compute_stats([raw_block(uid_b, key_b, 3)], spec, "search")])
    uid_counts = collections.Counter(np.concatenate([uid_a, uid_b]).tolist())
    key_counts = collections.Counter(np.concatenate([key_a, key_b]).tolist())
    # the pooled ad frequencies and user ids are those of all the rows
    ad_ids = np.concatenate([b["ad_id"] for b in blocks_a] + [raw_block(uid_b, key_b, 3)["ad_id"]])
    ad_counts = collections.Counter(ad_ids.tolist())
    assert stats.ad_ids.tolist() == sorted(ad_counts) and stats.ad_counts.tolist() == [ad_counts[a] for a in sorted(ad_counts)]
    assert stats.user_ids.tolist() == sorted(set((np.concatenate([uid_a, uid_b]) + 100).tolist()))
    # what every later split looks up: train values and values never seen
    test = raw_block(np.arange(-1, 14), np.concatenate([np.unique(key_a)[:10], [5, 6, 7, 8, 9]]), 4)

    def expected_uid(v):
        return v + 1 if 0 <= v < 10 and uid_counts[v] >= 2 else 0

    def expected_key(v):  # size 1: every key hashes into bucket 1, so only min_count decides
        return 1 if key_counts[v] >= 3 else 0

    want_uid = np.array([expected_uid(v) for v in test["user.uid"].tolist()])
    want_key = np.array([expected_key(v) for v in test["user.key"].tolist()])
    assert 0 < (want_uid == 0).sum() < len(want_uid) and 0 < (want_key == 0).sum() < len(want_key)
    for loaded in (False, True):
        if loaded:
            stats.save(tmp_path)
            assert (tmp_path / preprocess.KEPT_VALUES_FILE).exists()
            stats = preprocess.FeatureStats.load(tmp_path)
        pre = preprocess.Preprocessor(spec, "search", stats)
        out = pre(test)
        np.testing.assert_array_equal(out["user"]["uid"], want_uid)
        np.testing.assert_array_equal(out["user"]["key"], want_key)
        np.testing.assert_array_equal(out["user"]["plain"], test["user.plain"] + 1)  # min_count 0: untouched
        in_range_rare = sum(1 for v in test["user.uid"].tolist() if 0 <= v < 10 and uid_counts[v] < 2)
        assert pre.report()["below_min_count"]["user.uid"] == in_range_rare
    # saved: only the kept values; a larger min_count can still be applied, a smaller one cannot
    kept = stats.value_counts["user.key"]
    assert sorted(kept.values.tolist()) == sorted(v for v, c in key_counts.items() if c >= 3)
    np.testing.assert_array_equal(kept.counts, [key_counts[v] for v in kept.values.tolist()])
    preprocess.Preprocessor(small_spec(min_count_ids=5), "search", stats)
    with pytest.raises(preprocess.StatsError, match="min_count"):
        preprocess.Preprocessor(small_spec(min_count_hash=2), "search", stats)


def test_count_accumulator_merges_exactly(monkeypatch):
    monkeypatch.setattr(preprocess._CountAccumulator, "MERGE_AT", 8)  # merge often
    rng = np.random.default_rng(1)
    parts = [rng.integers(-50, 50, rng.integers(1, 40)) for _ in range(60)]
    acc = preprocess._CountAccumulator()
    for p in parts:
        acc.add(p)
    values, counts = acc.result()
    want = collections.Counter(np.concatenate(parts).tolist())
    assert values.tolist() == sorted(want) and counts.tolist() == [want[v] for v in sorted(want)]


def test_old_statistics_still_load(tmp_path):
    """Statistics written before user ids and kept values: loadable; min_count needs new ones."""
    import io

    (tmp_path / preprocess.STATS_FILE).write_text(json.dumps({"num_rows": 3, "numeric": {
        "ad.x": {"mean": 0.5, "std": 0.1, "log1p_mean": 0.4, "log1p_std": 0.1}}}))
    buffer = io.BytesIO()
    np.savez(buffer, ad_ids=np.array([1, 2]), ad_counts=np.array([2, 1]))
    (tmp_path / preprocess.AD_FREQ_FILE).write_bytes(buffer.getvalue())
    stats = preprocess.FeatureStats.load(tmp_path)
    assert stats.user_ids is None and stats.seen_users(np.array([1])) is None
    np.testing.assert_array_equal(stats.seen_ads(np.array([2, 3])), [True, False])
    preprocess.Preprocessor(small_spec(0, 0), "search", stats)
    with pytest.raises(preprocess.StatsError, match="no value counts for .user.key"):
        preprocess.Preprocessor(small_spec(), "search", stats)


def test_serving_requests_get_the_training_mapping():
    """A request's raw values go through the same transforms, so a rare id is row 0 there too."""
    from multitower_jax.serving import requests

    spec = small_spec()
    stats = preprocess.compute_stats([raw_block([3, 3, 4], [7, 7, 7])], spec, "search")
    transforms = preprocess.Preprocessor(spec, "search", stats).transforms["user"]
    uid = requests.raw_column(spec.user["uid"], [3, 4, 9], "request.user.uid")
    key = requests.raw_column(spec.user["key"], [7, 8, 7], "request.user.key")
    np.testing.assert_array_equal(transforms["uid"](uid), [4, 0, 0])
    np.testing.assert_array_equal(transforms["key"](key), [1, 0, 1])


# ------------------------------------------------------------------ seen / unseen evaluation

def test_seen_unseen_aucs_equal_sklearn_on_the_segments():
    rng = np.random.default_rng(0)
    n = 3000
    click = (rng.random(n) < 0.2).astype(np.float32)
    conversion = click * (rng.random(n) < 0.4)
    pred = {"click": click, "conversion": conversion, "pctr": rng.random(n) + 0.3 * click,
            "pcvr": rng.random(n), "pctcvr": rng.random(n) + 0.5 * conversion, "p_click": rng.random(n) + click,
            "p_convert_given_click": rng.random(n),
            "seen_user": (rng.random(n) < 0.4).astype(np.int64), "seen_ad": np.ones(n, np.int64)}
    report = evaluate.report(pred)
    for segment, rows in (("seen_user", pred["seen_user"] == 1), ("unseen_user", pred["seen_user"] == 0)):
        assert report[f"num_examples_{segment}"] == rows.sum()
        assert report[f"num_clicks_{segment}"] == click[rows].sum()
        assert report[f"ctr_auc_{segment}"] == pytest.approx(roc_auc_score(click[rows], pred["pctr"][rows]), abs=1e-12)
        assert report[f"ctcvr_auc_{segment}"] == pytest.approx(
            roc_auc_score(conversion[rows], pred["pctcvr"][rows]), abs=1e-12)
        assert report[f"oracle_ctr_auc_{segment}"] == pytest.approx(
            roc_auc_score(click[rows], pred["p_click"][rows]), abs=1e-12)
    assert report["num_examples_unseen_ad"] == 0 and report["ctr_auc_unseen_ad"] is None
    assert report["ctr_auc_seen_ad"] == pytest.approx(report["ctr_auc"])
    # a segment with clicks but no conversions: null, and the report stays valid JSON
    pred["conversion"] = np.where(pred["seen_user"] == 0, 0.0, conversion).astype(np.float32)
    report = evaluate.report(pred)
    assert report["ctcvr_auc_unseen_user"] is None and report["ctcvr_auc_seen_user"] is not None
    json.loads(json.dumps({k: v for k, v in report.items() if "_auc_" in k or k.startswith("num_")},
                          allow_nan=False))
    del pred["seen_user"], pred["seen_ad"]
    assert not any("seen" in k for k in evaluate.report(pred))  # no flags: no segments


def test_evaluation_batches_flag_rows_seen_in_train(random_dataset, tmp_path):
    config, spec, _ = random_dataset
    stats = pipeline.load_or_compute_stats(config, spec, tmp_path)
    train = list(pipeline.raw_blocks(pipeline.data_source(config, "search", "train")))
    train_users = np.concatenate([b["user_id"] for b in train])
    train_ads = np.concatenate([b["ad_id"] for b in train])
    again = preprocess.FeatureStats.load(tmp_path)  # the user ids survive the save
    np.testing.assert_array_equal(again.user_ids, np.unique(train_users))
    for split in ("train", "validation"):
        ds = pipeline.make_dataset(config, spec, stats, placement="search", split=split, train=False)
        seen = {k: [] for k in (*pipeline.ID_COLUMNS, *pipeline.SEEN_COLUMNS)}
        for batch in ds:
            valid = batch["valid"] > 0
            for k in seen:
                seen[k].append(batch[pipeline.HOST_IDS][k][valid])
        seen = {k: np.concatenate(v) for k, v in seen.items()}
        np.testing.assert_array_equal(seen["seen_user"], np.isin(seen["user_id"], train_users))
        np.testing.assert_array_equal(seen["seen_ad"], np.isin(seen["ad_id"], train_ads))
        if split == "train":
            assert seen["seen_user"].all() and seen["seen_ad"].all()
        else:
            assert 0 < seen["seen_ad"].mean() and not seen["seen_user"].any()  # random 40-bit user ids


def test_cold_start_experiment_end_to_end(tmp_path):
    """The experiment config, shrunk, through the trainer's evaluation (what eval_test.json
    holds): the seen / unseen keys agree with sklearn on the rows whose users the stored train
    split does not hold, and are JSON-safe."""
    from multitower_jax.data.generate import generate
    from multitower_jax.train import trainer as trainer_lib

    data = tmp_path / "data"
    overrides = [
        f"--config.data.dir={data}", "--config.data.block_size=64", "--config.data.batch_size=128",
        "--config.data.eval_batch_size=512", "--config.synthetic.num_users=800", "--config.synthetic.num_ads=200",
        "--config.synthetic.num_advertisers=20", "--config.synthetic.impressions.train=4000",
        "--config.synthetic.impressions.validation=500", "--config.synthetic.impressions.test=1500",
        "--config.synthetic.new_users.num=800", "--config.features.user.user_id.size=1024",
        "--config.features.ad.ad_id.size=200", *TINY_MODEL]
    config = config_lib.load(REPO / "experiments" / "cold_start.py", overrides)
    generate(config, data)
    trainer = trainer_lib.Trainer(config, tmp_path / "run")
    assert (tmp_path / "run" / preprocess.KEPT_VALUES_FILE).exists()
    report = trainer.evaluate(trainer.init_state()["params"], "test", str(tmp_path / "pred.parquet"))
    segments = {k: v for k, v in report.items() if "seen_" in k}
    json.dumps(segments, allow_nan=False)
    assert report["num_examples_unseen_user"] + report["num_examples_seen_user"] == report["num_examples"] == 1500
    assert report["num_examples_unseen_user"] >= 0.5 * 1500
    for key in ("ctcvr_auc_unseen_user", "ctr_auc_seen_ad", "num_examples_unseen_ad", "oracle_ctr_auc_unseen_user"):
        assert key in report

    table = {k: np.asarray(v) for k, v in pq.read_table(tmp_path / "pred.parquet").to_pydict().items()}
    source = builders.open_dataset(data, "synthetic", "search").as_data_source(split="train")
    train_users = np.concatenate([builders.flatten_block(source[i])["user_id"] for i in range(len(source))])
    unseen = ~np.isin(table["user_id"], train_users)
    np.testing.assert_array_equal(table["seen_user"], ~unseen)
    assert report["num_examples_unseen_user"] == unseen.sum()
    for name, rows in (("unseen_user", unseen), ("seen_user", ~unseen)):
        assert report[f"ctr_auc_{name}"] == pytest.approx(roc_auc_score(table["click"][rows], table["pctr"][rows]),
                                                          abs=1e-9)
