"""A seeded synthetic ground-truth world: users, ads and impressions with known probabilities.

Every observable feature is drawn from latent variables the model never sees directly. Users
have a few favourite topics, a latent taste vector, a click and a purchase propensity; ads a
topic (inside their advertiser's industry), a taste vector near the topic's, a click quality
and a conversion quality. Each request has an intent topic (mostly one of the user's
favourites) that the context reveals to a different degree per placement: query words drawn
from the topic's vocabulary (search), the viewed product, the browsed category and filters,
recent categories, cart contents. The click logit sums user x ad taste, intent x ad topic
match, ad quality, user propensity and context effects, so every tower carries signal, and
``p_click`` / ``p_convert_given_click`` are the exact Bernoulli parameters of the labels.

Beyond the default features, a spec may add ``user.user_id`` and ``ad.ad_id`` (categorical,
``ids`` or ``hash``): the entity's index, emitted like any other id. A cold-start world:
``config.synthetic.new_users = dict(num=N, fraction=f)`` adds N users (drawn from their own RNG
stream, with the same demographic and interest structure) who never appear in train; each
validation and test impression comes from one of them with probability f. Without it (the
default) the world and every impression are exactly those of earlier versions.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from multitower_jax import features as F
from multitower_jax.data import schema

SPLITS = ("train", "validation", "test")
EPOCH = 1_704_067_200  # 2024-01-01 00:00 UTC, a Monday
SPLIT_DAYS = {"train": (0, 28), "validation": (28, 35), "test": (35, 42)}  # time-based splits
_BLOCK = 4096  # rows per RNG stream, so the output does not depend on chunk_size
_K = 16  # latent taste dimension
_NCAT = 30  # product categories = ad industries
_NFAV = 5  # favourite topics per user
_WORDS_PER_TOPIC, _WORDS_PER_CAT, _PRODUCTS_PER_TOPIC, _QUERIES_PER_POOL = 24, 16, 200, 128
_BUY = ("buy", "deal", "price", "discount", "sale", "cheap", "order", "coupon")
_GENERIC = ("best", "new", "top", "for", "with", "review", "men", "women", "kids", "set",
            "pro", "mini", "large", "small", "black", "white", "premium", "classic", "gift", "online")
_SYLLABLES = np.array([c + v for c in "bcdfghjklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
# Which features the generator knows, and their types, come from the default spec.
_DEFAULT = F.parse_spec(F.default_features())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf(rng: np.random.Generator, n: int, a: float, size) -> np.ndarray:
    """Indices in [0, n) with P(i) proportional to 1 / (i + 1)^a."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** a)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right"), n - 1)


def _topk(rng: np.random.Generator, logits: np.ndarray, k: np.ndarray, width: int) -> np.ndarray:
    """k[i] distinct columns per row, sampled by Gumbel-top-k from softmax(logits); -1 pads."""
    order = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)[:, :width]
    return np.where(np.arange(width) < k[:, None], order, -1)


def _join(vocab: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of word indices (-1 = no word) -> space-joined strings (object array)."""
    words = np.append(vocab, "")[np.where(idx < 0, len(vocab), idx)]
    return np.array([" ".join(w for w in row if w) for row in words.tolist()], dtype=object)


def _masked(idx: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.where(np.arange(idx.shape[1]) < k[:, None], idx, -1)


def _emit(f: F.Feature, x: np.ndarray) -> np.ndarray:
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


class _GroupSampler:
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


class World:
    """The latent world, built once from ``config.synthetic``; impressions are drawn lazily."""

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
        self.topic_cat = rng.permutation(T) % _NCAT  # topics nest inside categories
        cat_vec = rng.normal(size=(_NCAT, _K))
        self.topic_vec = (0.6 * cat_vec[self.topic_cat] + 0.8 * rng.normal(size=(T, _K))) / np.sqrt(_K)
        self.cat_phase = rng.uniform(0, 24, _NCAT)  # hour at which an industry's ads click best
        self.dev_camp = rng.normal(0, 0.2, (5, 5))  # device type x campaign type affinity
        self._build_vocab(self._rng(1))
        self._build_ads(self._rng(2))
        self._build_users()
        self._build_context_tables(self._rng(4))
        pair = self._rng(5)  # standardize the taste dot product on random pairs
        aff = self._affinity(pair.integers(0, self.first_new_user, 8192), pair.integers(0, self.num_ads, 8192), 0, 1)
        self._aff_mu, self._aff_sd = float(aff.mean()), float(aff.std()) + 1e-9
        groups = np.concatenate([self._ad_topic, T + self._ad_cat, np.full(self.num_ads, T + _NCAT)])
        ads = np.tile(np.arange(self.num_ads), 3)
        self._ad_sampler = _GroupSampler(groups, ads, np.tile(self._ad_pop, 3), T + _NCAT + 1)
        self._times: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    # ---------------------------------------------------------------- the catalogue
    def _build_vocab(self, rng: np.random.Generator) -> None:
        n_brands_max = 3 * self.num_advertisers
        need = self.num_topics * _WORDS_PER_TOPIC + _NCAT * _WORDS_PER_CAT + n_brands_max
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
        self._w_brand = self._w_cat + _NCAT * _WORDS_PER_CAT

    def _topic_words(self, rng: np.random.Generator, topic: np.ndarray, width: int) -> np.ndarray:
        """Words of each row's topic, common words first (Zipf within the topic's vocabulary)."""
        rank = _zipf(rng, _WORDS_PER_TOPIC, 1.0, (len(topic), width))
        return self._w_topic + topic[:, None] * _WORDS_PER_TOPIC + rank

    def _cat_words(self, rng: np.random.Generator, cat: np.ndarray, width: int) -> np.ndarray:
        return self._w_cat + cat[:, None] * _WORDS_PER_CAT + rng.integers(0, _WORDS_PER_CAT, (len(cat), width))

    def _build_ads(self, rng: np.random.Generator) -> None:
        A, V, T = self.num_ads, self.num_advertisers, self.num_topics
        adv_cat = rng.permutation(_NCAT)[_zipf(rng, _NCAT, 0.6, V)]  # some industries are bigger
        adv_q, adv_bid = rng.normal(0, 0.3, V), rng.normal(0, 0.4, V)
        n_brands = rng.integers(1, 4, V)
        # Every advertiser has an ad; the rest go to advertisers by a Zipf law (a few big ones).
        extra = rng.permutation(V)[_zipf(rng, V, 0.8, max(A - V, 0))]
        adv = rng.permutation(np.concatenate([np.arange(min(A, V)), extra]))
        topics = _GroupSampler(self.topic_cat, np.arange(T), np.ones(T), _NCAT)
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
        clicks = rng.binomial(imps, _sigmoid(-3.5 + self._ad_quality))
        convs = rng.binomial(clicks, _sigmoid(-2.3 + self._ad_convq))
        generic = self._w_generic + rng.integers(0, len(_GENERIC), (A, 6))
        title = np.concatenate([self._w_brand + brand[:, None],
                                _masked(self._topic_words(rng, topic, 4), rng.integers(2, 5, A)),
                                np.where(rng.random((A, 1)) < 0.5, self._cat_words(rng, self._ad_cat, 1), -1),
                                np.where(rng.random((A, 1)) < 0.4, generic[:, :1], -1)], 1)
        desc = np.concatenate([_masked(self._topic_words(rng, topic, 10), rng.integers(4, 11, A)),
                               _masked(self._cat_words(rng, self._ad_cat, 4), rng.integers(1, 5, A)),
                               _masked(generic, rng.integers(2, 7, A)),
                               np.where(rng.random((A, 1)) < 0.5, self._w_brand + brand[:, None], -1)], 1)
        desc = np.take_along_axis(desc, np.argsort(rng.random(desc.shape), 1), 1)
        latent = {"ad_id": np.arange(A), "title": _join(self.vocab, title), "description": _join(self.vocab, desc),
                  "advertiser_id": adv, "brand_id": brand, "campaign_type": self._ad_camp,
                  "industry_category": self._ad_cat, "historical_ctr": (clicks + 30 * 0.03) / (imps + 30),
                  "historical_cvr": (convs + 5 * 0.09) / (clicks + 5), "total_impressions": imps, "ad_age_days": age}
        self._ad_cols = {f"ad.{f.name}": _emit(f, self._ad_dense(f) if f.type == "dense" else latent[f.name])
                         for f in self.spec.ad.features}

    def _ad_dense(self, f: F.Dense) -> np.ndarray:
        """Image embeddings: a noisy function of the ad's topic, industry, advertiser style,
        taste and quality; the topic is recoverable from many dims, not from any one."""
        rng, A = self._rng(6, f.dim), self.num_ads
        x = (0.3 * rng.normal(size=(self.num_topics, f.dim))[self._ad_topic]
             + 0.2 * rng.normal(size=(_NCAT, f.dim))[self._ad_cat]
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
        self._user_cols = {f"user.{f.name}": _emit(f, self._user_dense(f) if f.type == "dense" else u[f.name])
                           for f in self.spec.user.features}

    def _draw_users(self, rng: np.random.Generator, U: int, shared: dict) -> dict[str, np.ndarray]:
        """U users' latents and raw feature values; fills `shared` (the maps every user follows)
        on the first call and reuses it after."""
        T, first = self.num_topics, not shared
        age = rng.choice(10, U, p=[0.02, 0.1, 0.18, 0.2, 0.16, 0.12, 0.09, 0.07, 0.04, 0.02])
        gender = rng.choice(3, U, p=[0.49, 0.48, 0.03])
        country = _zipf(rng, 200, 1.1, U)
        native = rng.random(U) < 0.9
        if first:
            shared["language"] = _zipf(rng, 50, 1.2, 200)  # each country's main language
        language = np.where(native, shared["language"][country], rng.integers(0, 50, U))
        device = rng.choice(5, U, p=[0.38, 0.3, 0.22, 0.07, 0.03])  # android, ios, desktop, tablet, tv
        city = (country * 25 + _zipf(rng, 25, 1.0, U)) % 5000  # home city, inside the country
        if first:
            shared["demo_age"], shared["demo_gender"] = rng.normal(0, 0.8, (10, T)), rng.normal(0, 0.8, (3, T))
        demo_age, demo_gender = shared["demo_age"], shared["demo_gender"]
        favs = np.concatenate([  # demographics shift which topics a user likes (chunked: U x T scores)
            _topk(rng, demo_age[age[s:s + 65536]] + demo_gender[gender[s:s + 65536]],
                  np.full(min(65536, U - s), _NFAV), _NFAV) for s in range(0, U, 65536)])
        fav_w = rng.dirichlet(np.full(_NFAV, 0.7), U)
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
                for j in range(_NFAV):
                    x += self._fav_w[u, j, None] * rng.lognormal(0, 0.5, (m, 1)) * topic_proj[self._favs[u, j]]
                out[u] = x / np.sqrt(f.dim)
        return out

    def _build_context_tables(self, rng: np.random.Generator) -> None:
        T, P = self.num_topics, _PRODUCTS_PER_TOPIC
        price_level = rng.normal(3.5, 1.0, T)
        self._prod_price = rng.lognormal(price_level[:, None], 0.5, (T, P))
        self._prod_reviews = rng.poisson(rng.lognormal(3.0, 1.5, (T, P)))
        self._prod_rating = np.clip(rng.normal(4.1, 0.5, (T, P)), 1.0, 5.0)
        self._topic_filters = np.stack([rng.choice(64, 6, replace=False) for _ in range(T)])
        # Query pools per (topic, purchase intent): 1-3 topic words, maybe a category word, a
        # modifier, a buy word; one word in ten from another topic, so text is informative, not exact.
        n = T * 2 * _QUERIES_PER_POOL
        topic = np.repeat(np.arange(T), 2 * _QUERIES_PER_POOL)
        buy = np.tile(np.repeat([0, 1], _QUERIES_PER_POOL), T)
        words = _masked(self._topic_words(rng, topic, 3), rng.integers(1, 4, n))
        stray = self._topic_words(rng, rng.integers(0, T, n), 1)[:, 0]
        words[:, 0] = np.where(rng.random(n) < 0.1, stray, words[:, 0])
        extra = np.stack([np.where(rng.random(n) < 0.3, self._cat_words(rng, self.topic_cat[topic], 1)[:, 0], -1),
                          np.where(rng.random(n) < 0.25, self._w_generic + rng.integers(0, len(_GENERIC), n), -1),
                          np.where((buy == 1) | (rng.random(n) < 0.05),
                                   self._w_buy + rng.integers(0, len(_BUY), n), -1)], 1)
        words = np.concatenate([words, extra], 1)
        words = np.take_along_axis(words, np.argsort(rng.random(words.shape), 1), 1)
        self._queries = _join(self.vocab, words).reshape(T, 2, _QUERIES_PER_POOL)

    def _affinity(self, user: np.ndarray, ad: np.ndarray, mu: float, sd: float) -> np.ndarray:
        return ((self._u_taste[user] * self._ad_taste[ad]).sum(1) - mu) / sd

    def ads_table(self) -> dict[str, np.ndarray]:
        """The catalogue: ``ad_id`` and every ``ad.<feature>`` raw column, one row per ad."""
        return {"ad_id": np.arange(self.num_ads, dtype=np.int64), **self._ad_cols}

    def ad_targeting(self) -> dict[str, list[list]]:
        """Targeting rules per ad, as catalogue columns of allowed values (empty list = anywhere):
        ``target.countries`` (user.country ids), ``target.devices`` (user.device_type ids) and
        ``target.placements``. Most ads are untargeted. Drawn from their own RNG stream, so the
        rest of the world and its impressions do not change."""
        rng, A = self._rng(8), self.num_ads
        countries = _zipf(rng, 200, 1.1, (A, 3))  # popular countries are targeted more often
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

    # ---------------------------------------------------------------- impressions
    def impressions(self, placement: str, split: str, num: int,
                    chunk_size: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        """``num`` impressions of one placement and split, as columnar chunks of ``chunk_size``
        rows with exactly the columns of ``schema.raw_columns(spec, placement, with_oracle=True)``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if placement not in F.PLACEMENTS:
            raise ValueError(f"placement must be one of {F.PLACEMENTS}, got {placement!r}")
        columns = schema.raw_columns(self.spec, placement, with_oracle=True)  # raises if not in the spec
        if chunk_size < 1 or num < 0:
            raise ValueError(f"need chunk_size >= 1 and num >= 0, got {chunk_size}, {num}")
        return self._chunks(placement, split, num, chunk_size, columns)  # a generator, after the checks

    def _chunks(self, placement: str, split: str, num: int, chunk_size: int,
                columns: dict) -> Iterator[dict[str, np.ndarray]]:
        parts, have = [], 0
        for start in range(0, num, _BLOCK):
            parts.append(self._block(placement, split, start, min(_BLOCK, num - start), num))
            have += len(parts[-1]["user_id"])
            while have >= chunk_size or (have > 0 and start + _BLOCK >= num):
                rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                take = min(chunk_size, have)
                yield self._finish({k: v[:take] for k, v in rows.items()}, columns)
                parts, have = [{k: v[take:] for k, v in rows.items()}], have - take

    def _finish(self, rows: dict[str, np.ndarray], columns: dict) -> dict[str, np.ndarray]:
        """Denormalize the user's and the ad's catalogue rows into the impressions."""
        rows.update({k: v[rows["user_id"]] for k, v in self._user_cols.items()})
        rows.update({k: v[rows["ad_id"]] for k, v in self._ad_cols.items()})
        return {k: rows[k] for k in columns}

    def _timestamps(self, split: str, i: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
        """Rows fill the split's time window in order, denser in the evening and at weekends."""
        if split not in self._times:
            d0, d1 = SPLIT_DAYS[split]
            hours = np.arange(24 * d0, 24 * d1)
            rate = 1 + 0.6 * np.sin(2 * np.pi * (hours % 24 - 14) / 24)  # peaks at 20:00
            rate *= np.where((hours // 24) % 7 >= 5, 1.15, 1.0)
            cdf = np.concatenate([[0.0], np.cumsum(rate) / rate.sum()])
            self._times[split] = cdf, np.arange(24 * d0, 24 * d1 + 1.0)
        cdf, grid = self._times[split]
        return EPOCH + (np.interp((i + rng.random(len(i))) / num, cdf, grid) * 3600).astype(np.int64)

    def _block(self, placement: str, split: str, start: int, n: int, num: int,
               latent: dict | None = None) -> dict[str, np.ndarray]:
        p_idx, s_idx = F.PLACEMENTS.index(placement), SPLITS.index(split)
        rng = self._rng(100 + p_idx, s_idx, start // _BLOCK)
        i = np.arange(start, start + n)
        ts = self._timestamps(split, i, num, rng)
        hour, dow = (ts // 3600) % 24, ((ts - EPOCH) // 86400) % 7
        user = np.minimum(np.searchsorted(self._u_cdf, rng.random(n), side="right"), self.first_new_user - 1)
        if self.num_new_users and split != "train":  # the cold start: its own stream, the rest unchanged
            cold = self._rng(200 + p_idx, s_idx, start // _BLOCK)
            is_new = cold.random(n) < self.new_user_fraction
            new = np.minimum(np.searchsorted(self._new_u_cdf, cold.random(n), side="right"), self.num_new_users - 1)
            user = np.where(is_new, self.first_new_user + new, user)
        fav = self._favs[user, (rng.random(n)[:, None] > self._fav_cdf[user]).sum(1).clip(max=_NFAV - 1)]
        intent = np.where(rng.random(n) < 0.6, fav, rng.integers(0, self.num_topics, n))
        icat = self.topic_cat[intent]
        ctx = self._context(placement, rng, user, intent, hour, dow)
        # The ad server retrieves ads of the intent topic, its category, or the popular ones.
        mode, (p_topic, p_cat), (m_topic, m_cat) = rng.random(n), ctx["retrieval"], ctx["match"]
        popular = self.num_topics + _NCAT  # the group of all ads
        group = np.where(mode < p_topic, intent, np.where(mode < p_topic + p_cat, self.num_topics + icat, popular))
        group = np.where(self._ad_sampler.empty[group], popular, group)
        ad = self._ad_sampler.sample(rng, group)
        a_topic, a_cat = self._ad_topic[ad], self._ad_cat[ad]
        match = np.where(a_topic == intent, m_topic, np.where(a_cat == icat, m_cat, 0.0))
        if "cats" in ctx:  # ads of a recently browsed / carted category are more welcome
            match = match + 0.3 * (ctx["cats"] == a_cat[:, None]).any(1)
        aff = self._affinity(user, ad, self._aff_mu, self._aff_sd)
        logit_click = (ctx["click"] + self._u_bias[user] + self._ad_quality[ad] + 0.3 * aff + match
                       + self.dev_camp[self._u_device[user], self._ad_camp[ad]]
                       + 0.25 * np.cos(2 * np.pi * (hour - self.cat_phase[a_cat]) / 24))
        logit_conv = ctx["conv"] + self._ad_convq[ad] + 0.5 * self._u_buyer[user] + 0.4 * match + 0.2 * aff
        p_click = _sigmoid(logit_click).astype(np.float32)
        p_conv = _sigmoid(logit_conv).astype(np.float32)
        click = rng.random(n) < p_click
        conversion = click & (rng.random(n) < p_conv)  # conversions only happen after a click
        if latent is not None:  # for the oracle's ranking of every ad (`oracle_click_logits`)
            latent.update(user=user, intent=intent, hour=hour, cats=ctx.get("cats"), m=(m_topic, m_cat),
                          base=ctx["click"] + self._u_bias[user])
        spec = self.spec.context(placement)
        rows = {"impression_id": ((p_idx * len(SPLITS) + s_idx) << 40) + i, "user_id": user.astype(np.int64),
                "ad_id": ad.astype(np.int64), "timestamp": ts, "click": click.astype(np.int64),
                "conversion": conversion.astype(np.int64), "p_click": p_click, "p_convert_given_click": p_conv}
        rows.update({f"context.{f.name}": _emit(f, ctx["cols"][f.name]) for f in spec.features})
        return rows

    def oracle_click_logits(self, placement: str, split: str, num: int, impression_ids: np.ndarray) -> np.ndarray:
        """float[n, num_ads]: each impression's true click logit had any ad been shown instead
        (same user, intent, context and time). Row i at the impression's own ad reproduces its
        ``p_click``. ``num`` is the split's size as generated. Replays the impressions' blocks."""
        i = np.asarray(impression_ids, np.int64) & ((1 << 40) - 1)
        out = np.empty((len(i), self.num_ads), np.float64)
        for start in np.unique(i // _BLOCK * _BLOCK):
            lat: dict = {}
            self._block(placement, split, int(start), min(_BLOCK, num - int(start)), num, latent=lat)
            sel = np.flatnonzero(i // _BLOCK * _BLOCK == start)
            r = i[sel] - start
            user, intent, hour = lat["user"][r], lat["intent"][r], lat["hour"][r]
            m_topic, m_cat = lat["m"]
            match = np.where(self._ad_topic[None, :] == intent[:, None], m_topic,
                             np.where(self._ad_cat[None, :] == self.topic_cat[intent][:, None], m_cat, 0.0))
            if lat["cats"] is not None:
                match = match + 0.3 * (lat["cats"][r][:, :, None] == self._ad_cat[None, None, :]).any(1)
            aff = ((self._u_taste[user] @ self._ad_taste.T) - self._aff_mu) / self._aff_sd
            out[sel] = (lat["base"][r][:, None] + self._ad_quality[None, :] + 0.3 * aff + match
                        + self.dev_camp[self._u_device[user]][:, self._ad_camp]
                        + 0.25 * np.cos(2 * np.pi * (hour[:, None] - self.cat_phase[self._ad_cat][None, :]) / 24))
        return out

    def _context(self, placement: str, rng: np.random.Generator, user: np.ndarray, intent: np.ndarray,
                 hour: np.ndarray, dow: np.ndarray) -> dict:
        """Context columns (latent values), their click / conversion effects and how much the
        ad server and the user respond to the intent in this placement."""
        n = len(user)
        handheld = np.isin(self._u_device[user], (0, 1, 3))
        orient = np.where(handheld, (rng.random(n) < 0.2).astype(np.int64), 2)  # portrait, landscape, none
        weekend = (dow >= 5).astype(np.int64)
        cols = {"hour_of_day": hour, "day_of_week": dow, "device_orientation": orient, "is_weekend": weekend}
        click = 0.15 * np.sin(2 * np.pi * (hour - 14) / 24) - 0.1 * (orient == 1)
        conv = 0.1 * weekend
        buyer = self._u_buyer[user]
        if placement == "search":
            nq = rng.geometric(0.45, n)
            pages = nq + rng.poisson(1.2 * nq)
            buy = (rng.random(n) < _sigmoid(-1.2 + 0.8 * buyer + 0.2 * (nq - 1))).astype(np.int64)
            work = (hour >= 9) & (hour < 18) & (dow < 5)
            p_home, p_work = np.where(work, 0.35, 0.75), np.where(work, 0.5, 0.05)
            u = rng.random(n)
            loc = (u >= p_home).astype(np.int64) + (u >= p_home + p_work)  # home, work, other
            cols.update(query=self._queries[intent, buy, _zipf(rng, _QUERIES_PER_POOL, 1.0, n)],
                        num_queries_in_session=nq, time_since_session_start=rng.gamma(nq, 45.0), pages_viewed=pages,
                        city=np.where(rng.random(n) < 0.9, self._u_city[user], _zipf(rng, 5000, 0.8, n)),
                        location_type=loc)
            click += -5.55 + 0.3 * buy - 0.12 * np.log(nq) - 0.15 * (loc == 2)
            conv += -3.75 + 0.8 * buy + 0.1 * np.log1p(pages)
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.4, 0.15), match=(2.0, 0.6))
        if placement == "product_page":
            j = _zipf(rng, _PRODUCTS_PER_TOPIC, 1.0, n)
            price, rating = self._prod_price[intent, j], self._prod_rating[intent, j]
            cols.update(viewed_product_id=intent * _PRODUCTS_PER_TOPIC + j, viewed_category=self.topic_cat[intent],
                        viewed_price=price, num_reviews=self._prod_reviews[intent, j], rating=rating)
            click += -5.4 + 0.15 * (rating - 4.1)
            conv += -3.3 - 0.15 * (np.log(price) - 3.5)
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.45, 0.2), match=(1.5, 0.6))
        if placement == "category_browse":
            n_filters = rng.choice(5, n, p=[0.3, 0.3, 0.2, 0.12, 0.08])
            own = self._topic_filters[intent[:, None], rng.integers(0, 6, (n, 8))]
            filters = np.where(rng.random((n, 8)) < 0.8, own, rng.integers(0, 64, (n, 8)))
            filters = -np.sort(-_masked(filters, n_filters), 1)
            filters[:, 1:][filters[:, 1:] == filters[:, :-1]] = -1  # drop repeats, keep pads last
            sort_order = rng.choice(5, n, p=[0.5, 0.2, 0.1, 0.1, 0.1])  # relevance, price up/down, rating, new
            cols.update(category_id=self.topic_cat[intent], filters=-np.sort(-filters, 1), sort_order=sort_order)
            click += -5.3 + 0.1 * (sort_order == 0)
            conv += -3.45 + 0.2 * (sort_order == 1) + 0.1 * n_filters
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.3, 0.4), match=(1.4, 0.7))
        # homepage and cart reveal the intent only through categories
        scores = np.full((n, _NCAT), -2.0)
        rows = np.arange(n)
        for j in range(_NFAV):
            scores[rows, self.topic_cat[self._favs[user, j]]] += 4 * self._fav_w[user, j]
        scores[rows, self.topic_cat[intent]] += 6.0
        if placement == "homepage":
            cats = _topk(rng, scores, 1 + rng.binomial(9, 0.4, n), 10)
            cols.update(recent_browse_categories=cats)
            click += -5.45 + 0.1 * weekend
            conv += -3.4
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.15, 0.2), match=(1.3, 0.5), cats=cats)
        if placement == "cart":
            size = 1 + rng.poisson(1.5 + 0.5 * np.maximum(buyer, 0))
            stage = rng.choice(4, n, p=[0.5, 0.25, 0.15, 0.1])  # cart, shipping, payment, review
            value = rng.gamma(size, 35.0)
            cats = _topk(rng, scores, size, 10)
            cols.update(cart_size=size, cart_value=value, checkout_stage=stage, cart_categories=cats)
            click += -5.3 - 0.25 * stage
            conv += -3.15 + 0.15 * stage + 0.1 * np.log1p(value / 100)
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.35, 0.25), match=(1.2, 0.6), cats=cats)
        raise ValueError(f"unknown placement {placement!r}")
