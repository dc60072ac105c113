"""logQ for the stream a batch comes from: each placement's train rows after negative downsampling.

    q_p(ad) = (clicks_p(ad) + r nonclicks_p(ad)) / (clicks_p + r nonclicks_p)

computed here by hand in numpy and compared with what the pipeline puts in ``batch["ad_log_q"]``.
"""

import io
import warnings

import numpy as np
import pytest

from multitower_jax import features as F
from multitower_jax.data import builders, pipeline, preprocess
from tests.conftest import random_chunks, tiny_config

PLACEMENTS = ("search", "homepage")
RATE = 0.25
SIZES = {"train": 960, "validation": 128, "test": 64}
# Different ad mixes and click rates per placement: ads 0..9 on search, 5..14 on homepage.
MIX = {"search": (np.arange(10), np.linspace(3.0, 0.3, 10), np.linspace(0.02, 0.6, 10)),
       "homepage": (np.arange(5, 15), np.linspace(0.3, 3.0, 10), np.linspace(0.5, 0.01, 10))}
UNSEEN = {"search": (99, 14), "homepage": (99, 0)}  # evaluation-only ads: never in this placement's train rows


def _hand_rows(spec, placement: str, split: str) -> dict[str, np.ndarray]:
    """Random features, with hand-chosen ads and clicks (fixed seed per placement and split)."""
    seed = 10 * PLACEMENTS.index(placement) + ("train", "validation", "test").index(split)
    rows = next(random_chunks(spec, placement, SIZES[split], seed=seed + 100, chunk=SIZES[split]))
    rng = np.random.default_rng(seed)
    ads, weights, ctr = MIX[placement]
    pick = rng.choice(len(ads), SIZES[split], p=weights / weights.sum())
    rows["ad_id"] = ads[pick].astype(np.int64)
    rows["click"] = (rng.random(SIZES[split]) < ctr[pick]).astype(np.int64)
    if split != "train":
        rows["ad_id"][:2] = UNSEEN[placement]
    rows["conversion"] = rows["click"] * (rng.random(SIZES[split]) < 0.3)
    return rows


@pytest.fixture(scope="module")
def two_streams(tmp_path_factory):
    """A TFDS dataset per placement built from the hand-made rows: (data_dir, spec, rows)."""
    data_dir = tmp_path_factory.mktemp("logq_data")
    spec = F.parse_spec(tiny_config(data_dir).features)
    rows = {p: {s: _hand_rows(spec, p, s) for s in SIZES} for p in PLACEMENTS}
    for placement in PLACEMENTS:
        builders.SyntheticImpressions(
            spec=spec, placement=placement, block_size=64, with_oracle=True,
            chunk_source=lambda split, p=placement: iter([rows[p][split]]), data_dir=str(data_dir),
        ).download_and_prepare()
    return data_dir, spec, rows


def _config(data_dir, rate: float, placements=PLACEMENTS):
    return tiny_config(data_dir, f"--config.data.placements={tuple(placements)!r}",
                       f"--config.data.negative_downsample_rate={rate}")


def _hand_log_q(train: dict[str, np.ndarray], rate: float, ad_id: np.ndarray) -> np.ndarray:
    """log q(ad) in the stream of `train` downsampled at `rate`; an ad not in it counts as one kept row."""
    size = int(max(train["ad_id"].max(), ad_id.max())) + 1
    impressions = np.bincount(train["ad_id"], minlength=size).astype(np.float64)
    clicks = np.bincount(train["ad_id"], weights=train["click"] == 1, minlength=size)
    kept = clicks + rate * (impressions - clicks)
    q = np.where(impressions > 0, kept, 1.0) / kept.sum()
    return np.log(q[ad_id])


def _batches(config, spec, stats, placement: str, train: bool, count: int):
    it = iter(pipeline.make_dataset(config, spec, stats, placement=placement, split="validation" if not train
                                    else "train", train=train))
    for _ in range(count):
        batch = next(it)
        valid = batch["valid"] > 0
        yield batch["ad_id"][valid], batch["ad_log_q"][valid]


def test_batches_carry_each_placements_downsampled_log_q(two_streams, tmp_path):
    data_dir, spec, rows = two_streams
    config = _config(data_dir, RATE)
    computed = pipeline.load_or_compute_stats(config, spec, tmp_path)  # computes and saves
    reloaded = preprocess.FeatureStats.load(tmp_path)  # the per-placement counts survive the save
    assert set(reloaded.placement_counts) == set(PLACEMENTS)
    for stats in (computed, reloaded):
        for placement in PLACEMENTS:
            train_rows = rows[placement]["train"]
            for ad_id, log_q in _batches(config, spec, stats, placement, train=True, count=3):
                assert log_q.dtype == np.float32
                np.testing.assert_allclose(log_q, _hand_log_q(train_rows, RATE, ad_id), rtol=1e-6, atol=1e-6)
                # not today's pooled share: the two differ by far more than the tolerance
                assert np.abs(log_q - stats.ad_log_q(ad_id)).max() > 0.2
            # evaluation streams are not downsampled (r = 1); the unseen ads count as seen once
            ad_id, log_q = next(_batches(config, spec, stats, placement, train=False, count=1))
            assert set(UNSEEN[placement]) <= set(ad_id.tolist())
            np.testing.assert_allclose(log_q, _hand_log_q(train_rows, 1.0, ad_id), rtol=1e-6, atol=1e-6)


def test_per_placement_counts_by_hand(two_streams):
    data_dir, spec, rows = two_streams
    parts = [preprocess.compute_stats([rows[p]["train"]], spec, p) for p in PLACEMENTS]
    pooled = preprocess.pool_stats(parts)
    for placement in PLACEMENTS:
        train = rows[placement]["train"]
        ids, impressions = np.unique(train["ad_id"], return_counts=True)
        counts = pooled.placement_counts[placement]
        np.testing.assert_array_equal(counts.ad_ids, ids)
        np.testing.assert_array_equal(counts.impressions, impressions)
        np.testing.assert_array_equal(counts.clicks, [train["click"][train["ad_id"] == a].sum() for a in ids])
    # the same placement in two parts adds up
    half = {k: v[:500] for k, v in rows["search"]["train"].items()}
    rest = {k: v[500:] for k, v in rows["search"]["train"].items()}
    merged = preprocess.pool_stats([preprocess.compute_stats([half], spec, "search"),
                                    preprocess.compute_stats([rest], spec, "search")])
    ids = np.arange(-1, 16)
    np.testing.assert_array_equal(merged.ad_log_q(ids, "search", RATE), parts[0].ad_log_q(ids, "search", RATE))


def _todays_ad_log_q(stats: preprocess.FeatureStats, ad_id: np.ndarray) -> np.ndarray:
    """`FeatureStats.ad_log_q` as it was before per-placement counts (the pooled share)."""
    pos = np.clip(np.searchsorted(stats.ad_ids, ad_id), 0, max(len(stats.ad_ids) - 1, 0))
    found = stats.ad_ids[pos] == ad_id
    counts = np.where(found, stats.ad_counts[pos], 1)
    return (np.log(counts) - np.log(max(stats.num_rows, 1))).astype(np.float32)


def test_one_placement_without_downsampling_is_todays_log_q(random_dataset, tmp_path):
    data_config, spec, _ = random_dataset
    config = tiny_config(data_config.data.dir, "--config.data.negative_downsample_rate=1.0")
    stats = pipeline.load_or_compute_stats(config, spec, tmp_path)
    assert list(stats.placement_counts) == ["search"]
    unseen = 0
    for train in (True, False):  # evaluation: ads unseen in train too
        for ad_id, log_q in _batches(config, spec, stats, "search", train=train, count=4):
            np.testing.assert_array_equal(log_q, _todays_ad_log_q(stats, ad_id))  # bit for bit
            np.testing.assert_array_equal(log_q, stats.ad_log_q(ad_id))
            unseen += int((~stats.seen_ads(ad_id)).sum())
    assert unseen > 0


def _write_old_ad_frequency(workdir, with_user_ids: bool) -> None:
    """Rewrite ad_frequency.npz as versions before per-placement counts (and before user ids) did."""
    path = workdir / preprocess.AD_FREQ_FILE
    with np.load(path) as z:
        assert "placements" in z.files
        keep = ["ad_ids", "ad_counts"] + (["user_ids"] if with_user_ids else [])
        arrays = {k: z[k] for k in keep}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("with_user_ids", [True, False])
def test_old_statistics_load_and_fall_back_to_the_pooled_share(two_streams, tmp_path, with_user_ids):
    data_dir, spec, _ = two_streams
    config = _config(data_dir, RATE)
    fresh = pipeline.load_or_compute_stats(config, spec, tmp_path)
    _write_old_ad_frequency(tmp_path, with_user_ids)
    old_bytes = (tmp_path / preprocess.AD_FREQ_FILE).read_bytes()

    stats = pipeline.load_or_compute_stats(config, spec, tmp_path)  # loads; neither recomputes nor rewrites
    assert stats.placement_counts is None and (stats.user_ids is None) != with_user_ids
    assert (tmp_path / preprocess.AD_FREQ_FILE).read_bytes() == old_bytes
    np.testing.assert_array_equal(stats.ad_counts, fresh.ad_counts)
    with pytest.warns(preprocess.PooledLogQWarning, match="before per-placement ad counts"):
        batches = list(_batches(config, spec, stats, "search", train=True, count=2))
    for ad_id, log_q in batches:
        np.testing.assert_array_equal(log_q, _todays_ad_log_q(stats, ad_id))
    with warnings.catch_warnings():  # once: not again for the next pipeline, placement or load
        warnings.simplefilter("error", preprocess.PooledLogQWarning)
        again = preprocess.FeatureStats.load(tmp_path)
        for placement in PLACEMENTS:
            for ad_id, log_q in _batches(config, spec, again, placement, train=True, count=1):
                np.testing.assert_array_equal(log_q, _todays_ad_log_q(again, ad_id))
