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
The synthetic generator does not restrict impressions by targeting, so the headline hit rates ignore
targeting; the `_targeted` figure shows what serving with targeting would keep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from multitower_jax.data import pipeline
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.retriever import Eligibility, Retriever
from multitower_jax.retrieval.settings import RetrievalSettings

KS = (10, 100, 500)
REPORT = "retrieval_eval.json"


def clicked_queries(trained, placement: str, split: str, batch_size: int = 512,
                    max_rows: int | None = None) -> dict[str, np.ndarray]:
    """E_user and E_context (and ids, p_click, targeting keys) of the clicked impressions of a split."""
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

    buffer: list[dict] = []
    have = 0
    for block in pipeline.raw_blocks(source, progress=f"retrieve-eval {split}"):
        clicked = block["click"] > 0
        if clicked.any():
            buffer.append({k: v[clicked] for k, v in block.items()})
            have += int(clicked.sum())
        while have >= batch_size:
            rows = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
            flush({k: v[:batch_size] for k, v in rows.items()})
            buffer, have = [{k: v[batch_size:] for k, v in rows.items()}], have - batch_size
        if max_rows and sum(len(p) for p in parts.get("ad_id", [])) >= max_rows:
            break
    if have:
        flush({k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]})
    if not parts:
        raise ValueError(f"the {split} split has no clicked impressions to evaluate retrieval on")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return {k: v[:max_rows] for k, v in out.items()} if max_rows else out


def hit_rates(top_ids_BxK: np.ndarray, target_B: np.ndarray, ks) -> dict[str, float]:
    hit = top_ids_BxK == target_B[:, None]
    return {str(k): float(hit[:, :k].any(1).mean()) for k in ks}


def recall_vs_exact(approx_BxK: np.ndarray, exact_BxK: np.ndarray, ks) -> dict[str, float]:
    out = {}
    for k in ks:
        a, e = approx_BxK[:, :k], exact_BxK[:, :k]
        inter = (a[:, :, None] == e[:, None, :]).any(2) & (a >= 0)
        out[str(k)] = float(inter.sum(1).mean() / max(min(k, (e >= 0).sum(1).max()), 1))
    return out


def _oracle_ids(trained, placement: str, split: str, q: dict, ad_ids: np.ndarray, k: int) -> np.ndarray | None:
    """Top-k ad ids by true p_click per impression, or None when the data is not the synthetic world."""
    config = trained.config
    if config.data.source != "synthetic":
        return None
    from multitower_jax.data.synthetic import World

    world = World(config.synthetic, trained.spec)
    num = int(config.synthetic.impressions[split])
    in_world = (ad_ids >= 0) & (ad_ids < world.num_ads)
    out = np.full((len(q["ad_id"]), k), -1, np.int64)
    for s in tqdm(range(0, len(out), 256), desc="oracle", leave=False):
        logits = world.oracle_click_logits(placement, split, num, q["impression_id"][s:s + 256])
        logits = logits[:, ad_ids[in_world]]  # rank only ads that are in the index
        kk = min(k, logits.shape[1])
        top = np.argsort(-logits, axis=1)[:, :kk]
        out[s:s + 256, :kk] = ad_ids[in_world][top]
    return out


def evaluate(trained, index_dir: str | os.PathLike, split: str = "test", ks=KS,
             max_queries: int | None = 20_000, settings: RetrievalSettings | None = None) -> dict[str, Any]:
    """Compute the report above, write it to `<index_dir>/retrieval_eval.json`, return it.
    `settings` changes search-time knobs (default: those the index was built with)."""
    retriever = Retriever.load(index_dir, trained, settings)
    index = retriever.index
    placement = trained.config.data.placements[0]
    q = clicked_queries(trained, placement, split, max_rows=max_queries)
    Q = retriever.query_embeddings(q["e_user"], q["e_context"])
    kmax = max(ks)
    ids = index.store.ad_ids
    exact_rows, _ = index.exact(Q, kmax)
    to_ids = lambda rows: np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    # One search per K, as serving would ask (the number of leaves visited depends on K).
    approx = {k: index.search(Q, k)[0] for k in ks}
    eligibility = Eligibility(country=q.get("user.country"), device=q.get("user.device_type"), placement=placement)
    targeted = {k: retriever.search(Q, k, eligibility).ad_ids for k in ks}
    keys, clicked_rows = eligibility.keys(len(Q)), index.rows_of(q["ad_id"])
    uniq, group = np.unique(keys, axis=0, return_inverse=True)
    allowed = np.zeros(len(Q), bool)
    for g, key in enumerate(uniq):
        members = np.flatnonzero(group.reshape(-1) == g)
        mask = targeting_lib.eligible_mask(index.store.targeting, key)
        allowed[members] = (clicked_rows[members] >= 0) & mask[np.maximum(clicked_rows[members], 0)]
    report: dict[str, Any] = {
        "split": split, "placement": placement, "num_clicked_impressions": int(len(Q)),
        "num_ads": len(index), "index_mode": index.mode, "num_leaves": index.manifest["num_leaves"],
        "leaves_to_search_at_k": {str(k): index.settings.search_leaves(index.manifest["num_leaves"], k, len(index))
                                  if index.mode == "scann" else 0 for k in ks},
        "model_step": trained.step,
        "recall_at_k_vs_exact": {str(k): recall_vs_exact(approx[k], exact_rows, [k])[str(k)] for k in ks},
        "model_hit_rate_at_k": hit_rates(to_ids(exact_rows), q["ad_id"], ks),
        "model_hit_rate_at_k_index": {str(k): hit_rates(to_ids(approx[k]), q["ad_id"], [k])[str(k)] for k in ks},
        "model_hit_rate_at_k_targeted": {str(k): hit_rates(targeted[k], q["ad_id"], [k])[str(k)] for k in ks},
        "clicked_ad_eligible_fraction": float(allowed.mean()),
        "random_hit_rate_at_k": {str(k): min(1.0, k / max(len(index), 1)) for k in ks},
        "targeting_applied_to_headline": False,
    }
    oracle = _oracle_ids(trained, placement, split, q, ids, kmax)
    if oracle is not None:
        report["oracle_hit_rate_at_k"] = hit_rates(oracle, q["ad_id"], ks)
    path = Path(index_dir) / REPORT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return report
