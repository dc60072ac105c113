"""The serving path: request -> user embedding (TTL cache) -> context tower -> retrieve K -> score ->
rank -> top-N.

    ranker = Ranker.load("runs/quickstart", "runs/index")
    answer = ranker.rank({"user_id": 17, "placement": "search", "context": {...}})
    answer["ads"][0]  # {"ad_id", "ecpm", "pctr", "pcvr", "pctcvr", "bid", "quality", "retrieval_score"}

`rank` goes through a `MicroBatcher`: concurrent requests are answered by one batched call of
`rank_batch`, so the context tower, the ANN search and the scorer each run once per group.
Batches are padded to `ServingSettings.batch_buckets` and candidates to `buckets`, and
`warmup()` compiles every shape up front, so nothing compiles while serving.

The ad side of the factorized first fusion layer (a W_a per ad) comes from the export
(`fusion_ad_part_<placement>.npy`) when the index still holds the exported ads, and is computed
once at load time otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pyarrow.parquet as pq

from multitower_jax.serving import requests as requests_lib
from multitower_jax.serving.batcher import MicroBatcher
from multitower_jax.serving.cache import TTLCache
from multitower_jax.serving.scorer import AD_PART_FILE, Scorer, compute_ad_parts, pad_to
from multitower_jax.serving.settings import ServingSettings, bucket_for

log = logging.getLogger(__name__)
STAGES = ("user", "context", "retrieve", "score")


class UserCatalogue:
    """Raw user features by user id (the `users.parquet` catalogue), for cache misses."""

    def __init__(self, path: str | Path, spec):
        from multitower_jax.retrieval.export import _column  # the export's validated column reader

        path = Path(path)
        table = pq.read_table(path, columns=["user_id", *(f"user.{f.name}" for f in spec.features)])
        batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
        self.ids = np.asarray(table.column("user_id").to_numpy(), np.int64)
        self.columns = {f.name: _column(batch, f"user.{f.name}", f, 0, path) for f in spec.features} if batch else {}
        self._order = np.argsort(self.ids)

    def rows(self, user_ids: Sequence[int]) -> np.ndarray:
        """Catalogue rows of `user_ids`; -1 where a user is unknown."""
        ids = np.asarray(user_ids, np.int64)
        sorted_ids = self.ids[self._order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        return np.where(sorted_ids[pos] == ids, self._order[pos], -1) if len(sorted_ids) else np.full(ids.shape, -1)


@dataclasses.dataclass
class StageTimes:
    """Seconds spent per stage over all batches (for `bench serve`)."""

    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    batches: int = 0


class Ranker:
    def __init__(self, trained: Any, retriever: Any, calibration: Any = None,
                 settings: ServingSettings | None = None, users: UserCatalogue | None = None,
                 export_dir: str | Path | None = None):
        self.trained, self.retriever = trained, retriever
        self.settings = settings or ServingSettings.from_config(trained.config)
        self.placements = tuple(trained.config.data.placements)
        self.users = users
        self.scorers = {p: Scorer.from_trained(trained, p, calibration, self.settings) for p in self.placements}
        self.cache = TTLCache(self.settings.cache_ttl_s, self.settings.cache_size)
        self.times = StageTimes()
        # Parameters are arguments, not closed-over constants: XLA would otherwise fold the tables in.
        model = trained.model
        user_tower = jax.jit(lambda params, feats: model.apply({"params": params}, feats, method=model.embed_user))
        self._user_tower = lambda feats: user_tower(trained.params, feats)
        context_towers = {p: jax.jit(lambda params, feats, p=p: model.apply({"params": params}, feats, p,
                                                                             method=model.embed_context))
                          for p in self.placements}
        self._context_towers = {p: (lambda feats, f=f: f(trained.params, feats)) for p, f in context_towers.items()}
        self._transforms = {p: trained.preprocessor(p).transforms for p in self.placements}
        self._export_dir = Path(export_dir) if export_dir else None
        self._ad_parts: dict[str, np.ndarray] = {}
        self._ad_parts_store = None
        self._targeted = True  # does any ad carry a targeting rule? (refreshed with the ad parts)
        self.batcher = MicroBatcher(self.rank_batch, self.settings.max_batch_size,
                                    self.settings.max_wait_ms / 1000.0, name="ranker")

    @classmethod
    def load(cls, workdir: str | Path, index_dir: str | Path, overrides: Sequence[str] = (),
             users_path: str | Path | None = None) -> Ranker:
        """A trained workdir + an index (`multitower index`); `overrides` like --config.serving.top_n=10."""
        from multitower_jax import calibration as calibration_lib
        from multitower_jax import config as config_lib
        from multitower_jax.inference import load_trained
        from multitower_jax.retrieval.retriever import Retriever
        from multitower_jax.serving import settings as settings_lib

        trained = load_trained(workdir)
        if "serving" not in trained.config:  # workdirs trained before config.serving existed
            with trained.config.unlocked():
                trained.config.serving = settings_lib.defaults()
        trained.config = config_lib.apply_overrides(trained.config, overrides)
        settings = ServingSettings.from_config(trained.config)
        retriever = Retriever.load(index_dir, trained)
        if users_path is None:
            default = Path(trained.config.data.dir or Path(workdir) / "data") / "catalogue" / "users.parquet"
            users_path = default if default.is_file() else None
        users = UserCatalogue(users_path, trained.spec.user) if users_path else None
        export_dir = retriever.index.manifest.get("embeddings")
        return cls(trained, retriever, calibration_lib.load(workdir), settings, users, export_dir)

    # -- the ad side of the factorized fusion layer --------------------------------------------
    def ad_parts(self, placement: str) -> np.ndarray:
        """a W_a for every row of the index store: the export's array when it matches the store."""
        store = self.retriever.index.store
        if self._ad_parts_store is not store:  # first call, or the index was upserted / deleted
            self._ad_parts, self._ad_parts_store = {}, store
            self._targeted = bool((store.targeting != np.uint64(0xFFFFFFFFFFFFFFFF)).any())
        if placement not in self._ad_parts:
            self._ad_parts[placement] = self._load_or_compute_ad_parts(placement, store)
        return self._ad_parts[placement]

    def _load_or_compute_ad_parts(self, placement: str, store) -> np.ndarray:
        if self._export_dir is not None:
            path = self._export_dir / AD_PART_FILE.format(placement=placement)
            ids_path = self._export_dir / "ad_ids.npy"
            if path.is_file() and ids_path.is_file() and np.array_equal(np.load(ids_path, mmap_mode="r"),
                                                                         store.ad_ids):
                return np.load(path, mmap_mode="r")
            log.info("%s does not match the index store; computing the fusion ad part", path)
        return compute_ad_parts(self.scorers[placement], store.embeddings)

    # -- the request path ----------------------------------------------------------------------
    def parse(self, request: Mapping[str, Any] | requests_lib.Request, where: str = "request") -> requests_lib.Request:
        if isinstance(request, requests_lib.Request):
            return request
        return requests_lib.parse(request, self.placements, self.settings.top_n, where)

    def rank(self, request: Mapping[str, Any] | requests_lib.Request) -> dict[str, Any]:
        """Answer one request (thread-safe; concurrent calls are micro-batched)."""
        return self.batcher(self.parse(request))

    def rank_batch(self, requests: Sequence[Mapping[str, Any] | requests_lib.Request]) -> list[dict[str, Any]]:
        """Answer a group of requests with one call per stage (per placement)."""
        parsed = [self.parse(r, f"request {i}") for i, r in enumerate(requests)]
        answers: list[dict[str, Any] | None] = [None] * len(parsed)
        for placement in dict.fromkeys(r.placement for r in parsed):
            members = [i for i, r in enumerate(parsed) if r.placement == placement]
            for start in range(0, len(members), self.settings.max_batch_size):
                group = members[start:start + self.settings.max_batch_size]
                for i, answer in zip(group, self._rank_group([parsed[i] for i in group], placement)):
                    answers[i] = answer
        self.times.batches += 1
        return answers  # type: ignore[return-value]

    def _tower_batch(self, tower: str, placement: str, columns: Mapping[str, np.ndarray], n: int) -> dict:
        """Raw columns of n rows -> model inputs padded to the batch bucket."""
        rows = bucket_for(n, self.settings.batch_buckets, "requests")
        transforms = self._transforms[placement][tower]
        return {name: pad_to(transforms[name](col), rows) for name, col in columns.items()}

    def _user_embeddings(self, reqs: Sequence[requests_lib.Request], placement: str) -> np.ndarray:
        spec = self.trained.spec.user
        keys = [r.user_id if r.user_id is not None else ("anonymous", i) for i, r in enumerate(reqs)]

        def compute(missing: list[int]) -> np.ndarray:
            rows, wheres = [], []
            catalogue_rows = (self.users.rows([reqs[i].user_id if reqs[i].user_id is not None else -1
                                               for i in missing]) if self.users is not None else None)
            for j, i in enumerate(missing):
                r = reqs[i]
                if r.user is not None:
                    rows.append(r.user)
                elif catalogue_rows is not None and catalogue_rows[j] >= 0:
                    row = int(catalogue_rows[j])
                    rows.append({name: col[row] for name, col in self.users.columns.items()})
                else:
                    raise requests_lib.RequestError(
                        f"request: user_id {r.user_id} is not cached and not in the users catalogue; "
                        "send its raw features as \"user\"")
                wheres.append("request.user")
            columns = requests_lib.tower_columns(spec, rows, wheres)
            feats = self._tower_batch("user", placement, columns, len(rows))
            return np.asarray(self._user_tower(feats))[: len(rows)]

        return self.cache.get_many(keys, compute)

    def _rank_group(self, reqs: Sequence[requests_lib.Request], placement: str) -> list[dict[str, Any]]:
        from multitower_jax.retrieval.targeting import Eligibility

        t0 = time.perf_counter()
        n, s = len(reqs), self.settings
        e_user = self._user_embeddings(reqs, placement)
        t1 = time.perf_counter()
        columns = requests_lib.tower_columns(self.trained.spec.context(placement), [r.context for r in reqs],
                                             ["request.context"] * n)
        e_ctx = np.asarray(self._context_towers[placement](self._tower_batch("context", placement, columns, n)))[:n]
        t2 = time.perf_counter()
        q = self.retriever.query_embeddings(e_user, e_ctx)
        ad_parts = self.ad_parts(placement)
        eligibility = None  # an untargeted catalogue skips the per-request pass over every ad's bitset
        if self._targeted:
            unfiltered = -2  # Eligibility's "do not filter on this attribute"
            eligibility = Eligibility(
                country=np.array([unfiltered if r.country is None else r.country for r in reqs]),
                device=np.array([unfiltered if r.device_type is None else r.device_type for r in reqs]),
                placement=placement)
        cands = self.retriever.search(q, s.num_candidates, eligibility)
        rows = np.maximum(cands.rows, 0)
        part = np.where(cands.valid[..., None], ad_parts[rows.reshape(-1)].reshape(*rows.shape, -1), 0.0)
        t3 = time.perf_counter()
        bb, nb = bucket_for(n, s.batch_buckets, "requests"), bucket_for(cands.rows.shape[1], s.buckets)
        out = self.scorers[placement].score_padded(
            pad_to(e_user, bb), pad_to(e_ctx, bb), pad_to(cands.embeddings, bb, nb), pad_to(part, bb, nb),
            pad_to(cands.bid, bb, nb), pad_to(cands.quality, bb, nb), pad_to(cands.valid, bb, nb))
        out = jax.device_get(out)
        t4 = time.perf_counter()
        for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.times.seconds[stage] += dt
        answers = []
        for i, r in enumerate(reqs):
            top = out["top_index"][i, : r.top_n or s.top_n]
            ads = []
            for j in top:
                if not np.isfinite(out["top_ecpm"][i, len(ads)]):
                    break  # fewer eligible candidates than top_n
                ad = {"ad_id": int(cands.ad_ids[i, j]), "ecpm": float(out["ecpm"][i, j]),
                      "pctr": float(out["pctr"][i, j])}
                for key in ("pcvr", "pctcvr"):
                    if key in out:
                        ad[key] = float(out[key][i, j])
                ad.update(bid=float(cands.bid[i, j]), quality=float(cands.quality[i, j]),
                          retrieval_score=float(cands.scores[i, j]))
                ads.append(ad)
            answers.append({"placement": placement, "user_id": r.user_id,
                            "num_candidates": int(cands.valid[i].sum()), "ads": ads})
        return answers

    def warmup(self) -> None:
        """Compile every (batch bucket x candidate bucket) the path can hit, before serving."""
        s = self.settings
        k_bucket = bucket_for(s.num_candidates, s.buckets)
        d = self.trained.embed_dim
        from multitower_jax.models.model import dummy_features

        for placement in self.placements:
            scorer = self.scorers[placement]
            h = scorer.spec.fusion_hidden[0]
            for b in s.batch_buckets:
                self._user_tower(dummy_features(self.trained.spec.user, b))
                self._context_towers[placement](dummy_features(self.trained.spec.context(placement), b))
                z = np.zeros((b, k_bucket), np.float32)
                scorer.score_padded(np.zeros((b, d), np.float32), np.zeros((b, d), np.float32),
                                    np.zeros((b, k_bucket, d), np.float32), np.zeros((b, k_bucket, h), np.float32),
                                    z, z, np.zeros((b, k_bucket), bool))
            self.ad_parts(placement)

    def close(self) -> None:
        self.batcher.close()
