"""The synthetic world: contract, determinism, label honesty, realistic rates and difficulty."""

from __future__ import annotations

import time

import ml_collections
import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from multitower_jax import features as F
from multitower_jax.data import schema, synthetic

# Big enough for stable AUCs (about 5k test clicks), small enough to build in well under a second.
SIZES = dict(num_users=5000, num_ads=1500, num_advertisers=150)
N_TRAIN, N_TEST = 150_000, 50_000


def make_world(seed: int = 0, features: ml_collections.ConfigDict | None = None, **sizes) -> synthetic.World:
    syn = ml_collections.ConfigDict(dict(seed=seed, **(sizes or SIZES)))
    return synthetic.World(syn, F.parse_spec(features or F.default_features()))


def collect(world: synthetic.World, placement: str, split: str, num: int, chunk_size: int = 65536) -> dict:
    chunks = list(world.impressions(placement, split, num, chunk_size))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


@pytest.fixture(scope="module")
def world() -> synthetic.World:
    return make_world()


@pytest.fixture(scope="module")
def search(world) -> dict[str, dict]:
    return {"train": collect(world, "search", "train", N_TRAIN), "test": collect(world, "search", "test", N_TEST)}


@pytest.mark.parametrize("placement", F.PLACEMENTS)
def test_column_contract_and_rates(world, placement):
    rows = collect(world, placement, "validation", 40_000, chunk_size=16_000)
    expected = schema.raw_columns(world.spec, placement, with_oracle=True)
    assert list(rows) == list(expected)
    for name, (dtype, shape) in expected.items():
        assert rows[name].dtype == dtype, name
        assert rows[name].shape == (40_000, *shape), name
        if dtype == np.float32:
            assert np.isfinite(rows[name]).all(), name
    spec = world.spec.columns(placement)
    for name, f in spec.items():
        col = rows[name]
        if isinstance(f, F.Numeric):
            assert (col >= 0).all(), name  # counts, prices, ratios: log1p-safe
        elif isinstance(f, F.Categorical) and f.encoding == "ids":
            assert col.min() >= 0 and col.max() < f.size, name
        elif isinstance(f, F.MultiHot):
            assert ((col == -1) | ((col >= 0) & (col < f.size))).all(), name
        elif isinstance(f, F.Text):
            assert all(isinstance(t, str) and t for t in col[:1000]), name
    click, conv = rows["click"], rows["conversion"]
    assert set(np.unique(click)) <= {0, 1} and set(np.unique(conv)) <= {0, 1}
    assert (conv <= click).all()  # conversions only after clicks
    assert 0.01 <= click.mean() <= 0.05, (placement, click.mean())
    assert 0.05 <= conv.sum() / click.sum() <= 0.15, (placement, conv.sum() / click.sum())
    assert len(np.unique(rows["impression_id"])) == len(click)


def test_deterministic_for_a_seed_and_independent_of_chunk_size():
    a = collect(make_world(seed=3), "cart", "train", 10_000, chunk_size=3000)
    b = collect(make_world(seed=3), "cart", "train", 10_000, chunk_size=65536)
    c = collect(make_world(seed=4), "cart", "train", 10_000)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["user.interest_vector"], c["user.interest_vector"])
    assert not np.array_equal(a["ad_id"], c["ad_id"])
    tables = make_world(seed=3).ads_table(), make_world(seed=3).ads_table()
    assert all(np.array_equal(tables[0][k], tables[1][k]) for k in tables[0])


def test_entity_columns_equal_their_table_rows(world):
    rows = collect(world, "homepage", "train", 5000)
    users, ads = world.users_table(), world.ads_table()
    assert len(users["user_id"]) == world.num_users and len(ads["ad_id"]) == world.num_ads
    assert {k for k in users if k != "user_id"} == {f"user.{n}" for n in world.spec.user.names}
    for name, col in users.items():
        assert np.array_equal(rows[name] if name != "user_id" else rows["user_id"], col[rows["user_id"]]), name
    for name, col in ads.items():
        assert np.array_equal(rows[name] if name != "ad_id" else rows["ad_id"], col[rows["ad_id"]]), name
    assert world.ad_bids.shape == (world.num_ads,) and world.ad_bids.dtype == np.float32
    assert (world.ad_bids > 0).all()


def test_time_splits_are_ordered_and_ids_unique(world):
    splits = {s: collect(world, "search", s, 9000) for s in synthetic.SPLITS}
    ts = [splits[s]["timestamp"] for s in synthetic.SPLITS]
    assert ts[0].max() < ts[1].min() and ts[1].max() < ts[2].min()
    assert all((np.diff(t) >= 0).all() for t in ts)
    hour = splits["train"]["context.hour_of_day"]
    assert np.array_equal(hour, (ts[0] // 3600) % 24)  # the context agrees with the clock
    other = collect(world, "cart", "train", 9000)["impression_id"]
    ids = np.concatenate([splits[s]["impression_id"] for s in synthetic.SPLITS] + [other])
    assert len(np.unique(ids)) == len(ids)


def test_oracle_columns_are_the_label_probabilities(search):
    rows = search["train"]
    for p, y in ((rows["p_click"], rows["click"]),
                 (rows["p_convert_given_click"][rows["click"] == 1], rows["conversion"][rows["click"] == 1])):
        edges = np.quantile(p, np.linspace(0, 1, 9)[1:-1])
        bucket = np.searchsorted(edges, p)
        for b in range(8):
            pb, yb = p[bucket == b].astype(np.float64), y[bucket == b]
            se = np.sqrt((pb * (1 - pb)).sum()) / len(pb)
            assert abs(yb.mean() - pb.mean()) < 4.5 * se, (b, yb.mean(), pb.mean())


def test_oracle_auc_is_realistic_and_beats_an_ad_only_predictor(search):
    train, test = search["train"], search["test"]
    oracle = roc_auc_score(test["click"], test["p_click"])
    assert 0.72 <= oracle <= 0.85, oracle
    # Each ad's smoothed empirical click rate on train (the prior for unseen ads), scored on test.
    n = np.bincount(train["ad_id"], minlength=1500)
    clicks = np.bincount(train["ad_id"], train["click"], minlength=1500)
    prior = train["click"].mean()
    ad_only = roc_auc_score(test["click"], ((clicks + 20 * prior) / (n + 20))[test["ad_id"]])
    assert oracle - ad_only >= 0.05, (oracle, ad_only)


def test_historical_ctr_follows_true_quality(world, search):
    rows = search["train"]
    shown = np.bincount(rows["ad_id"], minlength=world.num_ads)
    true_ctr = np.bincount(rows["ad_id"], rows["p_click"], minlength=world.num_ads) / np.maximum(shown, 1)
    historical = world.ads_table()["ad.historical_ctr"]
    often = shown >= 100
    assert spearmanr(historical[often], true_ctr[often]).statistic > 0.3


def test_ad_popularity_is_long_tailed(search):
    n = np.sort(np.bincount(search["train"]["ad_id"], minlength=1500))[::-1]
    assert n[:150].sum() > 0.5 * n.sum()  # the top 10% of ads get most impressions
    assert n[750:].sum() < 0.1 * n.sum()  # the bottom half gets little


def test_query_text_signals_the_ad(search):
    rows = search["train"]
    shared = np.array([bool(set(q.split()) & set(d.split()))
                       for q, d in zip(rows["context.query"][:40_000], rows["ad.description"][:40_000])])
    click = rows["click"][:40_000]
    assert click[shared].mean() > 1.5 * click[~shared].mean()


def test_dense_features_are_noisy_views_of_latents(world):
    users = world.users_table()["user.interest_vector"].astype(np.float64)
    taste = world._u_taste
    x = np.c_[users, np.ones(len(users))]
    fit = np.linalg.solve(x.T @ x + 1e-6 * np.eye(x.shape[1]), x.T @ taste)  # least squares
    r2 = 1 - ((x @ fit - taste) ** 2).sum() / ((taste - taste.mean(0)) ** 2).sum()
    assert 0.3 < r2 < 0.95, r2  # informative, not a copy of the latent
    # Image embeddings: topic centroids from half of the ads classify the other half well, not perfectly.
    image, topic = world.ads_table()["ad.image_embedding"], world._ad_topic
    fit_half = np.arange(world.num_ads) % 2 == 0
    centroids = np.zeros((world.num_topics, image.shape[1]))
    np.add.at(centroids, topic[fit_half], image[fit_half])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-9
    accuracy = (np.argmax(image[~fit_half] @ centroids.T, 1) == topic[~fit_half]).mean()
    assert 0.5 < accuracy < 0.99, accuracy


def test_spec_changes_are_followed_and_unknown_features_rejected():
    features = F.default_features()
    features.user.interest_vector.dim = 24
    features.user.country = dict(type="categorical", size=200, dim=8, encoding="hash")
    features.context.category_browse.filters.max_items = 3
    features.ad.ad_age_days = None  # dropped features are simply not produced
    world = make_world(features=features, num_users=300, num_ads=200, num_advertisers=20)
    rows = collect(world, "category_browse", "test", 500)
    assert rows["user.interest_vector"].shape == (500, 24)
    assert rows["context.filters"].shape == (500, 3)
    assert rows["user.country"].dtype == np.int64 and np.abs(rows["user.country"]).max() > 10_000
    assert "ad.ad_age_days" not in rows and "ad.ad_age_days" not in world.ads_table()
    features.user.favourite_color = dict(type="categorical", size=5, dim=4)
    with pytest.raises(ValueError, match="favourite_color"):
        make_world(features=features, num_users=300, num_ads=200, num_advertisers=20)
    with pytest.raises(ValueError, match="split"):
        world.impressions("search", "dev", 10)


def test_generation_speed(world):
    start = time.perf_counter()
    n = sum(len(c["click"]) for c in world.impressions("search", "train", 100_000))
    rate = n / (time.perf_counter() - start)
    assert rate >= 50_000, f"{rate:.0f} impressions/s"


def test_ceiling_bench_removes_latent_terms_from_the_oracle():
    from multitower_jax import config as config_lib
    from multitower_jax.bench import ceiling
    from tests.conftest import QUICKSTART

    config = config_lib.load(QUICKSTART, [f"--config.synthetic.{k}={v}" for k, v in SIZES.items()]
                             + [f"--config.synthetic.impressions.train={N_TRAIN}"])
    figures = ceiling.run(config, num=N_TEST)
    world = make_world(**SIZES)
    test = collect(world, "search", "test", N_TEST)
    assert figures["oracle_ctr_auc"] == pytest.approx(roc_auc_score(test["click"], test["p_click"]), abs=1e-9)
    terms = ("ad's own quality", "user click bias", "user x ad affinity")
    for term in terms:  # each latent term carries signal, and they add up
        assert figures["without all three"] < figures[f"without {term}"] < figures["oracle_ctr_auc"]
    # The semi-oracle infers the user bias and own quality from the train split: better than
    # dropping the own quality outright, worse than knowing both; the affinity it is handed counts.
    semi, semi_without_affinity = figures["semi-oracle (bias and own quality inferred)"], figures["semi-oracle, without affinity"]
    assert figures["without ad's own quality"] < semi < figures["oracle_ctr_auc"]
    assert figures["without all three"] < semi_without_affinity < semi - 0.01
    conversion = test["conversion"]
    assert figures["oracle_ctcvr_auc"] == pytest.approx(
        roc_auc_score(conversion, test["p_click"].astype(np.float64) * test["p_convert_given_click"]), abs=1e-9)
    assert (figures["ctcvr: semi-oracle x pCVR without its latents"] < figures["ctcvr: semi-oracle x exact pCVR"]
            < figures["oracle_ctcvr_auc"])


def test_ceiling_posteriors_match_direct_integration():
    """The grid likelihoods of the semi-oracle against scipy's distributions and quadrature."""
    from scipy import integrate, stats

    from multitower_jax.bench import ceiling

    world = make_world(**SIZES)
    train = collect(world, "search", "train", 20_000)
    b_grid = np.array([-0.4, 0.0, 0.3])
    loglik = ceiling._user_feature_loglik(world, train, b_grid)
    clicks = world.users_table()["user.total_clicks_30d"]
    count = np.bincount(train["user_id"], minlength=world.num_users)
    rate = 20_000 / (world.num_users * np.exp(0.5))
    for u in (int(np.argmax(count)), int(np.argmax(clicks)), 7):
        def joint(log_a, b, u=u):  # P(count, clicks | activity, bias) p(log activity), unnormalized like the grid
            a = np.exp(log_a)
            return (stats.poisson.pmf(count[u], rate * a) * stats.poisson.pmf(clicks[u], 8 * a * np.exp(b))
                    * np.exp(-0.5 * log_a**2))
        direct = np.log([integrate.quad(joint, -6, 6, args=(b,), points=[0.0, 3.0], limit=200, epsabs=0)[0] for b in b_grid])
        np.testing.assert_allclose(loglik[u] - loglik[u, 1], direct - direct[1], atol=2e-3)

    own = ceiling.own_quality(world)
    q_grid = np.array([-0.5, 0.2])
    history = ceiling._ad_history_loglik(world, own, q_grid)
    ads = world.ads_table()
    imps = ads["ad.total_impressions"].astype(np.int64)
    hist_clicks = np.round(ads["ad.historical_ctr"].astype(np.float64) * (imps + 30) - 0.9).astype(np.int64)
    for a in (int(np.argmax(imps)), 3):
        p = 1 / (1 + np.exp(3.5 - (world._ad_quality[a] - own[a]) - q_grid))
        direct = stats.binom.logpmf(hist_clicks[a], imps[a], p)
        np.testing.assert_allclose(history[a] - history[a, 0], direct - direct[0], atol=1e-6)


def test_generating_a_world_leaves_no_temporary_folders(tmp_path, monkeypatch):
    """tfds looks for a new dataset's metadata on its servers and leaves an empty mkdtemp folder; we skip that."""
    import tempfile

    from multitower_jax.data.generate import generate
    from tests.conftest import synthetic_config

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    config = synthetic_config(tmp_path / "data", "--config.synthetic.impressions.train=500",
                              "--config.synthetic.impressions.validation=200", "--config.synthetic.impressions.test=200")
    generate(config, tmp_path / "data")
    assert (tmp_path / "data" / "synthetic_impressions" / "search" / "1.0.0" / "dataset_info.json").exists()
    assert sorted(p.name for p in scratch.iterdir()) == []
