"""`multitower retrieve-eval`: how good the index is, and how good the towers are at retrieval.

Writes ``<index>/retrieval_eval.json`` with
  recall_at_k_vs_exact     |ScaNN top-K ∩ exact top-K| / K over the same embeddings (index quality)
  model_hit_rate_at_k      fraction of clicked test impressions whose ad is in the exact top-K of
                           all ads by the model's Q (tower quality; `_index`: through the index)
  model_hit_rate_at_k_targeted   the same through the retriever with each impression's targeting
                           (country, device, placement) applied; an ineligible clicked ad is a miss
  clicked_ad_eligible_fraction   share of clicked impressions whose ad their targeting allows
  oracle_hit_rate_at_k     synthetic data only: the same with ads ranked by their true p_click for
                           that impression (user, intent, context and hour replayed from the world)
  random_hit_rate_at_k     K / number of ads
  leaves_to_search_at_k, reorder_at_k   the search settings used at each K (the index's own, e.g. those
                           `index --target-recall` chose, unless --config.retrieval.* overrides them)
  index_tuning             when the index was tuned: its target, K and the recall it measured then
  model_step, index_model_step   the checkpoint evaluated and the one the index was exported from
                           (they differ: the index is stale, and Retriever.load warned)
The queries are a seeded uniform sample of at most `max_queries` clicked impressions
(`num_clicked_impressions` of `num_clicked_in_split`), searched CHUNK at a time.
The synthetic generator does not restrict impressions by targeting, so the headline hit rates ignore
targeting; the `_targeted` figure shows what serving with targeting would keep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from multitower_jax import fileio
from multitower_jax.data import pipeline
from multitower_jax.data.synthetic import World
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.index import _top_k
from multitower_jax.retrieval.retriever import Eligibility, Retriever
from multitower_jax.retrieval.settings import RetrievalSettings

KS = (10, 100, 500)
REPORT = "retrieval_eval.json"
CHUNK = 1024  # queries searched and scored at once: memory is O(CHUNK * K), whatever the sample size
SAMPLE_SEED = 0


def clicked_queries(trained, placement: str, split: str, batch_size: int = 512,
                    max_rows: int | None = None, seed: int = SAMPLE_SEED) -> dict[str, np.ndarray]:
    """E_user and E_context (and ids, p_click, targeting keys) of the clicked impressions of a split,
    in storage order. With `max_rows`, a uniform random sample of that many (all when the split
    has fewer): each clicked impression draws a key from `seed`'s stream and the `max_rows`
    smallest keys are kept (bottom-k sampling, one pass, memory O(max_rows) raw rows).
    `num_clicked_in_split` (a 0-d array) counts the clicked impressions the sample came from."""
    model, params = trained.model, trained.params
    embed = jax.jit(lambda u, c: (model.apply({"params": params}, u, method=model.embed_user),
                                  model.apply({"params": params}, c, placement, method=model.embed_context)))
    preprocess = trained.preprocessor(placement)
    source = pipeline.data_source(trained.config, placement, split)
    keep_cols = ("impression_id", "user_id", "ad_id", "p_click", "user.country", "user.device_type")
    parts: dict[str, list] = {}

    def flush(rows: dict) -> None:
        n = len(rows["click"])
        feats = preprocess(rows)
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)]) if n < batch_size else x
        e_u, e_c = embed(jax.tree.map(pad, feats["user"]), jax.tree.map(pad, feats["context"]))
        parts.setdefault("e_user", []).append(np.asarray(e_u)[:n])
        parts.setdefault("e_context", []).append(np.asarray(e_c)[:n])
        for c in keep_cols:
            if c in rows:
                parts.setdefault(c, []).append(rows[c])

    def concat(blocks: list[dict]) -> dict:
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

    buffer: list[dict] = []
    have = total = 0
    rng = np.random.default_rng(seed)
    for block in pipeline.raw_blocks(source, progress=f"retrieve-eval {split}"):
        clicked = block["click"] > 0
        total += int(clicked.sum())
        if not clicked.any():
            continue
        rows = {k: v[clicked] for k, v in block.items()}
        if max_rows:  # the reservoir: (key, position) per kept row, compacted to max_rows when it doubles
            rows["_key"], rows["_pos"] = rng.random(len(rows["click"])), np.arange(total - len(rows["click"]), total)
            buffer.append(rows)
            have += len(rows["click"])
            if have >= 2 * max_rows:
                pool = concat(buffer)
                best = np.argpartition(pool["_key"], max_rows - 1)[:max_rows]
                buffer, have = [{k: v[best] for k, v in pool.items()}], max_rows
            continue
        buffer.append(rows)
        have += len(rows["click"])
        while have >= batch_size:  # no sample: embed as the split streams by
            pool = concat(buffer)
            flush({k: v[:batch_size] for k, v in pool.items()})
            buffer, have = [{k: v[batch_size:] for k, v in pool.items()}], have - batch_size
    if not total:
        raise ValueError(f"the {split} split has no clicked impressions to evaluate retrieval on")
    if buffer:
        pool = concat(buffer)
        if max_rows:
            if have > max_rows:
                pool = {k: v[np.argpartition(pool["_key"], max_rows - 1)[:max_rows]] for k, v in pool.items()}
            order = np.argsort(pool.pop("_pos"))  # storage order
            pool = {k: v[order] for k, v in pool.items() if k != "_key"}
        for s in range(0, len(pool["click"]), batch_size):
            flush({k: v[s:s + batch_size] for k, v in pool.items()})
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["num_clicked_in_split"] = np.asarray(total)
    return out


def hit_rates(top_ids_BxK: np.ndarray, target_B: np.ndarray, ks) -> dict[str, float]:
    hit = top_ids_BxK == target_B[:, None]
    return {str(k): float(hit[:, :k].any(1).mean()) for k in ks}


def overlap_counts(approx_BxK: np.ndarray, exact_BxK: np.ndarray) -> np.ndarray:
    """int[B]: how many entries of each approx row are in the same exact row, -1 padding ignored.
    Entries are store rows (non-negative ints). Each row is shifted into a range of its own, so the
    row-sorted exact rows form one sorted array and one `searchsorted` tests every approx entry:
    O(B K log K) time, O(B K) memory."""
    approx_BxK, exact_BxK = np.asarray(approx_BxK, np.int64), np.asarray(exact_BxK, np.int64)
    B = len(approx_BxK)
    if B == 0 or approx_BxK.size == 0 or exact_BxK.size == 0:
        return np.zeros(B, np.int64)
    span = int(max(approx_BxK.max(), exact_BxK.max())) + 2  # span - 1: a pad no real entry equals
    offset = np.arange(B, dtype=np.int64)[:, None] * span
    flat = np.sort(np.where(exact_BxK >= 0, exact_BxK, span - 1) + offset, axis=1).ravel()
    a = approx_BxK + offset
    pos = np.minimum(np.searchsorted(flat, a), len(flat) - 1)
    return ((flat[pos] == a) & (approx_BxK >= 0)).sum(1)


def recall_vs_exact(approx_BxK: np.ndarray, exact_BxK: np.ndarray, ks) -> dict[str, float]:
    """|approx top-k ∩ exact top-k| / k per query, averaged (k capped by the most exact results
    any query has, for catalogues or audiences smaller than k)."""
    out = {}
    for k in ks:
        a, e = approx_BxK[:, :k], exact_BxK[:, :k]
        out[str(k)] = float(overlap_counts(a, e).mean() / max(min(k, (e >= 0).sum(1).max()), 1))
    return out


def _oracle_hit_rates(trained, placement: str, split: str, q: dict, ad_ids: np.ndarray, ks) -> dict[str, float] | None:
    """Hit rate at each K of the top-K ads by true p_click per impression, or None when the data
    is not the synthetic world."""
    config = trained.config
    if config.data.source != "synthetic":
        return None

    world = World(config.synthetic, trained.spec)
    num = int(config.synthetic.impressions[split])
    in_world = (ad_ids >= 0) & (ad_ids < world.num_ads)
    ranked_ids = ad_ids[in_world]  # rank only ads that are in the index
    kmax = max(ks)
    hits = {k: np.zeros(len(q["ad_id"]), bool) for k in ks}
    step = max(1, min(256, (1 << 24) // max(world.num_ads, 1)))  # oracle logits held at once: <= 16M
    for s in tqdm(range(0, len(q["ad_id"]), step), desc="oracle", leave=False):
        logits = world.oracle_click_logits(placement, split, num, q["impression_id"][s:s + step])
        logits = logits[:, ranked_ids]
        kk = min(kmax, logits.shape[1])
        top, _ = _top_k(logits, kk)  # argpartition, then sort only the top kk
        top_ids = ranked_ids[top]
        for k in ks:
            hits[k][s:s + step] = (top_ids[:, :k] == q["ad_id"][s:s + step, None]).any(1)
    return {str(k): float(hits[k].mean()) for k in ks}


def evaluate(trained, index_dir: str | os.PathLike, split: str = "test", ks=KS,
             max_queries: int | None = 20_000, settings: RetrievalSettings | None = None,
             seed: int = SAMPLE_SEED, chunk: int = CHUNK, allow_other_run: bool = False) -> dict[str, Any]:
    """Compute the report above, write it to `<index_dir>/retrieval_eval.json`, return it.
    `settings` changes search-time knobs (default: those the index was built with); at most
    `max_queries` clicked impressions, a random sample drawn with `seed`, are searched `chunk`
    at a time. An index of another training run is refused unless `allow_other_run`."""
    retriever = Retriever.load(index_dir, trained, settings, allow_other_run=allow_other_run)
    index = retriever.index
    placement = trained.config.data.placements[0]
    q = clicked_queries(trained, placement, split, max_rows=max_queries, seed=seed)
    Q = retriever.query_embeddings(q["e_user"], q["e_context"])
    B, kmax, ids = len(Q), max(ks), index.store.ad_ids
    to_ids = lambda rows: np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    country, device = q.get("user.country"), q.get("user.device_type")
    overlap = {k: np.zeros(B, np.int64) for k in ks}
    exact_found = {k: 0 for k in ks}  # the most exact results any query has at K
    hit = {name: {k: np.zeros(B, bool) for k in ks} for name in ("exact", "index", "targeted")}
    for s in tqdm(range(0, B, chunk), desc="retrieve-eval search", leave=False):
        Qc, clicked = Q[s:s + chunk], q["ad_id"][s:s + chunk]
        exact_rows, _ = index.exact(Qc, kmax)
        exact_ids = to_ids(exact_rows)
        eligibility = Eligibility(country=None if country is None else country[s:s + chunk],
                                  device=None if device is None else device[s:s + chunk], placement=placement)
        for k in ks:
            approx = index.search(Qc, k)[0]  # one search per K, as serving would ask (leaves visited depend on K)
            overlap[k][s:s + chunk] = overlap_counts(approx, exact_rows[:, :k])
            exact_found[k] = max(exact_found[k], int((exact_rows[:, :k] >= 0).sum(1).max()))
            hit["exact"][k][s:s + chunk] = (exact_ids[:, :k] == clicked[:, None]).any(1)
            hit["index"][k][s:s + chunk] = (to_ids(approx) == clicked[:, None]).any(1)
            targeted = to_ids(retriever.search_rows(Qc, k, eligibility)[0])  # rows only: no embedding gather
            hit["targeted"][k][s:s + chunk] = (targeted == clicked[:, None]).any(1)
    eligibility = Eligibility(country=country, device=device, placement=placement)
    keys, clicked_rows = eligibility.keys(B), index.rows_of(q["ad_id"])
    uniq, group = np.unique(keys, axis=0, return_inverse=True)
    allowed = np.zeros(B, bool)
    for g, key in enumerate(uniq):
        members = np.flatnonzero(group.reshape(-1) == g)
        mask = targeting_lib.eligible_mask(index.store.targeting, key)
        allowed[members] = (clicked_rows[members] >= 0) & mask[np.maximum(clicked_rows[members], 0)]
    rate = lambda name: {str(k): float(hit[name][k].mean()) for k in ks}
    report: dict[str, Any] = {
        "split": split, "placement": placement, "num_clicked_impressions": int(B),
        "num_clicked_in_split": int(q["num_clicked_in_split"]), "sample_seed": seed,
        "num_ads": len(index), "index_mode": index.mode, "num_leaves": index.manifest["num_leaves"],
        "leaves_to_search_at_k": {str(k): index.settings.search_leaves(index.manifest["num_leaves"], k, len(index))
                                  if index.mode == "scann" else 0 for k in ks},
        "reorder_at_k": {str(k): index.settings.reorder(k) if index.mode == "scann" else 0 for k in ks},
        "model_step": trained.step,
        "index_model_step": index.manifest.get("model_step"),
        "recall_at_k_vs_exact": {str(k): float(overlap[k].mean() / max(min(k, exact_found[k]), 1)) for k in ks},
        "model_hit_rate_at_k": rate("exact"),
        "model_hit_rate_at_k_index": rate("index"),
        "model_hit_rate_at_k_targeted": rate("targeted"),
        "clicked_ad_eligible_fraction": float(allowed.mean()),
        "random_hit_rate_at_k": {str(k): min(1.0, k / max(len(index), 1)) for k in ks},
        "targeting_applied_to_headline": False,
    }
    tuned = index.manifest.get("tuning")
    if tuned:  # `index --target-recall`: the target next to the recall measured here, at the tuned K
        report["index_tuning"] = {key: tuned.get(key) for key in (
            "target_recall", "k", "leaves_to_search", "reorder", "recall_at_k_tuning", "recall_at_k_held_out",
            "qps_batched", "queries")}
    oracle = _oracle_hit_rates(trained, placement, split, q, ids, ks)
    if oracle is not None:
        report["oracle_hit_rate_at_k"] = oracle
    fileio.write_json(Path(index_dir) / REPORT, report)
    return report
