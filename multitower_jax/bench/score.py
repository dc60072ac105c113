"""`multitower bench score`: the jitted scorer's latency for one request with 500 candidates, and
the throughput of concurrent requests grouped by the micro-batcher.

The model is the config's fusion and heads with random weights drawn on the host (latency does
not depend on their values). The calibrators are the config's methods (default: isotonic for CTR, temperature for
CVR) fitted on synthetic validation-sized scores (`bench_calibration`), so the timings include
the calibration as served: an isotonic map with hundreds of thresholds. Inputs are host numpy arrays, as the Ranker hands them over, and each call returns the
outputs to the host, so a timing covers transfer + compute + top-N. FLOPs per request come from
XLA's cost analysis of the factorized scorer and of the unfactorized `score_embeddings` on the
same candidates.
"""

from __future__ import annotations

import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from multitower_jax import bench
from multitower_jax import calibration as calibration_lib
from multitower_jax import features as F
from multitower_jax.models import model as model_lib
from multitower_jax.serving.batcher import MicroBatcher
from multitower_jax.serving.scorer import Scorer, pad_to
from multitower_jax.serving.settings import ServingSettings, bucket_for

NUM_CANDIDATES = 500


def bench_calibration(config: ml_collections.ConfigDict, num_examples: int = 50_000,
                      seed: int = 0) -> calibration_lib.Calibration:
    """The config's calibration methods fitted on synthetic scores of a validation split's size
    (the quickstart's: 50,000 impressions): true CTRs ~ Beta(1, 30) (about 3%) and CVRs ~ Beta(2, 10),
    labels drawn from them, and an over-confident, shifted model. The fit itself is realistic:
    isotonic keeps a few hundred thresholds, temperature one parameter."""
    rng = np.random.default_rng(seed)

    def logit(p):
        return np.log(p) - np.log1p(-p)

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    p_ctr = np.clip(rng.beta(1.0, 30.0, num_examples), 1e-5, 1 - 1e-5)
    p_cvr = np.clip(rng.beta(2.0, 10.0, num_examples), 1e-5, 1 - 1e-5)
    click = (rng.random(num_examples) < p_ctr).astype(np.float64)
    pred = {"pctr": sigmoid(1.3 * logit(p_ctr) + 0.3).astype(np.float32),
            "pcvr": sigmoid(1.6 * logit(p_cvr) + 0.2).astype(np.float32),
            "click": click, "conversion": click * (rng.random(num_examples) < p_cvr)}
    settings = calibration_lib.validate_config(config)
    heads = calibration_lib.heads_of(config)
    return calibration_lib.fit(pred, heads, {h: settings[h] for h in heads}, 1.0, float(settings.clip_eps),
                               fallbacks={})


def describe_calibration(cal: calibration_lib.Calibration) -> dict[str, str]:
    """{head: method}, with the isotonic maps' threshold counts (for the benchmark figures)."""
    return {h: f"isotonic ({cal.params[h]['x'].shape[0]} thresholds)" if m == "isotonic" else m
            for h, m in cal.methods}


def scorer_from_config(config: ml_collections.ConfigDict, settings: ServingSettings,
                       calibration: calibration_lib.Calibration | None = None) -> tuple[Scorer, object, dict]:
    """A Scorer over random fusion + head parameters of the config's model (and the model, params)."""
    model = model_lib.build_model(config, F.parse_spec(config.features))
    placement = config.data.placements[0]
    d = int(config.model.embed_dim)
    from multitower_jax.bench.serve import random_like  # (serve imports this module)

    # Drawn on the host: compiling the initializers would take seconds and the values do not matter.
    shapes = jax.eval_shape(lambda key, z: model.init(key, z, z, z, placement, method=model.score_embeddings),
                            jax.random.key(0), jax.ShapeDtypeStruct((1, d), jnp.float32))
    params = random_like(nn.meta.unbox(shapes))
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), placement, calibration, settings)
    return scorer, model, params


def _request(rng: np.random.Generator, d: int, h: int, n: int, bucket: int) -> tuple[np.ndarray, ...]:
    """One request's scorer inputs, already padded to the candidate bucket (as the Ranker builds them)."""
    valid = np.arange(bucket) < n
    return (rng.normal(size=d).astype(np.float32), rng.normal(size=d).astype(np.float32),
            pad_to(rng.normal(size=(n, d)).astype(np.float32), bucket),
            pad_to(rng.normal(size=(n, h)).astype(np.float32), bucket),
            pad_to(rng.uniform(0.1, 5.0, n).astype(np.float32), bucket), pad_to(np.ones(n, np.float32), bucket),
            valid)


def _flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def run(config: ml_collections.ConfigDict, num_requests: int = 2_000, json_path: str | None = None,
        clients: int = 32, num_candidates: int = NUM_CANDIDATES) -> dict:
    settings = ServingSettings.from_config(config)
    cal = bench_calibration(config)
    scorer, model, params = scorer_from_config(config, settings, cal)
    d, h = scorer.spec.embed_dim, scorer.spec.fusion_hidden[0]
    bucket = bucket_for(num_candidates, settings.buckets)
    rng = np.random.default_rng(0)
    pool = [_request(rng, d, h, num_candidates, bucket) for _ in range(64)]

    def batch_of(reqs):
        bb = bucket_for(len(reqs), settings.batch_buckets, "requests")
        return [pad_to(np.stack(parts), bb) for parts in zip(*reqs)]

    def score(reqs):
        return jax.device_get(scorer.score_padded(*batch_of(reqs)))

    for b in settings.batch_buckets:  # compile every batch bucket before timing
        score(pool[:b])

    # One request at a time.
    latencies = np.empty(num_requests)
    for i in tqdm(range(num_requests), desc="bench score: single requests", leave=False):
        start = time.perf_counter()
        score([pool[i % len(pool)]])
        latencies[i] = time.perf_counter() - start

    # Concurrent clients through the micro-batcher.
    batcher = MicroBatcher(lambda reqs: _split(score(reqs), len(reqs)), settings.max_batch_size,
                           settings.max_wait_ms / 1000.0)
    per_client = max(1, num_requests // clients)
    client_latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        own = []
        for i in range(per_client):
            start = time.perf_counter()
            batcher(pool[(c * per_client + i) % len(pool)])
            own.append(time.perf_counter() - start)
        with lock:
            client_latencies.extend(own)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    batcher.close()
    mb = np.asarray(client_latencies)

    x = batch_of([pool[0]])
    flops = _flops(scorer._score, scorer.params, None, *x)
    rep = lambda v: jnp.repeat(jnp.asarray(v)[:, None], bucket, 1).reshape(bucket, d)  # noqa: E731
    unfactorized = jax.jit(lambda p, u, c, a: model.apply(p, u, c, a, scorer.placement,
                                                          method=model.score_embeddings))
    flops_ref = _flops(unfactorized, params, rep(x[0]), rep(x[1]), jnp.asarray(x[2][0]))
    figures = {
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device)",
        "candidates": num_candidates, "candidate_bucket": bucket, "calibration": describe_calibration(cal),
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "single_requests_per_sec": num_requests / float(latencies.sum()),
        "microbatch_clients": clients,
        "microbatch_max_batch_size": settings.max_batch_size,
        "microbatch_max_wait_ms": settings.max_wait_ms,
        "microbatch_mean_batch_size": float(np.mean(batcher.batch_sizes)),
        "microbatch_requests_per_sec": len(mb) / seconds,
        "microbatch_p50_ms": 1000 * float(np.percentile(mb, 50)),
        "microbatch_p99_ms": 1000 * float(np.percentile(mb, 99)),
        "flops_per_request": flops,
        "flops_per_request_unfactorized": flops_ref,
    }
    bench.report(f"scorer: 1 request x {num_candidates} candidates (p99 target <= 3 ms)", figures, json_path)
    return figures


def _split(out: dict, n: int) -> list[dict]:
    return [{k: v[i] for k, v in out.items()} for i in range(n)]
