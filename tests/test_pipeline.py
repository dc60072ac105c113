"""The TFDS block builder and the grain pipeline, on random impressions (not the synthetic world)."""

from pathlib import Path

import numpy as np
import pytest

from multitower_jax.data import builders, pipeline, preprocess
from multitower_jax.data.tokenizer import HashTokenizer
from tests.conftest import random_chunks, tiny_config


def _all_raw(spec, split, sizes):
    seeds = {"train": 1, "validation": 2, "test": 3}
    chunks = list(random_chunks(spec, "search", sizes[split], seeds[split], oov_every=10))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


@pytest.fixture(scope="module")
def stats(random_dataset, tmp_path_factory):
    config, spec, _ = random_dataset
    return pipeline.load_or_compute_stats(config, spec, tmp_path_factory.mktemp("work"))


def test_blocks_round_trip_every_row(random_dataset):
    config, spec, sizes = random_dataset
    source = pipeline.data_source(config, "search", "validation")
    rows = list(pipeline.raw_blocks(source))
    got = {k: np.concatenate([b[k] for b in rows]) for k in rows[0]}
    want = _all_raw(spec, "validation", sizes)
    order = np.argsort(got["impression_id"])
    assert np.array_equal(got["impression_id"][order], want["impression_id"])
    np.testing.assert_array_equal(got["user.total_clicks_30d"][order], want["user.total_clicks_30d"])
    # dense vectors are stored as float16
    np.testing.assert_allclose(got["user.interest_vector"][order], want["user.interest_vector"], rtol=1e-3)
    assert [t.decode() for t in got["context.query"][order][:5]] == list(want["context.query"][:5])


def test_normalization_statistics_match_numpy(random_dataset, stats):
    config, spec, sizes = random_dataset
    raw = _all_raw(spec, "train", sizes)
    for column in ("user.total_clicks_30d", "context.pages_viewed"):
        x = raw[column].astype(np.float64)
        mean, std = stats.mean_std(column, spec.columns("search")[column])
        assert mean == pytest.approx(np.log1p(x).mean(), rel=1e-9)
        assert std == pytest.approx(np.log1p(x).std(), rel=1e-9)
    hist = spec.columns("search")["ad.historical_ctr"]  # log1p=False
    assert stats.mean_std("ad.historical_ctr", hist)[0] == pytest.approx(raw["ad.historical_ctr"].astype(np.float64).mean())
    ids, counts = np.unique(raw["ad_id"], return_counts=True)
    np.testing.assert_allclose(stats.ad_log_q(ids), np.log(counts / len(raw["ad_id"])), rtol=1e-5)


def test_stats_are_saved_and_reloaded(random_dataset, tmp_path):
    config, spec, _ = random_dataset
    first = pipeline.load_or_compute_stats(config, spec, tmp_path)
    assert (tmp_path / preprocess.STATS_FILE).exists()
    again = preprocess.FeatureStats.load(tmp_path)
    assert again.numeric == first.numeric and again.num_rows == first.num_rows


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// served from memory: etils.epath's fsspec backend gets an in-memory file system for
    "gs" (no network, no gcsfs). The test runs in an empty folder, to show nothing lands locally."""
    from etils.epath import backend, gpath
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

    fs = FakeGCS(skip_instance_cache=True)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath would use tf.io.gfile
    monkeypatch.setattr(backend._FileSystemSpecBackend, "_get_filesystem",
                        lambda self, name: fs if name in ("gs", "gcs") else MemoryFileSystem())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    had_root_gs = Path("/gs").exists()
    yield fs
    # pathlib.Path("gs://bucket/run") is the relative gs:/bucket/run, or /gs/bucket/run once absolute
    assert not list(cwd.iterdir()) and (had_root_gs or not Path("/gs").exists()), \
        "a gs:// path was written as a local path"


def test_gs_workdir_files_go_through_epath(random_dataset, fake_gcs):
    from etils import epath

    from multitower_jax import config as config_lib

    config, spec, _ = random_dataset
    workdir = "gs://bucket/run"
    path = config_lib.write_resolved(config, epath.Path(workdir))
    assert str(path) == "gs://bucket/run/config.json" and fake_gcs.exists(str(path))
    assert config_lib.from_json(f"{workdir}/config.json").to_dict() == config.to_dict()

    first = pipeline.load_or_compute_stats(config, spec, epath.Path(workdir))  # computes and saves
    assert fake_gcs.exists(f"{workdir}/{preprocess.STATS_FILE}") and fake_gcs.exists(f"{workdir}/{preprocess.AD_FREQ_FILE}")
    again = pipeline.load_or_compute_stats(config, spec, workdir)  # reads them back from "gs://"
    assert again.numeric == first.numeric and again.num_rows == first.num_rows
    np.testing.assert_array_equal(again.ad_counts, first.ad_counts)
    assert sorted(p.rsplit("/", 1)[-1] for p in fake_gcs.store) == sorted(
        ["config.json", preprocess.STATS_FILE, preprocess.AD_FREQ_FILE])  # no temporary files left


def test_preprocessed_values(random_dataset, stats):
    config, spec, sizes = random_dataset
    raw = builders.flatten_block(pipeline.data_source(config, "search", "train")[0])
    pre = preprocess.Preprocessor(spec, "search", stats)
    out = pre(raw)
    mean, std = stats.numeric["user.total_clicks_30d"]["log1p_mean"], stats.numeric["user.total_clicks_30d"]["log1p_std"]
    np.testing.assert_allclose(out["user"]["total_clicks_30d"], (np.log1p(raw["user.total_clicks_30d"]) - mean) / (std + 1e-6), rtol=1e-5)
    age = raw["user.age_bucket"]
    np.testing.assert_array_equal(out["user"]["age_bucket"], np.where(age < 10, age + 1, 0))
    assert out["ad"]["advertiser_id"].min() >= 1 and out["ad"]["advertiser_id"].max() <= 100_000
    query = spec.context("search")["query"]
    assert out["context"]["query"].shape == (64, query.max_len)
    tok = HashTokenizer(query.vocab_size, query.max_len)
    np.testing.assert_array_equal(out["context"]["query"][3], tok.tokenize(raw["context.query"][3].decode())[0])


def test_oov_and_truncation_counts(random_dataset, stats):
    config, spec, sizes = random_dataset
    raw = builders.flatten_block(pipeline.data_source(config, "search", "train")[0])
    pre = preprocess.Preprocessor(spec, "search", stats)
    pre(raw)
    report = pre.report()
    assert report["oov"]["user.age_bucket"] == int(np.count_nonzero(raw["user.age_bucket"] >= 10))
    assert report["oov"]["user.age_bucket"] > 0
    n_words = np.array([len(t.split()) for t in raw["context.query"]])
    max_len = spec.context("search")["query"].max_len
    assert report["truncated_texts"]["context.query"] == int(np.count_nonzero(n_words > max_len))


def test_shuffle_rows_permutes_within_windows():
    chunks = [{"click": np.arange(i, i + 10), "t": np.arange(i, i + 10) * 2} for i in range(0, 100, 10)]
    out = list(builders.shuffle_rows(iter(chunks), buffer_rows=30, seed=0))
    click = np.concatenate([c["click"] for c in out])
    assert sorted(click.tolist()) == list(range(100)) and not np.array_equal(click, np.arange(100))
    np.testing.assert_array_equal(np.concatenate([c["t"] for c in out]), click * 2)  # rows stay whole
    assert set(out[0]["click"]) == set(range(30))  # bounded: only within a 30-row window


def test_tokenizer():
    tok = HashTokenizer(vocab_size=100, max_len=4)
    ids, truncated = tok.tokenize("Wireless Headphones, wireless!")
    assert ids[0] == ids[2] and ids[3] == 0 and not truncated and ids[:3].min() >= 2
    batch, n_truncated = tok.encode_batch(["a b c d e", b"a b c d e", "x"])
    assert n_truncated == 2 and np.array_equal(batch[0], batch[1]) and batch[2, 1] == 0


def test_train_batches_have_fixed_shapes(random_dataset, stats):
    config, spec, sizes = random_dataset
    it = iter(pipeline.make_dataset(config, spec, stats, placement="search", split="train", train=True))
    batch = next(it)
    assert batch["click"].shape == (256,) and batch["user"]["interest_vector"].shape == (256, 256)
    assert batch["context"]["query"].dtype == np.int32 and batch["valid"].min() == 1


def test_eval_batches_pad_and_cover_the_split_once(random_dataset, stats):
    config, spec, sizes = random_dataset
    batches = list(pipeline.make_dataset(config, spec, stats, placement="search", split="test", train=False))
    assert all(b["click"].shape == (256,) for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == sizes["test"] and len(batches) == -(-sizes["test"] // 256)
    assert np.concatenate([b["weight"] for b in batches])[valid == 0].sum() == 0


def test_process_shards_are_disjoint_and_complete(random_dataset, stats):
    config, spec, sizes = random_dataset
    seen = []
    for index in range(2):
        pipe = pipeline.make_dataset(config, spec, stats, placement="search", split="validation", train=False,
                                     process_index=index, process_count=2)
        for b in pipe:
            assert b["click"].shape == (128,)  # the global eval batch split over 2 processes
            seen.append(b["user_id"][b["valid"] == 1])
    raw = _all_raw(spec, "validation", sizes)
    assert sorted(np.concatenate(seen).tolist()) == sorted(raw["user_id"].astype(np.int32).tolist())


def test_negative_downsampling_weights_are_unbiased(random_dataset, stats):
    config, spec, sizes = random_dataset
    config = tiny_config(config.data.dir, "--config.data.negative_downsample_rate=0.25")
    it = iter(pipeline.make_dataset(config, spec, stats, placement="search", split="train", train=True))
    batches = [next(it) for _ in range(120)]  # several epochs of the kept rows
    click = np.concatenate([b["click"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    raw_rate = _all_raw(spec, "train", sizes)["click"].mean()
    assert click.mean() > 2 * raw_rate  # negatives really were dropped
    np.testing.assert_array_equal(np.unique(weight[click == 0]), [4.0])
    np.testing.assert_array_equal(np.unique(weight[click == 1]), [1.0])
    assert (weight * click).sum() / weight.sum() == pytest.approx(raw_rate, rel=0.08)


def test_iterator_state_restores_the_exact_next_batches(random_dataset, stats):
    config, spec, _ = random_dataset
    config = tiny_config(config.data.dir, "--config.data.negative_downsample_rate=0.5")

    def make():
        return iter(pipeline.make_dataset(config, spec, stats, placement="search", split="train", train=True))

    it = make()
    for _ in range(7):  # past a block boundary mid-batch: 256-row batches from ~90-row downsampled blocks
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(30)]  # crosses an epoch boundary (reshuffled)
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["ad_id"], want["ad_id"])
        np.testing.assert_array_equal(got["weight"], want["weight"])
        np.testing.assert_array_equal(got["context"]["query"], want["context"]["query"])


def test_shards_are_stored_uncompressed(random_dataset):
    from array_record.python import array_record_module

    config, _, _ = random_dataset
    shards = list(builders.dataset_dir(config.data.dir, "synthetic", "search").glob("*.array_record-*"))
    assert shards
    for path in shards:
        reader = array_record_module.ArrayRecordReader(str(path))
        assert "uncompressed" in reader.writer_options_string()
        reader.close()
