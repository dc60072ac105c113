"""Shared fixtures. 8 fake CPU devices for sharding tests: set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA compiles dominate the suite's time, and many tests (and the multi-host tests' worker
# processes, which inherit the environment) compile the very same programs: a persistent
# compilation cache for the session turns the repeats into cache reads.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="multitower-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from multitower_jax import config as config_lib  # noqa: E402
from multitower_jax import features as F  # noqa: E402
from multitower_jax.data import builders, schema  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.py"


def random_chunks(spec: F.FeatureSpec, placement: str, n: int, seed: int, click_rate: float = 0.1,
                  chunk: int = 1000, oov_every: int = 0):
    """Random raw impressions that satisfy the raw column contract (independent of the synthetic world)."""
    cols = schema.raw_columns(spec, placement, with_oracle=True)
    features = spec.columns(placement)
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(40)])
    done = 0
    while done < n:
        m = min(chunk, n - done)
        out = {}
        for name, (dtype, shape) in cols.items():
            f = features.get(name)
            if dtype == np.dtype(object):
                lengths = rng.integers(1, 2 * f.max_len, m)
                out[name] = np.array([" ".join(rng.choice(words, k)) for k in lengths], dtype=object)
            elif dtype == np.float32:
                out[name] = (rng.lognormal(1.0, 1.0, (m, *shape))).astype(np.float32)
            elif isinstance(f, F.Categorical) and f.encoding == "ids":
                out[name] = rng.integers(0, f.size, m)
                if oov_every:
                    out[name][::oov_every] = f.size + 7  # out of range -> OOV bucket
            elif isinstance(f, F.MultiHot):
                out[name] = np.where(rng.random((m, *shape)) < 0.5, rng.integers(0, f.size, (m, *shape)), -1)
            else:
                out[name] = rng.integers(0, 1 << 40, (m, *shape))
        p_click = rng.uniform(0.0, 2 * click_rate, m).astype(np.float32)
        out["p_click"] = p_click
        out["click"] = (rng.random(m) < p_click).astype(np.int64)
        out["conversion"] = out["click"] * (rng.random(m) < 0.2)
        out["impression_id"] = np.arange(done, done + m) + seed * 10_000_000
        out["ad_id"] = rng.zipf(1.5, m) % 500
        done += m
        yield out


def get_path(tree, path):
    """`tree[path[0]][path[1]]...`: a parameter by its path of names."""
    for key in path:
        tree = tree[key]
    return tree


def tiny_config(data_dir, *overrides):
    return config_lib.load(QUICKSTART, [f"--config.data.dir={data_dir}", "--config.data.block_size=64",
                                        "--config.data.batch_size=256", "--config.data.eval_batch_size=256",
                                        *overrides])


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory):
    """A small TFDS dataset of random impressions for the search placement: (config, spec, sizes)."""
    data_dir = tmp_path_factory.mktemp("random_data")
    config = tiny_config(data_dir)
    spec = F.parse_spec(config.features)
    sizes = {"train": 6000, "validation": 1000, "test": 1000}
    seeds = {"train": 1, "validation": 2, "test": 3}
    builder = builders.SyntheticImpressions(
        spec=spec, placement="search", block_size=64, with_oracle=True,
        chunk_source=lambda split: random_chunks(spec, "search", sizes[split], seeds[split], oov_every=10),
        data_dir=str(data_dir))
    builder.download_and_prepare()
    return config, spec, sizes


# A model small enough to compile and train in seconds on 2 CPU cores.
TINY_MODEL = [
    "--config.model.embed_dim=16", "--config.model.user_hidden=(32,)", "--config.model.ad_hidden=(32,)",
    "--config.model.fusion_hidden=(32,16)", "--config.model.text.dim=16", "--config.model.text.mlp_dim=32",
    "--config.model.text.num_heads=2", "--config.model.text.num_layers=1",
    "--config.features.ad.advertiser_id.size=512", "--config.features.ad.brand_id.size=512",
    "--config.features.context.search.city.size=256", "--config.features.ad.title.vocab_size=1024",
    "--config.features.ad.description.vocab_size=1024", "--config.features.context.search.query.vocab_size=1024",
    "--config.features.user.interest_vector.dim=32", "--config.features.ad.image_embedding.dim=16",
    "--config.optim.warmup_steps=5", "--config.optim.decay_steps=200", "--config.optim.peak_lr=3e-3",
    "--config.train.log_every=5", "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000",
]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic world (search placement) generated once for the session, with TINY_MODEL features."""
    from multitower_jax.data.generate import generate

    data_dir = tmp_path_factory.mktemp("synthetic")
    generate(synthetic_config(data_dir), data_dir)
    return data_dir


def synthetic_config(data_dir, *overrides):
    return config_lib.load(QUICKSTART, [
        f"--config.data.dir={data_dir}", "--config.data.block_size=64", "--config.data.batch_size=128",
        "--config.data.eval_batch_size=512", "--config.synthetic.num_users=2000", "--config.synthetic.num_ads=400",
        "--config.synthetic.num_advertisers=50", "--config.synthetic.impressions.train=12000",
        "--config.synthetic.impressions.validation=2000", "--config.synthetic.impressions.test=2000",
        *TINY_MODEL, *overrides])
