"""The synthetic world's catalogue (`Catalogue`): topics, vocabulary, ads, users and context tables.

Built once from ``config.synthetic``, each part from its own seeded RNG stream: the latent
topics and categories, the words of titles and queries, the ads (advertiser, brand, topic,
taste, quality, bid, raw feature columns, targeting), the users (demographics, favourite topics,
taste, propensities, raw feature columns; new cold-start users from a stream of their own) and
the context tables (products, filters, query pools). `synthetic.World` draws impressions from
it; the sampling helpers here are shared with it.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from multitower_jax import features as F
from multitower_jax.data import schema

_K = 16  # latent taste dimension
NCAT = 30  # product categories = ad industries
NFAV = 5  # favourite topics per user
_WORDS_PER_TOPIC, _WORDS_PER_CAT, PRODUCTS_PER_TOPIC, QUERIES_PER_POOL = 24, 16, 200, 128
_BUY = ("buy", "deal", "price", "discount", "sale", "cheap", "order", "coupon")
_GENERIC = ("best", "new", "top", "for", "with", "review", "men", "women", "kids", "set",
            "pro", "mini", "large", "small", "black", "white", "premium", "classic", "gift", "online")
_SYLLABLES = np.array([c + v for c in "bcdfghjklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
# Which features the generator knows, and their types, come from the default spec.
_DEFAULT = F.parse_spec(F.default_features())


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def zipf(rng: np.random.Generator, n: int, a: float, size) -> np.ndarray:
    """Indices in [0, n) with P(i) proportional to 1 / (i + 1)^a."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** a)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right"), n - 1)


def topk(rng: np.random.Generator, logits: np.ndarray, k: np.ndarray, width: int) -> np.ndarray:
    """k[i] distinct columns per row, sampled by Gumbel-top-k from softmax(logits); -1 pads."""
    order = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)[:, :width]
    return np.where(np.arange(width) < k[:, None], order, -1)


def _join(vocab: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of word indices (-1 = no word) -> space-joined strings (object array)."""
    words = np.append(vocab, "")[np.where(idx < 0, len(vocab), idx)]
    return np.array([" ".join(w for w in row if w) for row in words.tolist()], dtype=object)


def masked(idx: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.where(np.arange(idx.shape[1]) < k[:, None], idx, -1)


def emit(f: F.Feature, x: np.ndarray) -> np.ndarray:
    """Latent value -> the raw column of a (possibly user-modified) feature spec."""
    if isinstance(f, F.Categorical):
        if f.encoding == "hash":  # a stable 64-bit entity key, salted per feature
            salt = np.uint64(schema.stable_hash64([f.name])[0] & 0x7FFFFFFFFFFFFFFF)
            return schema.mix64(x.astype(np.uint64) ^ salt).view(np.int64)
        return (x % f.size).astype(np.int64)
    if isinstance(f, F.MultiHot):
        x = x[:, : f.max_items]
        x = np.pad(x, ((0, 0), (0, f.max_items - x.shape[1])), constant_values=-1)
        return np.where(x >= 0, x % f.size, -1).astype(np.int64)
    if isinstance(f, F.Text):
        return x.astype(object)
    return x.astype(np.float32)


# Entity ids a spec may add as features (not in the default spec): the user's / the ad's index,
# emitted like any categorical (``ids``: index % size; ``hash``: a salted 64-bit key).
_ID_FEATURES = {"user": "user_id", "ad": "ad_id"}


def _check_tower(spec: F.TowerSpec, known: F.TowerSpec, where: str) -> None:
    for f in spec.features:
        if f.name == _ID_FEATURES.get(where):
            if f.type != "categorical":
                raise ValueError(f"synthetic world: {where}.{f.name} is generated as categorical, "
                                 f"the spec declares {f.type}")
            continue
        if f.name not in known.names:
            can = [*known.names, *([_ID_FEATURES[where]] if where in _ID_FEATURES else [])]
            raise ValueError(f"synthetic world: unknown feature {where}.{f.name!r}; it can generate "
                             f"{can} (drop the feature or use data.source='logs')")
        if known[f.name].type != f.type:
            raise ValueError(f"synthetic world: {where}.{f.name} is generated as {known[f.name].type}, "
                             f"the spec declares {f.type}")


def _new_users(raw) -> tuple[int, float]:
    """``config.synthetic.new_users`` (absent or None: off) -> (number of new users, fraction)."""
    raw = {} if raw is None else raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
    if unknown := sorted(set(raw) - {"num", "fraction"}):
        raise ValueError(f"config.synthetic.new_users: unknown keys {unknown}; expected 'num' and 'fraction'")
    num, fraction = raw.get("num", 0), raw.get("fraction", 0.0)
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"config.synthetic.new_users.num: expected an integer >= 0, got {num!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"config.synthetic.new_users.fraction: expected a number in [0, 1], got {fraction!r}")
    if (num > 0) != (fraction > 0):
        raise ValueError(f"config.synthetic.new_users: num and fraction are both > 0 or both 0 (off), "
                         f"got num={num}, fraction={fraction}")
    return num, float(fraction)


class GroupSampler:
    """Draws items by weight restricted to a per-row group, vectorized (one searchsorted)."""

    def __init__(self, group: np.ndarray, item: np.ndarray, weight: np.ndarray, num_groups: int):
        order = np.lexsort((item, group))
        self.group, self.item, w = group[order], item[order], weight[order].astype(np.float64)
        total = np.bincount(self.group, w, minlength=num_groups)
        counts = np.bincount(self.group, minlength=num_groups)
        frac = (np.cumsum(w) - np.repeat(np.cumsum(total) - total, counts)) / total[self.group]
        frac[np.cumsum(counts)[counts > 0] - 1] = 1.0  # no float round-off past the group end
        self.key, self.empty = self.group + frac, total <= 0

    def sample(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.key, groups + rng.random(len(groups)), side="right")
        return self.item[np.minimum(idx, len(self.key) - 1)]


class Catalogue:
    """The world's entities and their latents, built once from ``config.synthetic``."""

    def __init__(self, syn: ml_collections.ConfigDict, spec: F.FeatureSpec):
        self.spec, self.seed = spec, int(syn.get("seed", 0))
        self.num_new_users, self.new_user_fraction = _new_users(syn.get("new_users"))
        # Users [0, first_new_user) appear in every split; the new ones only in validation and test.
        self.first_new_user = int(syn.num_users)
        self.num_users, self.num_ads = self.first_new_user + self.num_new_users, int(syn.num_ads)
        self.num_advertisers = int(syn.num_advertisers)
        self.num_topics = int(syn.get("num_topics", 100))
        self.ad_zipf = float(syn.get("ad_popularity_exponent", 1.0))
        _check_tower(spec.user, _DEFAULT.user, "user")
        _check_tower(spec.ad, _DEFAULT.ad, "ad")
        for p, ctx in spec.contexts.items():
            _check_tower(ctx, _DEFAULT.context(p), f"context.{p}")
        rng = self._rng(0)
        T = self.num_topics
        self.topic_cat = rng.permutation(T) % NCAT  # topics nest inside categories
        cat_vec = rng.normal(size=(NCAT, _K))
        self.topic_vec = (0.6 * cat_vec[self.topic_cat] + 0.8 * rng.normal(size=(T, _K))) / np.sqrt(_K)
        self.cat_phase = rng.uniform(0, 24, NCAT)  # hour at which an industry's ads click best
        self.dev_camp = rng.normal(0, 0.2, (5, 5))  # device type x campaign type affinity
        self._build_vocab(self._rng(1))
        self._build_ads(self._rng(2))
        self._build_users()
        self._build_context_tables(self._rng(4))

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    # ---------------------------------------------------------------- the catalogue
    def _build_vocab(self, rng: np.random.Generator) -> None:
        n_brands_max = 3 * self.num_advertisers
        need = self.num_topics * _WORDS_PER_TOPIC + NCAT * _WORDS_PER_CAT + n_brands_max
        words: dict[str, None] = dict.fromkeys(_BUY + _GENERIC)
        while len(words) < need + len(_BUY) + len(_GENERIC):
            length = rng.choice([2, 3, 4], need, p=[0.45, 0.45, 0.1])  # 4 syllables: room for many brands
            syl = _SYLLABLES[rng.integers(0, len(_SYLLABLES), (need, 4))]
            words.update(dict.fromkeys("".join(s[:k]) for s, k in zip(syl.tolist(), length)))
        vocab = np.array(list(words)[: need + len(_BUY) + len(_GENERIC)], dtype=object)
        self.vocab = vocab
        self._w_buy, self._w_generic = 0, len(_BUY)
        self._w_topic = len(_BUY) + len(_GENERIC)
        self._w_cat = self._w_topic + self.num_topics * _WORDS_PER_TOPIC
        self._w_brand = self._w_cat + NCAT * _WORDS_PER_CAT

    def _topic_words(self, rng: np.random.Generator, topic: np.ndarray, width: int) -> np.ndarray:
        """Words of each row's topic, common words first (Zipf within the topic's vocabulary)."""
        rank = zipf(rng, _WORDS_PER_TOPIC, 1.0, (len(topic), width))
        return self._w_topic + topic[:, None] * _WORDS_PER_TOPIC + rank

    def _cat_words(self, rng: np.random.Generator, cat: np.ndarray, width: int) -> np.ndarray:
        return self._w_cat + cat[:, None] * _WORDS_PER_CAT + rng.integers(0, _WORDS_PER_CAT, (len(cat), width))

    def _build_ads(self, rng: np.random.Generator) -> None:
        A, V, T = self.num_ads, self.num_advertisers, self.num_topics
        adv_cat = rng.permutation(NCAT)[zipf(rng, NCAT, 0.6, V)]  # some industries are bigger
        adv_q, adv_bid = rng.normal(0, 0.3, V), rng.normal(0, 0.4, V)
        n_brands = rng.integers(1, 4, V)
        # Every advertiser has an ad; the rest go to advertisers by a Zipf law (a few big ones).
        extra = rng.permutation(V)[zipf(rng, V, 0.8, max(A - V, 0))]
        adv = rng.permutation(np.concatenate([np.arange(min(A, V)), extra]))
        topics = GroupSampler(self.topic_cat, np.arange(T), np.ones(T), NCAT)
        home = np.where(topics.empty[adv_cat[adv]], 0, adv_cat[adv])
        topic = np.where(topics.empty[adv_cat[adv]] | (rng.random(A) < 0.1),
                         rng.integers(0, T, A), topics.sample(rng, home))
        self.ad_advertiser, self._ad_topic, self._ad_cat = adv, topic, adv_cat[adv]
        self._ad_taste = self.topic_vec[topic] + rng.normal(0, 0.5 / np.sqrt(_K), (A, _K))
        self._ad_quality = adv_q[adv] + rng.normal(0, 0.4, A)
        self._ad_convq = 0.5 * adv_q[adv] + rng.normal(0, 0.4, A)
        self._ad_camp = rng.choice(5, A, p=[0.4, 0.25, 0.15, 0.12, 0.08])
        brand = np.cumsum(n_brands)[adv] - n_brands[adv] + rng.integers(0, n_brands[adv])
        self.ad_bids = np.exp(0.3 + adv_bid[adv] + rng.normal(0, 0.3, A)).astype(np.float32)
        age = 1.0 + rng.exponential(90.0, A)
        # Ads that win auctions (quality x bid) are shown far more often: Zipf popularity.
        score = 0.5 * self._ad_quality + 0.5 * np.log(self.ad_bids) + rng.normal(0, 1, A)
        rank = np.argsort(np.argsort(-score))
        self._ad_pop = 1.0 / (rank + 1.0) ** self.ad_zipf
        # Historical stats: a past period with the same true quality, hence noisy but honest.
        imps = rng.poisson(self._ad_pop / self._ad_pop.sum() * 400 * A * np.minimum(age, 90) / 90)
        clicks = rng.binomial(imps, sigmoid(-3.5 + self._ad_quality))
        convs = rng.binomial(clicks, sigmoid(-2.3 + self._ad_convq))
        generic = self._w_generic + rng.integers(0, len(_GENERIC), (A, 6))
        title = np.concatenate([self._w_brand + brand[:, None],
                                masked(self._topic_words(rng, topic, 4), rng.integers(2, 5, A)),
                                np.where(rng.random((A, 1)) < 0.5, self._cat_words(rng, self._ad_cat, 1), -1),
                                np.where(rng.random((A, 1)) < 0.4, generic[:, :1], -1)], 1)
        desc = np.concatenate([masked(self._topic_words(rng, topic, 10), rng.integers(4, 11, A)),
                               masked(self._cat_words(rng, self._ad_cat, 4), rng.integers(1, 5, A)),
                               masked(generic, rng.integers(2, 7, A)),
                               np.where(rng.random((A, 1)) < 0.5, self._w_brand + brand[:, None], -1)], 1)
        desc = np.take_along_axis(desc, np.argsort(rng.random(desc.shape), 1), 1)
        latent = {"ad_id": np.arange(A), "title": _join(self.vocab, title), "description": _join(self.vocab, desc),
                  "advertiser_id": adv, "brand_id": brand, "campaign_type": self._ad_camp,
                  "industry_category": self._ad_cat, "historical_ctr": (clicks + 30 * 0.03) / (imps + 30),
                  "historical_cvr": (convs + 5 * 0.09) / (clicks + 5), "total_impressions": imps, "ad_age_days": age}
        self._ad_cols = {f"ad.{f.name}": emit(f, self._ad_dense(f) if f.type == "dense" else latent[f.name])
                         for f in self.spec.ad.features}

    def _ad_dense(self, f: F.Dense) -> np.ndarray:
        """Image embeddings: a noisy function of the ad's topic, industry, advertiser style,
        taste and quality; the topic is recoverable from many dims, not from any one."""
        rng, A = self._rng(6, f.dim), self.num_ads
        x = (0.3 * rng.normal(size=(self.num_topics, f.dim))[self._ad_topic]
             + 0.2 * rng.normal(size=(NCAT, f.dim))[self._ad_cat]
             + 0.4 * rng.normal(size=(self.num_advertisers, f.dim))[self.ad_advertiser]
             + self._ad_taste @ rng.normal(size=(_K, f.dim))
             + 0.3 * self._ad_quality[:, None] * rng.normal(size=f.dim) + rng.normal(0, 1.0, (A, f.dim)))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def _build_users(self) -> None:
        """Users [0, first_new_user) from one RNG stream; the new users (validation and test only)
        from their own stream, sharing the world's demographic -> topic and country -> language
        maps, so their features say as much about them as a returning user's do."""
        shared: dict[str, np.ndarray] = {}
        parts = [self._draw_users(self._rng(3), self.first_new_user, shared)]
        if self.num_new_users:
            parts.append(self._draw_users(self._rng(9), self.num_new_users, shared))
        u = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self._u_device, self._u_city, self._favs, self._fav_w = u["device_type"], u["city"], u["favs"], u["fav_w"]
        self._fav_cdf = np.cumsum(self._fav_w, 1)
        self._u_taste, self._u_bias, self._u_buyer = u["taste"], u["bias"], u["buyer"]
        # Who is in an impression: by activity, among the returning users (and the new ones).
        cdfs = [np.cumsum(p["activity"]) / p["activity"].sum() for p in parts]
        self._u_cdf, self._new_u_cdf = cdfs[0], cdfs[-1]  # (the second is only read with new users)
        u["user_id"] = np.arange(self.num_users)
        self._user_cols = {f"user.{f.name}": emit(f, self._user_dense(f) if f.type == "dense" else u[f.name])
                           for f in self.spec.user.features}

    def _draw_users(self, rng: np.random.Generator, U: int, shared: dict) -> dict[str, np.ndarray]:
        """U users' latents and raw feature values; fills `shared` (the maps every user follows)
        on the first call and reuses it after."""
        T, first = self.num_topics, not shared
        age = rng.choice(10, U, p=[0.02, 0.1, 0.18, 0.2, 0.16, 0.12, 0.09, 0.07, 0.04, 0.02])
        gender = rng.choice(3, U, p=[0.49, 0.48, 0.03])
        country = zipf(rng, 200, 1.1, U)
        native = rng.random(U) < 0.9
        if first:
            shared["language"] = zipf(rng, 50, 1.2, 200)  # each country's main language
        language = np.where(native, shared["language"][country], rng.integers(0, 50, U))
        device = rng.choice(5, U, p=[0.38, 0.3, 0.22, 0.07, 0.03])  # android, ios, desktop, tablet, tv
        city = (country * 25 + zipf(rng, 25, 1.0, U)) % 5000  # home city, inside the country
        if first:
            shared["demo_age"], shared["demo_gender"] = rng.normal(0, 0.8, (10, T)), rng.normal(0, 0.8, (3, T))
        demo_age, demo_gender = shared["demo_age"], shared["demo_gender"]
        favs = np.concatenate([  # demographics shift which topics a user likes (chunked: U x T scores)
            topk(rng, demo_age[age[s:s + 65536]] + demo_gender[gender[s:s + 65536]],
                  np.full(min(65536, U - s), NFAV), NFAV) for s in range(0, U, 65536)])
        fav_w = rng.dirichlet(np.full(NFAV, 0.7), U)
        taste = (np.einsum("uf,ufk->uk", fav_w, self.topic_vec[favs])
                 + rng.normal(0, 0.35 / np.sqrt(_K), (U, _K)))
        bias, buyer = rng.normal(0, 0.25, U), rng.normal(0, 0.5, U)
        activity = rng.lognormal(0, 1.0, U)
        convs = rng.poisson(activity * 0.8 * np.exp(bias + buyer))
        return {"favs": favs, "fav_w": fav_w, "taste": taste, "bias": bias, "buyer": buyer, "activity": activity,
                "city": city, "age_bucket": age, "gender": gender, "country": country, "device_type": device,
                "language": language, "total_clicks_30d": rng.poisson(activity * 8 * np.exp(bias)),
                "total_conversions_30d": convs,
                "avg_order_value": np.where(convs > 0, rng.lognormal(3.5 + 0.3 * buyer, 0.6), 0.0),
                "days_since_last_purchase": np.minimum(rng.exponential(30 * np.exp(-buyer)), 365.0)}

    def _user_dense(self, f: F.Dense) -> np.ndarray:
        """Interest vectors: a linear view of a noisy observation of the user's taste and favourite
        topics (plus a stale past interest), so they inform but do not reveal the latents."""
        rng = self._rng(7, f.dim)
        topic_proj, taste_proj = rng.normal(size=(self.num_topics, f.dim)), rng.normal(size=(_K, f.dim))
        noise_sd = 0.6 * self._u_taste[: self.first_new_user].std()
        out = np.empty((self.num_users, f.dim), np.float32)
        for first, stop in ((0, self.first_new_user), (self.first_new_user, self.num_users)):
            if first:  # the new users: the same projections, their own draws
                rng = self._rng(7, f.dim, 1)
            for s in range(first, stop, 65536):  # in slices, so millions of users fit in memory
                u = slice(s, min(s + 65536, stop))
                m = u.stop - s
                x = 2.0 * (self._u_taste[u] + rng.normal(0, noise_sd, (m, _K))) @ taste_proj
                x += 0.3 * topic_proj[rng.integers(0, self.num_topics, m)] + rng.normal(0, 0.5, x.shape)
                for j in range(NFAV):
                    x += self._fav_w[u, j, None] * rng.lognormal(0, 0.5, (m, 1)) * topic_proj[self._favs[u, j]]
                out[u] = x / np.sqrt(f.dim)
        return out

    def _build_context_tables(self, rng: np.random.Generator) -> None:
        T, P = self.num_topics, PRODUCTS_PER_TOPIC
        price_level = rng.normal(3.5, 1.0, T)
        self._prod_price = rng.lognormal(price_level[:, None], 0.5, (T, P))
        self._prod_reviews = rng.poisson(rng.lognormal(3.0, 1.5, (T, P)))
        self._prod_rating = np.clip(rng.normal(4.1, 0.5, (T, P)), 1.0, 5.0)
        self._topic_filters = np.stack([rng.choice(64, 6, replace=False) for _ in range(T)])
        # Query pools per (topic, purchase intent): 1-3 topic words, maybe a category word, a
        # modifier, a buy word; one word in ten from another topic, so text is informative, not exact.
        n = T * 2 * QUERIES_PER_POOL
        topic = np.repeat(np.arange(T), 2 * QUERIES_PER_POOL)
        buy = np.tile(np.repeat([0, 1], QUERIES_PER_POOL), T)
        words = masked(self._topic_words(rng, topic, 3), rng.integers(1, 4, n))
        stray = self._topic_words(rng, rng.integers(0, T, n), 1)[:, 0]
        words[:, 0] = np.where(rng.random(n) < 0.1, stray, words[:, 0])
        extra = np.stack([np.where(rng.random(n) < 0.3, self._cat_words(rng, self.topic_cat[topic], 1)[:, 0], -1),
                          np.where(rng.random(n) < 0.25, self._w_generic + rng.integers(0, len(_GENERIC), n), -1),
                          np.where((buy == 1) | (rng.random(n) < 0.05),
                                   self._w_buy + rng.integers(0, len(_BUY), n), -1)], 1)
        words = np.concatenate([words, extra], 1)
        words = np.take_along_axis(words, np.argsort(rng.random(words.shape), 1), 1)
        self._queries = _join(self.vocab, words).reshape(T, 2, QUERIES_PER_POOL)

    def ads_table(self) -> dict[str, np.ndarray]:
        """The catalogue: ``ad_id`` and every ``ad.<feature>`` raw column, one row per ad."""
        return {"ad_id": np.arange(self.num_ads, dtype=np.int64), **self._ad_cols}

    def ad_targeting(self) -> dict[str, list[list]]:
        """Targeting rules per ad, as catalogue columns of allowed values (empty list = anywhere):
        ``target.countries`` (user.country ids), ``target.devices`` (user.device_type ids) and
        ``target.placements``. Most ads are untargeted. Drawn from their own RNG stream, so the
        rest of the world and its impressions do not change."""
        rng, A = self._rng(8), self.num_ads
        countries = zipf(rng, 200, 1.1, (A, 3))  # popular countries are targeted more often
        n_countries = np.where(rng.random(A) < 0.15, rng.integers(1, 4, A), 0)
        devices = ([], [0, 1, 3], [2], [0, 1])  # anywhere, handheld, desktop, phones
        device = np.where(rng.random(A) < 0.1, rng.integers(1, len(devices), A), 0)
        places = np.argsort(rng.random((A, len(F.PLACEMENTS))), 1)[:, :2]
        n_places = np.where(rng.random(A) < 0.1, rng.integers(1, 3, A), 0)
        return {"target.countries": [sorted(set(c[:k].tolist())) for c, k in zip(countries, n_countries)],
                "target.devices": [devices[d] for d in device],
                "target.placements": [[F.PLACEMENTS[j] for j in sorted(p[:k])] for p, k in zip(places, n_places)]}

    def users_table(self) -> dict[str, np.ndarray]:
        """``user_id`` and every ``user.<feature>`` raw column, one row per user."""
        return {"user_id": np.arange(self.num_users, dtype=np.int64), **self._user_cols}
