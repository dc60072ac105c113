"""`multitower bench score`: the jitted scorer's latency for one request with 500 candidates, the
same compiled call's time with its inputs already on the device, and the throughput of
concurrent requests grouped by the micro-batcher against one request at a time.

The model is the config's fusion and heads with random weights drawn on the host (latency does
not depend on their values). The calibrators are the config's methods (default: isotonic for CTR,
temperature for CVR) fitted on synthetic validation-sized scores (`bench_calibration`), so the
timings include the calibration as served: an isotonic map with hundreds of thresholds.

Each request is what the Ranker hands the scorer: a user and a context embedding and its
candidates as rows of an ad catalogue (random embeddings, fusion ad parts, bids, qualities).
The full path (`Scorer.score_rows`, the Ranker's) pads the request's rows to its bucket, runs the
compiled call (which gathers the candidates from the catalogue held on the device) and fetches
the top-N rows; `device_*` times the same compiled call on inputs already on the device, outputs
left there, alternating request by request with the full path. Single requests and 32 micro-batched clients are timed in
interleaved rounds; the ratios
(`p50_over_device_p50`, `microbatch_speedup`) are medians of per-round ratios, so a load change
on a shared machine hits both sides of a ratio. FLOPs per request come from XLA's cost analysis
of the factorized scorer and of the unfactorized `score_embeddings` on the same candidates.
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
from multitower_jax.bench.random_params import random_like
from multitower_jax.models import model as model_lib
from multitower_jax.serving.batcher import MicroBatcher
from multitower_jax.serving.scorer import AdCatalogue, Scorer, device_catalogue
from multitower_jax.serving.settings import ServingSettings, bucket_for

NUM_CANDIDATES = 500


def concurrent_clients(call, pool: list, clients: int, per_client: int) -> tuple[list[float], float]:
    """`clients` threads each make `per_client` calls of `call` on requests of `pool` (client c
    takes requests c * per_client, ...): every call's latency in seconds, and the wall seconds."""
    done: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        own = []
        for i in range(per_client):
            t0 = time.perf_counter()
            call(pool[(c * per_client + i) % len(pool)])
            own.append(time.perf_counter() - t0)
        with lock:
            done.extend(own)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, time.perf_counter() - start

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
    # Drawn on the host: compiling the initializers would take seconds and the values do not matter.
    shapes = jax.eval_shape(lambda key, z: model.init(key, z, z, z, placement, method=model.score_embeddings),
                            jax.random.key(0), jax.ShapeDtypeStruct((1, d), jnp.float32))
    params = random_like(nn.meta.unbox(shapes))
    scorer = Scorer(params, model_lib.ModelConfig.from_config(config), placement, calibration, settings)
    return scorer, model, params


def _catalogue(rng: np.random.Generator, num_ads: int, d: int, h: int) -> AdCatalogue:
    """Random ads (the values do not change the timings)."""
    return AdCatalogue(rng.normal(size=(num_ads, d)).astype(np.float32),
                       rng.normal(size=(num_ads, h)).astype(np.float32),
                       rng.uniform(0.1, 5.0, num_ads).astype(np.float32), np.ones(num_ads, np.float32))


def _requests(rng: np.random.Generator, count: int, d: int, num_ads: int, n: int) -> list[tuple[np.ndarray, ...]]:
    """(e_user [D], e_context [D], catalogue rows [n]) per request, as retrieval hands them over."""
    return [(rng.normal(size=d).astype(np.float32), rng.normal(size=d).astype(np.float32),
             rng.choice(num_ads, n, replace=False)) for _ in range(count)]


def _flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def run(config: ml_collections.ConfigDict, num_requests: int = 2_000, json_path: str | None = None,
        clients: int = 32, num_candidates: int = NUM_CANDIDATES, rounds: int = 5, num_ads: int = 20_000) -> dict:
    settings = ServingSettings.from_config(config)
    cal = bench_calibration(config)
    scorer, model, params = scorer_from_config(config, settings, cal)
    d, h = scorer.spec.embed_dim, scorer.spec.fusion_hidden[0]
    bucket = bucket_for(num_candidates, settings.buckets)
    rng = np.random.default_rng(0)
    num_ads = max(num_ads, num_candidates)
    catalogue = device_catalogue(_catalogue(rng, num_ads, d, h))
    pool = _requests(rng, 64, d, num_ads, num_candidates)

    def score(reqs):
        """The full path for a group of requests: gather, compiled call, top-N rows to the host."""
        users, contexts, rows = (np.stack(parts) for parts in zip(*reqs))
        return scorer.score_rows(users, contexts, rows, catalogue)

    for b in settings.batch_buckets:  # compile every batch bucket before timing
        score(pool[:b])
    # The same compiled call (batch bucket 1) with its inputs on the device and its outputs left there.
    inputs = scorer.pad_rows(*(x[None] for x in pool[0]))
    on_device = jax.device_put(inputs)
    jax.block_until_ready(scorer.score_padded_rows(catalogue, *on_device))

    batcher = MicroBatcher(lambda reqs: _split(score(reqs), len(reqs)), settings.max_batch_size,
                           settings.max_wait_ms / 1000.0)
    per_round = max(1, num_requests // rounds)
    per_client = max(1, per_round // clients)
    single, device, concurrent, batch_sizes = [], [], [], []
    single_rps, concurrent_rps, p50_ratio, speedup = [], [], [], []
    for r in tqdm(range(rounds), desc="bench score: rounds", leave=False):
        # One request at a time through the full path, each followed by the same compiled call
        # on inputs already on the device (alternating, so both see the same load).
        lat, dev = np.empty(per_round), np.empty(per_round)
        for i in range(per_round):
            start = time.perf_counter()
            score([pool[(r * per_round + i) % len(pool)]])
            lat[i] = time.perf_counter() - start
            start = time.perf_counter()
            jax.block_until_ready(scorer.score_padded_rows(catalogue, *on_device))
            dev[i] = time.perf_counter() - start
        # Concurrent clients through the micro-batcher.
        first_batch = len(batcher.batch_sizes)
        done, seconds = concurrent_clients(batcher, pool, clients, per_client)
        batch_sizes += batcher.batch_sizes[first_batch:]
        single.append(lat)
        device.append(dev)
        concurrent += done
        single_rps.append(per_round / float(lat.sum()))
        concurrent_rps.append(len(done) / seconds)
        p50_ratio.append(float(np.percentile(lat, 50) / np.percentile(dev, 50)))
        speedup.append(concurrent_rps[-1] / single_rps[-1])
    batcher.close()
    lat, dev, mb = np.concatenate(single), np.concatenate(device), np.asarray(concurrent)

    flops = _flops(scorer._score_rows, scorer.params, None, catalogue, *inputs)
    user, context, rows = inputs[0], inputs[1], inputs[2][0]
    rep = lambda v: jnp.repeat(jnp.asarray(v)[:, None], bucket, 1).reshape(bucket, d)  # noqa: E731
    unfactorized = jax.jit(lambda p, u, c, a: model.apply(p, u, c, a, scorer.placement,
                                                          method=model.score_embeddings))
    flops_ref = _flops(unfactorized, params, rep(user), rep(context), catalogue.embeddings[np.maximum(rows, 0)])
    figures = {
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} device)",
        "fusion": scorer.spec.fusion, "head": scorer.spec.head,
        "candidates": num_candidates, "candidate_bucket": bucket, "calibration": describe_calibration(cal),
        "rounds": rounds, "requests_per_round": per_round,
        "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p99_ms": 1000 * float(np.percentile(lat, 99)),
        "device_p50_ms": 1000 * float(np.percentile(dev, 50)),
        "device_p99_ms": 1000 * float(np.percentile(dev, 99)),
        "p50_over_device_p50": float(np.median(p50_ratio)),
        "single_requests_per_sec": float(np.median(single_rps)),
        "microbatch_clients": clients,
        "microbatch_max_batch_size": settings.max_batch_size,
        "microbatch_max_wait_ms": settings.max_wait_ms,
        "microbatch_mean_batch_size": float(np.mean(batch_sizes)),
        "microbatch_requests_per_sec": float(np.median(concurrent_rps)),
        "microbatch_speedup": float(np.median(speedup)),
        "microbatch_p50_ms": 1000 * float(np.percentile(mb, 50)),
        "microbatch_p99_ms": 1000 * float(np.percentile(mb, 99)),
        "flops_per_request": flops,
        "flops_per_request_unfactorized": flops_ref,
    }
    bench.report(f"scorer: 1 request x {num_candidates} candidates (p99 target <= 3 ms)", figures, json_path)
    return figures


def _split(out: dict, n: int) -> list[dict]:
    return [{k: v[i] for k, v in out.items()} for i in range(n)]
