"""The serving path: request -> user embedding (TTL cache) -> context tower -> retrieve K -> score ->
rank -> top-N.

    ranker = Ranker.load("runs/quickstart", "runs/index")
    answer = ranker.rank({"user_id": 17, "placement": "search", "context": {...}})
    answer["ads"][0]  # {"ad_id", "ecpm", "pctr", "pcvr", "pctcvr", "bid", "quality", "retrieval_score"}

`rank` first validates its request on the caller's thread (`prepare`: parse, raw features ->
columns, user embedding from the cache or the features to compute it from), so a bad request
fails alone, with an error naming its field, and never joins a batch. Then it goes through a
`MicroBatcher`: concurrent requests are answered by one batched call of `rank_batch`, so the user
tower (for the cache misses), the context tower, the ANN search and the scorer each run once per
group. Batches are padded to `ServingSettings.batch_buckets` and candidates to `buckets`, and
`warmup()` compiles every shape up front, so nothing compiles while serving.

User embeddings are cached by `user_id`, together with the user's targeting keys (`country`,
`device_type` from the features the embedding was computed from: the request's `user` or the
users catalogue row), so a request with only a `user_id` is still filtered by the user's
targeting. Requests without a `user_id` are never cached. A request's own `country` /
`device_type` win; a key that is known from nowhere counts as unknown (only ads unrestricted on
that attribute qualify), never as "do not filter".

The ad side of the factorized first fusion layer (a W_a per ad) comes from the export
(`fusion_ad_part_<placement>.npy`) when the index still holds the exported ads, and is computed
once at load time otherwise. With the store's embeddings, bids and qualities it is put on the
device once per placement (`scorer.device_catalogue`; again after the index changes), so a
request hands the scorer only its candidates' rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pyarrow.parquet as pq

from multitower_jax import calibration as calibration_lib
from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.data.catalogue_columns import read_column
from multitower_jax.inference import load_trained
from multitower_jax.models.model import dummy_features
from multitower_jax.retrieval.retriever import Retriever
from multitower_jax.retrieval.targeting import Eligibility
from multitower_jax.serving import requests as requests_lib
from multitower_jax.serving import settings as settings_lib
from multitower_jax.serving.batcher import MicroBatcher
from multitower_jax.serving.cache import TTLCache
from multitower_jax.serving.scorer import (AD_PART_FILE, AdCatalogue, Scorer, compute_ad_parts, device_catalogue,
                                            pad_to)
from multitower_jax.serving.settings import ServingSettings, bucket_for

log = logging.getLogger(__name__)
STAGES = ("user", "context", "retrieve", "score")


class UserCatalogue:
    """Raw user features by user id (the `users.parquet` catalogue), for cache misses."""

    def __init__(self, path: str | Path, spec):
        path = Path(path)
        table = pq.read_table(path, columns=["user_id", *(f"user.{f.name}" for f in spec.features)])
        batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
        self.ids = np.asarray(table.column("user_id").to_numpy(), np.int64)
        self.columns = ({f.name: read_column(batch, f"user.{f.name}", f, 0, path) for f in spec.features}
                        if batch else {})
        self._order = np.argsort(self.ids)

    def rows(self, user_ids: Sequence[int]) -> np.ndarray:
        """Catalogue rows of `user_ids`; -1 where a user is unknown."""
        ids = np.asarray(user_ids, np.int64)
        sorted_ids = self.ids[self._order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        return np.where(sorted_ids[pos] == ids, self._order[pos], -1) if len(sorted_ids) else np.full(ids.shape, -1)


TARGETING_FEATURES = (("country", "country"), ("device_type", "device"))  # user feature -> Eligibility field
UNKNOWN = -1  # Eligibility's "unknown": only ads unrestricted on the attribute qualify


class CachedUser(NamedTuple):
    """A user-cache entry: the embedding and the targeting keys of the features it came from."""

    embedding: np.ndarray  # float32[D]
    country: int | None
    device: int | None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated request with its raw features converted, ready to join a batch (`Ranker.prepare`)."""

    request: requests_lib.Request
    context: dict[str, np.ndarray]  # raw storage columns of the context features, one row
    cached: CachedUser | None  # the cache entry, when the user was cached at prepare time
    user: dict[str, np.ndarray] | None  # otherwise: raw user columns (one row) to compute it from
    user_keys: tuple[int | None, int | None]  # the user's own (country, device), cached with the embedding
    country: int  # the request's targeting keys (UNKNOWN when known from nowhere)
    device: int


def _targeting_keys(spec, columns: Mapping[str, np.ndarray]) -> tuple[int | None, int | None]:
    """(country, device) from one row of raw user columns: the raw ids of `user.country` and
    `user.device_type` (what ads' targeting lists hold), when the spec has them as id features."""
    by_name = {f.name: f for f in spec.features}
    out = []
    for name, _ in TARGETING_FEATURES:
        f = by_name.get(name)
        ok = isinstance(f, F.Categorical) and f.encoding == "ids" and name in columns
        out.append(int(np.asarray(columns[name]).reshape(-1)[0]) if ok else None)
    return out[0], out[1]


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
        # They are put on the device once: host (numpy) parameters would be copied in on every
        # call, ~1.2 ms of the context tower's 1.4 ms for a lone request.
        model, params = trained.model, jax.device_put(trained.params)
        user_tower = jax.jit(lambda params, feats: model.apply({"params": params}, feats, method=model.embed_user))
        self._user_tower = lambda feats: user_tower(params, feats)
        # (E_context, the context's logit offsets or None: `MultiTowerModel.embed_context_wide`)
        context_towers = {p: jax.jit(lambda params, feats, p=p: model.apply({"params": params}, feats, p,
                                                                             method=model.embed_context_wide))
                          for p in self.placements}
        self._context_towers = {p: (lambda feats, f=f: f(params, feats)) for p, f in context_towers.items()}
        self._transforms = {p: trained.preprocessor(p).transforms for p in self.placements}
        self._export_dir = Path(export_dir) if export_dir else None
        self._catalogues: dict[str, AdCatalogue] = {}  # per placement, on the device
        self._store = None  # the index store the catalogues were built from (`_sync_store`)
        self._targeted = True  # does any ad carry a targeting rule? (refreshed with the store)
        self.batcher = MicroBatcher(lambda items: self.rank_batch(items, return_exceptions=True),
                                    self.settings.max_batch_size, self.settings.max_wait_ms / 1000.0,
                                    name="ranker")

    @classmethod
    def load(cls, workdir: str | Path, index_dir: str | Path, overrides: Sequence[str] = (),
             users_path: str | Path | None = None, allow_other_run: bool = False) -> Ranker:
        """A trained workdir + an index (`multitower index`); `overrides` like --config.serving.top_n=10.
        An index or calibration of another training run is refused unless `allow_other_run`."""
        trained = load_trained(workdir)
        if "serving" not in trained.config:  # workdirs trained before config.serving existed
            with trained.config.unlocked():
                trained.config.serving = settings_lib.defaults()
        trained.config = config_lib.apply_overrides(trained.config, overrides)
        settings = ServingSettings.from_config(trained.config)
        retriever = Retriever.load(index_dir, trained, allow_other_run=allow_other_run)
        if users_path is None:
            default = Path(trained.config.data.dir or Path(workdir) / "data") / "catalogue" / "users.parquet"
            users_path = default if default.is_file() else None
        users = UserCatalogue(users_path, trained.spec.user) if users_path else None
        export_dir = retriever.index.manifest.get("embeddings")
        return cls(trained, retriever, calibration_lib.load(workdir, allow_other_run=allow_other_run), settings, users,
                   export_dir)

    # -- the ad side of the factorized fusion layer --------------------------------------------
    def _sync_store(self) -> Any:
        """The index store; on its first use, or after live upserts / deletes replaced it, the
        device catalogues are dropped and the targeting flag is recomputed."""
        store = self.retriever.index.store
        if self._store is not store:
            self._catalogues, self._store = {}, store
            self._targeted = bool((store.targeting != np.uint64(0xFFFFFFFFFFFFFFFF)).any())
        return store

    def ad_parts(self, placement: str) -> np.ndarray:
        """a W_a for every row of the index store: the export's array (memory-mapped) when it
        matches the store, else computed (on each call: serving keeps only `catalogue`'s copy)."""
        store = self.retriever.index.store
        if self._export_dir is not None:
            path = self._export_dir / AD_PART_FILE.format(placement=placement)
            ids_path = self._export_dir / "ad_ids.npy"
            if path.is_file() and ids_path.is_file() and np.array_equal(np.load(ids_path, mmap_mode="r"),
                                                                         store.ad_ids):
                return np.load(path, mmap_mode="r")
            log.info("%s does not match the index store; computing the fusion ad part", path)
        return compute_ad_parts(self.scorers[placement], store.embeddings)

    def catalogue(self, placement: str) -> AdCatalogue:
        """The index store's ads as the scorer gathers them, on the device (refreshed with the store)."""
        store = self._sync_store()
        if placement not in self._catalogues:
            self._catalogues[placement] = device_catalogue(AdCatalogue(store.embeddings, self.ad_parts(placement),
                                                                       store.bid, store.quality))
        return self._catalogues[placement]

    # -- the request path ----------------------------------------------------------------------
    def parse(self, request: Mapping[str, Any] | requests_lib.Request, where: str = "request") -> requests_lib.Request:
        if isinstance(request, requests_lib.Request):
            return request
        return requests_lib.parse(request, self.placements, self.settings.top_n, where)

    def prepare(self, request: Mapping[str, Any] | requests_lib.Request | Prepared,
                where: str = "request") -> Prepared:
        """Validate one request and convert its raw features; RequestError names the bad field
        (and the request file, for requests read by `requests.load`)."""
        if isinstance(request, Prepared):
            return request
        r = self.parse(request, where)
        context = requests_lib.tower_columns(self.trained.spec.context(r.placement), [r.context],
                                             [f"{r.where}.context"])
        spec = self.trained.spec.user
        cached = self.cache.get(r.user_id) if r.user_id is not None else None
        user = None
        if cached is not None:
            user_keys = (cached.country, cached.device)
        elif r.user is not None:  # (the features of a cached user are not read)
            user = requests_lib.tower_columns(spec, [r.user], [f"{r.where}.user"])
            user_keys = _targeting_keys(spec, user)
        else:
            row = int(self.users.rows([r.user_id])[0]) if self.users is not None else -1
            if row < 0:
                raise requests_lib.RequestError(
                    f"{r.where}.user_id: user_id {r.user_id} is not cached and not in the users catalogue; "
                    "send its raw features as \"user\"")
            user = {name: col[row:row + 1] for name, col in self.users.columns.items()}
            user_keys = _targeting_keys(spec, user)
        country = r.country if r.country is not None else user_keys[0]
        device = r.device_type if r.device_type is not None else user_keys[1]
        return Prepared(r, context, cached, user, user_keys, UNKNOWN if country is None else country,
                        UNKNOWN if device is None else device)

    def rank(self, request: Mapping[str, Any] | requests_lib.Request) -> dict[str, Any]:
        """Answer one request (thread-safe; concurrent calls are micro-batched). A bad request
        raises RequestError here, before it joins a batch, so it cannot fail anyone else's."""
        return self.batcher(self.prepare(request))

    def rank_batch(self, requests: Sequence[Mapping[str, Any] | requests_lib.Request | Prepared],
                   return_exceptions: bool = False) -> list[Any]:
        """Answer a group of requests with one call per stage (per placement).

        A bad request raises its RequestError; with `return_exceptions` its slot holds the error
        instead and the others are answered (what the micro-batcher hands each caller)."""
        answers: list[Any] = [None] * len(requests)
        prepared: dict[int, Prepared] = {}
        for i, r in enumerate(requests):
            try:
                prepared[i] = self.prepare(r, f"request {i}")
            except requests_lib.RequestError as e:
                if not return_exceptions:
                    raise
                answers[i] = e
        for placement in dict.fromkeys(p.request.placement for p in prepared.values()):
            members = [i for i, p in prepared.items() if p.request.placement == placement]
            for start in range(0, len(members), self.settings.max_batch_size):
                group = members[start:start + self.settings.max_batch_size]
                for i, answer in zip(group, self._rank_group([prepared[i] for i in group], placement)):
                    answers[i] = answer
        self.times.batches += 1
        return answers

    def _tower_batch(self, tower: str, placement: str, columns: Mapping[str, np.ndarray], n: int) -> dict:
        """Raw columns of n rows -> model inputs padded to the batch bucket."""
        rows = bucket_for(n, self.settings.batch_buckets, "requests")
        transforms = self._transforms[placement][tower]
        return {name: pad_to(transforms[name](col), rows) for name, col in columns.items()}

    @staticmethod
    def _concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _user_embeddings(self, preps: Sequence[Prepared], placement: str) -> np.ndarray:
        """Cached rows as they were at prepare time; the rest through one user-tower call (a user
        twice in the group is computed once), then cached. Requests without a user_id are not."""
        out = np.empty((len(preps), self.trained.embed_dim), np.float32)
        keys = [p.request.user_id if p.request.user_id is not None else ("anonymous", i) for i, p in enumerate(preps)]
        owner: dict[Any, int] = {}  # cache key (or ("anonymous", i)) -> row of the tower batch
        todo: list[int] = []
        for i, p in enumerate(preps):
            if p.cached is not None:
                out[i] = p.cached.embedding
            elif keys[i] not in owner:
                owner[keys[i]] = len(todo)
                todo.append(i)
        if todo:
            feats = self._tower_batch("user", placement, self._concat([preps[i].user for i in todo]), len(todo))
            computed = np.asarray(self._user_tower(feats))[: len(todo)]
            for i, p in enumerate(preps):
                if p.cached is None:
                    out[i] = computed[owner[keys[i]]]
            for key, row in owner.items():
                if not isinstance(key, tuple):  # a user_id: cache it with its targeting keys
                    self.cache.put(key, CachedUser(computed[row].copy(), *preps[todo[row]].user_keys))
        return out

    def _rank_group(self, preps: Sequence[Prepared], placement: str) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        n, s = len(preps), self.settings
        reqs = [p.request for p in preps]
        e_user = self._user_embeddings(preps, placement)
        t1 = time.perf_counter()
        columns = self._concat([p.context for p in preps])
        e_ctx, offsets = self._context_towers[placement](self._tower_batch("context", placement, columns, n))
        e_ctx = np.asarray(e_ctx)[:n]
        offsets = None if offsets is None else np.asarray(offsets)[:n]
        t2 = time.perf_counter()
        q = self.retriever.query_embeddings(e_user, e_ctx)
        catalogue = self.catalogue(placement)  # (refreshes the targeting flag with the store)
        eligibility = None  # an untargeted catalogue skips the per-request pass over every ad's bitset
        if self._targeted:
            eligibility = Eligibility(country=np.array([p.country for p in preps]),
                                      device=np.array([p.device for p in preps]), placement=placement)
        rows, scores = self.retriever.search_rows(q, s.num_candidates, eligibility)
        t3 = time.perf_counter()
        store = self.retriever.index.store
        # The compiled call gathers the candidates from the device catalogue; only the top-N rows
        # of each request come back.
        out = self.scorers[placement].score_rows(e_user, e_ctx, rows, catalogue, offsets)
        t4 = time.perf_counter()
        for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.times.seconds[stage] += dt
        answers = []
        for i, r in enumerate(reqs):
            ads = []
            for rank, j in enumerate(out["top_index"][i, : r.top_n or s.top_n]):
                if not np.isfinite(out["top_ecpm"][i, rank]):
                    break  # fewer eligible candidates than top_n
                row = int(rows[i, j])
                ad = {"ad_id": int(store.ad_ids[row]), "ecpm": float(out["top_ecpm"][i, rank]),
                      "pctr": float(out["top_pctr"][i, rank])}
                for key in ("pcvr", "pctcvr"):
                    if f"top_{key}" in out:
                        ad[key] = float(out[f"top_{key}"][i, rank])
                ad.update(bid=float(store.bid[row]), quality=float(store.quality[row]),
                          retrieval_score=float(scores[i, j]))
                ads.append(ad)
            answers.append({"placement": placement, "user_id": r.user_id,
                            "num_candidates": int((rows[i] >= 0).sum()), "ads": ads})
        return answers

    def warmup(self) -> None:
        """Compile every (batch bucket x candidate bucket) the path can hit, before serving."""
        s = self.settings
        d = self.trained.embed_dim
        for placement in self.placements:
            scorer, catalogue = self.scorers[placement], self.catalogue(placement)
            for b in s.batch_buckets:
                self._user_tower(dummy_features(self.trained.spec.user, b))
                self._context_towers[placement](dummy_features(self.trained.spec.context(placement), b))
                scorer.score_rows(np.zeros((b, d), np.float32), np.zeros((b, d), np.float32),
                                  np.full((b, s.num_candidates), -1), catalogue)

    def close(self) -> None:
        self.batcher.close()
