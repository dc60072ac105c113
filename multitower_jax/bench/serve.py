"""`multitower bench serve`: p50/p99 of the whole request through the `Ranker` (user cache -> context
tower -> ScaNN top-K over a --num-ads index -> factorized calibrated scorer -> top-20).

The model is the config's architecture with random weights, calibrated like `bench score`
(the config's methods fitted on synthetic scores: isotonic CTR, temperature CVR by default); the
index holds structured synthetic
ad embeddings (`bench.retrieve.structured_embeddings`: running the ad tower over 1M ads on a
2-core CPU would take longer than the benchmark). Requests carry random raw user and context
features for a pool of users, so the user cache sees both misses and hits, as in production.
Each request goes through `Ranker.rank` (the micro-batcher included), one at a time; the
micro-batcher dispatches a lone request at once, and `queue_wait_ms_mean` (submit -> batch call)
shows what it cost. Then concurrent clients.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from multitower_jax import bench
from multitower_jax import features as F
from multitower_jax.bench.random_params import random_params
from multitower_jax.bench.retrieve import structured_embeddings
from multitower_jax.bench.score import bench_calibration, concurrent_clients, describe_calibration
from multitower_jax.data.preprocess import FeatureStats
from multitower_jax.inference import Trained
from multitower_jax.models import model as model_lib
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.index import AdIndex, AdStore, query_rule
from multitower_jax.retrieval.retriever import Retriever
from multitower_jax.retrieval.settings import RetrievalSettings
from multitower_jax.serving.ranker import STAGES, Ranker
from multitower_jax.serving.settings import ServingSettings

WORDS = [f"w{i}" for i in range(500)]


def random_features(spec: F.TowerSpec, rng: np.random.Generator) -> dict:
    """One row of raw features of a tower, as a request would carry them."""
    out = {}
    for f in spec.features:
        if isinstance(f, F.Categorical):
            out[f.name] = int(rng.integers(0, f.size)) if f.encoding != "vocab" else str(rng.choice(f.vocab))
        elif isinstance(f, F.Numeric):
            out[f.name] = float(rng.lognormal(1.0, 1.0))
        elif isinstance(f, F.Text):
            out[f.name] = " ".join(rng.choice(WORDS, int(rng.integers(1, f.max_len + 1))))
        elif isinstance(f, F.Dense):
            out[f.name] = rng.normal(size=f.dim).round(4).tolist()
        elif isinstance(f, F.MultiHot):
            out[f.name] = rng.integers(0, f.size, int(rng.integers(0, f.max_items + 1))).tolist()
    return out


def random_trained(config: ml_collections.ConfigDict, workdir: Path) -> Trained:
    """A `Trained` with the config's architecture, random weights and unit feature statistics."""
    spec = F.parse_spec(config.features)
    model = model_lib.build_model(config, spec)
    params = random_params(model)
    unit = {"mean": 0.0, "std": 1.0, "log1p_mean": 0.0, "log1p_std": 1.0}
    numeric = {c: unit for p in config.data.placements for c, f in spec.columns(p).items()
               if isinstance(f, F.Numeric)}
    stats = FeatureStats(numeric, np.zeros(0, np.int64), np.zeros(0, np.int64), 1)
    return Trained(config=config, spec=spec, model=model, params=params, stats=stats, step=0, workdir=workdir)


def build_ranker(config: ml_collections.ConfigDict, num_ads: int, workdir: Path) -> Ranker:
    trained = random_trained(config, workdir)
    d = trained.embed_dim
    print(f"bench serve: {num_ads:,} structured ad embeddings ({d}-d), ScaNN index")
    ads, _ = structured_embeddings(num_ads, 1, d)
    rng = np.random.default_rng(1)
    store = AdStore(np.arange(num_ads, dtype=np.int64), ads, rng.lognormal(0.0, 0.5, num_ads).astype(np.float32),
                    rng.uniform(0.5, 1.5, num_ads).astype(np.float32), targeting_lib.untargeted(num_ads))
    manifest = {"fingerprint": trained.fingerprint, "embed_dim": d,
                "query_rule": query_rule(bool(config.loss.l2_normalize))}
    index = AdIndex.build(store, manifest, RetrievalSettings.from_config(config))
    return Ranker(trained, Retriever(index), bench_calibration(config), settings=ServingSettings.from_config(config))


def run(config: ml_collections.ConfigDict, num_ads: int = 1_000_000, num_requests: int = 2_000,
        json_path: str | None = None, num_users: int = 500, clients: int = 16) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ranker = build_ranker(config, num_ads, Path(tmp))
    s = ranker.settings
    placement = ranker.placements[0]
    rng = np.random.default_rng(2)
    users = [random_features(ranker.trained.spec.user, rng) for _ in range(num_users)]
    pool = [{"placement": placement, "user_id": int(u), "user": users[u],
             "context": random_features(ranker.trained.spec.context(placement), rng)}
            for u in rng.integers(0, num_users, 1024)]
    start = time.perf_counter()
    ranker.warmup()  # compiles every batch bucket and computes the fusion ad part of every ad
    warmup_seconds = time.perf_counter() - start
    for req in pool[:32]:
        ranker.rank(req)

    ranker.times = type(ranker.times)()
    hits0, misses0 = ranker.cache.hits, ranker.cache.misses
    waits0 = len(ranker.batcher.wait_seconds)
    latencies = np.empty(num_requests)
    for i in tqdm(range(num_requests), desc="bench serve: requests", leave=False):
        t0 = time.perf_counter()
        answer = ranker.rank(pool[i % len(pool)])
        latencies[i] = time.perf_counter() - t0
        assert len(answer["ads"]) == s.top_n
    stage_ms = {f"{stage}_ms_mean": 1000 * ranker.times.seconds[stage] / max(ranker.times.batches, 1)
                for stage in STAGES}
    hits, misses = ranker.cache.hits - hits0, ranker.cache.misses - misses0
    queue_wait = np.asarray(ranker.batcher.wait_seconds[waits0:])

    # Concurrent clients: the micro-batcher groups their requests.
    per_client = max(1, num_requests // clients)
    batches0 = len(ranker.batcher.batch_sizes)
    done, concurrent_seconds = concurrent_clients(ranker.rank, pool, clients, per_client)
    ranker.close()
    figures = {
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device)",
        "num_ads": num_ads, "index_mode": ranker.retriever.index.mode, "K": s.num_candidates, "top_n": s.top_n,
        "calibration": describe_calibration(ranker.scorers[placement].calibration),
        "requests": num_requests, "user_cache_hit_rate": hits / max(hits + misses, 1),
        "warmup_seconds": warmup_seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        **stage_ms,
        "queue_wait_ms_mean": 1000 * float(queue_wait.mean()),
        "concurrent_clients": clients,
        "concurrent_requests_per_sec": len(done) / concurrent_seconds,
        "concurrent_mean_batch_size": float(np.mean(ranker.batcher.batch_sizes[batches0:])),
        "concurrent_p50_ms": 1000 * float(np.percentile(done, 50)),
        "concurrent_p99_ms": 1000 * float(np.percentile(done, 99)),
    }
    bench.report(f"whole request: {num_ads:,} ads, K={s.num_candidates}, top-{s.top_n} "
                 "(lone-request target p50 <= 4 ms, p99 <= 8 ms at 1M ads)",
                 figures, json_path)
    return figures
