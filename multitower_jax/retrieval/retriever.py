"""The query side of retrieval: Q from the user and context towers, top-K eligible ads per query.

    trained = load_trained("runs/quickstart")
    retriever = Retriever.load("runs/index", trained)          # refuses an index of another model
    q_BxD = retriever.query_embeddings(e_user_BxD, e_context_BxD)
    got = retriever.search(q_BxD, k=100, eligibility=Eligibility(country=c_B, device=d_B, placement="search"))
    got.ad_ids, got.scores, got.embeddings, got.bid, got.quality      # [B, K] (embeddings [B, K, D])
    rows, scores = retriever.search_rows(q_BxD, k=100)                  # the same, store rows only

Q follows the rule the retrieval loss was trained with (`train/losses.py: retrieval_logits`):
Q = E_user + E_context, and with `loss.l2_normalize` both Q and E_ad are L2-normalized (cosine).
The logQ correction is a training-time fix for in-batch sampling bias and is not applied here.

Targeting: each distinct (country, device, placement) of a batch gets its eligible fraction
estimated on a fixed sample of ads. Large audiences are searched with ScaNN, over-fetching
k / fraction * overfetch candidates from 1 / fraction times more leaves (one call per
power-of-two sparsity and group of queries small enough to bound the candidates held), and filtered by a bitset test on the candidates only; small audiences,
and any query that comes back with fewer than k ads, are searched exactly over the eligible
rows (one bitset test over the catalogue). So K eligible
ads come back whenever K exist, and the common, unrestricted case pays only the over-fetch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from multitower_jax import run_identity
from multitower_jax.retrieval import targeting as targeting_lib
from multitower_jax.retrieval.index import AdIndex, AdStore, check_compatible, check_model_step, query_rule
from multitower_jax.retrieval.settings import RetrievalSettings
from multitower_jax.retrieval.targeting import Eligibility

__all__ = ["Candidates", "Eligibility", "Retriever"]

_SAMPLE = 8192  # ads sampled to estimate an audience's eligible fraction
_FETCH_BUDGET = 1 << 22  # over-fetched candidates held at once (queries x fetch), ~50 MB of rows and scores


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Top-K per query, best first. Where fewer than K ads qualify, the tail is padding:
    ad_id -1, row -1, score -inf, zero embedding, bid 0, quality 0, valid False."""

    ad_ids: np.ndarray  # int64[B, K]
    scores: np.ndarray  # float32[B, K], the retrieval similarity (cosine or dot product)
    rows: np.ndarray  # int64[B, K], rows of the index store
    embeddings: np.ndarray  # float32[B, K, D], E_ad as the ad tower wrote it (not normalized)
    bid: np.ndarray  # float32[B, K]
    quality: np.ndarray  # float32[B, K]
    valid: np.ndarray  # bool[B, K]


class Retriever:
    """Searches an `AdIndex` with queries built by the training rule, honouring ad targeting."""

    def __init__(self, index: AdIndex, settings: RetrievalSettings | None = None):
        self.index = index
        self.settings = settings or index.settings
        self.l2_normalize = index.l2_normalize
        self.counts = {"queries": 0, "exact_small_eligible": 0, "exact_fallback": 0}

    @classmethod
    def load(cls, index_dir: str | os.PathLike, trained: Any | None = None,
             settings: RetrievalSettings | None = None, allow_other_run: bool = False) -> Retriever:
        """Load an index folder; with `trained` (an `inference.Trained`), check that the index was
        built from that model (fingerprint, embedding dim, query rule) or raise IndexMismatchError,
        and from that training run (`run_identity`: RunMismatchError; `allow_other_run` only warns);
        an index exported from another checkpoint (`model_step`) of the run loads with a StaleIndexWarning."""
        index = AdIndex.load(index_dir, settings)
        if trained is not None:
            check_compatible(index.manifest, fingerprint=trained.fingerprint, embed_dim=trained.embed_dim,
                             rule=query_rule(trained.config.loss.l2_normalize), where=str(index_dir))
            run_identity.check(index.manifest.get("run"), trained.identity, f"index {index_dir}",
                               allow_other_run=allow_other_run)
            check_model_step(index.manifest, trained.step, str(index_dir))
        return cls(index, settings)

    # -- queries -------------------------------------------------------------------------------
    def query_embeddings(self, e_user_BxD, e_context_BxD) -> np.ndarray:
        """Q = E_user + E_context, L2-normalized under the cosine rule: float32[B, D]."""
        q = np.asarray(e_user_BxD, np.float32) + np.asarray(e_context_BxD, np.float32)
        if self.l2_normalize:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q.astype(np.float32)

    # -- search --------------------------------------------------------------------------------
    def search(self, q_BxD, k: int, eligibility: Eligibility | None = None) -> Candidates:
        """Top-k ads per query (ScaNN, or exact where that is needed or cheaper)."""
        return self._gather(*self.search_rows(q_BxD, k, eligibility))

    def search_rows(self, q_BxD, k: int, eligibility: Eligibility | None = None) -> tuple[np.ndarray, np.ndarray]:
        """What `search` finds, as store rows int64[B, k] (-1 pads) and scores float32[B, k], without
        gathering the ads' embeddings and attributes (for callers that need only ids or rows)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q_BxD = np.ascontiguousarray(q_BxD, np.float32)
        if q_BxD.ndim != 2 or q_BxD.shape[1] != self.index.store.embeddings.shape[1]:
            raise ValueError(f"queries must be [B, {self.index.store.embeddings.shape[1]}], got {q_BxD.shape}")
        B = len(q_BxD)
        self.counts["queries"] += B
        if eligibility is None or B == 0:
            return self.index.search(q_BxD, k)
        return self._search_targeted(q_BxD, k, eligibility.keys(B))

    def _exact_eligible(self, q_BxD: np.ndarray, k: int, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = targeting_lib.eligible_mask(self.index.store.targeting, key)
        return self.index.exact(q_BxD, k, np.flatnonzero(mask))

    def _search_targeted(self, q_BxD: np.ndarray, k: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index, n, s = self.index, len(self.index), self.settings
        B = len(q_BxD)
        rows, scores = np.full((B, k), -1, np.int64), np.full((B, k), -np.inf, np.float32)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        # Each audience's eligible fraction, estimated on a fixed sample of ads (a scan of all N ads
        # per distinct audience would cost more than the search).
        sample = index.store.targeting[np.linspace(0, n - 1, min(n, _SAMPLE)).astype(np.int64)]
        frac = np.array([targeting_lib.eligible_mask(sample, key).mean() for key in uniq])
        small = (frac * n <= s.exact_eligible_below) | (index.searcher is None)
        for g in np.flatnonzero(small):  # small audiences: exact search over their ads
            members = np.flatnonzero(inverse == g)
            self.counts["exact_small_eligible"] += len(members)
            rows[members], scores[members] = self._exact_eligible(q_BxD[members], k, uniq[g])
        # Filtering thins every leaf by the eligible fraction, so the eligible top-k spreads over
        # 1 / fraction times more leaves: search that many more, over-fetch that many more
        # candidates. Audiences share one ScaNN call per power-of-two sparsity.
        bucket = np.where(small, -1, np.ceil(np.log2(1.0 / np.maximum(frac, 1.0 / len(sample)))).astype(np.int64))
        num_leaves = index.manifest.get("num_leaves", 0)
        for b in np.unique(bucket[bucket >= 0]):
            sparsity = 2.0 ** b
            fetch = min(n, math.ceil(k * sparsity * s.overfetch))
            leaves = min(num_leaves, math.ceil(s.search_leaves(num_leaves, k, n) * sparsity))
            # The over-fetched candidates of a sparse audience are many per query: a bounded number
            # of queries per ScaNN call keeps them (and ScaNN's own buffers) to a fixed budget.
            step = max(1, _FETCH_BUDGET // fetch)
            bucket_members = np.flatnonzero(bucket[inverse] == b)
            for start in range(0, len(bucket_members), step):
                members = bucket_members[start:start + step]
                self._fetch_and_filter(q_BxD, k, keys, members, fetch, leaves, rows, scores)
        return rows, scores

    def _fetch_and_filter(self, q_BxD: np.ndarray, k: int, keys: np.ndarray, members: np.ndarray, fetch: int,
                          leaves: int, rows: np.ndarray, scores: np.ndarray) -> None:
        """ScaNN top-`fetch` for the queries `members`, filtered by their keys into rows / scores."""
        index = self.index
        got_rows, got_scores = index.search(q_BxD[members], fetch, leaves_to_search=leaves)
        keep = (got_rows >= 0) & targeting_lib.allowed(index.store.targeting[np.maximum(got_rows, 0)],
                                                       keys[members])
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # eligible first, best first
        kept = np.take_along_axis(keep, order, 1)
        got = min(k, fetch)
        rows[members, :got] = np.where(kept, np.take_along_axis(got_rows, order, 1), -1)
        scores[members, :got] = np.where(kept, np.take_along_axis(got_scores, order, 1), -np.inf)
        # Fewer than k came back: the audience is smaller than k, or the over-fetch missed.
        # Exact search over the eligible ads settles both, which keeps the guarantee.
        short = members[kept.sum(1) < k]
        for key in np.unique(keys[short], axis=0):
            redo = short[(keys[short] == key).all(1)]
            self.counts["exact_fallback"] += len(redo)
            rows[redo], scores[redo] = self._exact_eligible(q_BxD[redo], k, key)

    def _gather(self, rows: np.ndarray, scores: np.ndarray) -> Candidates:
        store: AdStore = self.index.store
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        emb = np.where(valid[..., None], np.asarray(store.embeddings)[safe], 0).astype(np.float32)
        return Candidates(
            ad_ids=np.where(valid, store.ad_ids[safe], -1),
            scores=np.where(valid, scores, -np.inf).astype(np.float32),
            rows=np.where(valid, rows, -1), embeddings=emb,
            bid=np.where(valid, store.bid[safe], 0).astype(np.float32),
            quality=np.where(valid, store.quality[safe], 0).astype(np.float32), valid=valid)

    def ads(self, ad_ids) -> AdStore:
        """Embedding, bid, quality and targeting of the given ads (KeyError for unknown ids)."""
        rows = self.index.rows_of(np.asarray(ad_ids, np.int64))
        if (rows < 0).any():
            raise KeyError(f"ad ids not in the index: {np.asarray(ad_ids)[rows < 0][:10].tolist()}")
        return self.index.store.rows(rows)

    # -- live updates (delegated to the index) --------------------------------------------------
    def upsert(self, ads: AdStore) -> None:
        self.index.upsert(ads)

    def delete(self, ad_ids) -> None:
        self.index.delete(ad_ids)
