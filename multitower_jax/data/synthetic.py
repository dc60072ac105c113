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

The users, ads, vocabulary and context tables are `synthetic_catalogue.Catalogue`'s; `World`
adds the impressions: who sees which ad, in which context, and with which probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from multitower_jax import features as F
from multitower_jax.data import schema
from multitower_jax.data.synthetic_catalogue import (NCAT, NFAV, PRODUCTS_PER_TOPIC, QUERIES_PER_POOL, Catalogue,
                                                     GroupSampler, emit, masked, sigmoid, topk, zipf)

SPLITS = ("train", "validation", "test")
EPOCH = 1_704_067_200  # 2024-01-01 00:00 UTC, a Monday
SPLIT_DAYS = {"train": (0, 28), "validation": (28, 35), "test": (35, 42)}  # time-based splits
_BLOCK = 4096  # rows per RNG stream, so the output does not depend on chunk_size


class World(Catalogue):
    """The latent world, built once from ``config.synthetic``; impressions are drawn lazily."""

    def __init__(self, syn: ml_collections.ConfigDict, spec: F.FeatureSpec):
        super().__init__(syn, spec)
        T = self.num_topics
        pair = self._rng(5)  # standardize the taste dot product on random pairs
        aff = self._affinity(pair.integers(0, self.first_new_user, 8192), pair.integers(0, self.num_ads, 8192), 0, 1)
        self._aff_mu, self._aff_sd = float(aff.mean()), float(aff.std()) + 1e-9
        groups = np.concatenate([self._ad_topic, T + self._ad_cat, np.full(self.num_ads, T + NCAT)])
        ads = np.tile(np.arange(self.num_ads), 3)
        self._ad_sampler = GroupSampler(groups, ads, np.tile(self._ad_pop, 3), T + NCAT + 1)
        self._times: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _affinity(self, user: np.ndarray, ad: np.ndarray, mu: float, sd: float) -> np.ndarray:
        return ((self._u_taste[user] * self._ad_taste[ad]).sum(1) - mu) / sd

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
        fav = self._favs[user, (rng.random(n)[:, None] > self._fav_cdf[user]).sum(1).clip(max=NFAV - 1)]
        intent = np.where(rng.random(n) < 0.6, fav, rng.integers(0, self.num_topics, n))
        icat = self.topic_cat[intent]
        ctx = self._context(placement, rng, user, intent, hour, dow)
        # The ad server retrieves ads of the intent topic, its category, or the popular ones.
        mode, (p_topic, p_cat), (m_topic, m_cat) = rng.random(n), ctx["retrieval"], ctx["match"]
        popular = self.num_topics + NCAT  # the group of all ads
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
        p_click = sigmoid(logit_click).astype(np.float32)
        p_conv = sigmoid(logit_conv).astype(np.float32)
        click = rng.random(n) < p_click
        conversion = click & (rng.random(n) < p_conv)  # conversions only happen after a click
        if latent is not None:  # for the oracle's ranking of every ad (`oracle_click_logits`)
            latent.update(user=user, intent=intent, hour=hour, cats=ctx.get("cats"), m=(m_topic, m_cat),
                          base=ctx["click"] + self._u_bias[user])
        spec = self.spec.context(placement)
        rows = {"impression_id": ((p_idx * len(SPLITS) + s_idx) << 40) + i, "user_id": user.astype(np.int64),
                "ad_id": ad.astype(np.int64), "timestamp": ts, "click": click.astype(np.int64),
                "conversion": conversion.astype(np.int64), "p_click": p_click, "p_convert_given_click": p_conv}
        rows.update({f"context.{f.name}": emit(f, ctx["cols"][f.name]) for f in spec.features})
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
            buy = (rng.random(n) < sigmoid(-1.2 + 0.8 * buyer + 0.2 * (nq - 1))).astype(np.int64)
            work = (hour >= 9) & (hour < 18) & (dow < 5)
            p_home, p_work = np.where(work, 0.35, 0.75), np.where(work, 0.5, 0.05)
            u = rng.random(n)
            loc = (u >= p_home).astype(np.int64) + (u >= p_home + p_work)  # home, work, other
            cols.update(query=self._queries[intent, buy, zipf(rng, QUERIES_PER_POOL, 1.0, n)],
                        num_queries_in_session=nq, time_since_session_start=rng.gamma(nq, 45.0), pages_viewed=pages,
                        city=np.where(rng.random(n) < 0.9, self._u_city[user], zipf(rng, 5000, 0.8, n)),
                        location_type=loc)
            click += -5.55 + 0.3 * buy - 0.12 * np.log(nq) - 0.15 * (loc == 2)
            conv += -3.75 + 0.8 * buy + 0.1 * np.log1p(pages)
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.4, 0.15), match=(2.0, 0.6))
        if placement == "product_page":
            j = zipf(rng, PRODUCTS_PER_TOPIC, 1.0, n)
            price, rating = self._prod_price[intent, j], self._prod_rating[intent, j]
            cols.update(viewed_product_id=intent * PRODUCTS_PER_TOPIC + j, viewed_category=self.topic_cat[intent],
                        viewed_price=price, num_reviews=self._prod_reviews[intent, j], rating=rating)
            click += -5.4 + 0.15 * (rating - 4.1)
            conv += -3.3 - 0.15 * (np.log(price) - 3.5)
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.45, 0.2), match=(1.5, 0.6))
        if placement == "category_browse":
            n_filters = rng.choice(5, n, p=[0.3, 0.3, 0.2, 0.12, 0.08])
            own = self._topic_filters[intent[:, None], rng.integers(0, 6, (n, 8))]
            filters = np.where(rng.random((n, 8)) < 0.8, own, rng.integers(0, 64, (n, 8)))
            filters = -np.sort(-masked(filters, n_filters), 1)
            filters[:, 1:][filters[:, 1:] == filters[:, :-1]] = -1  # drop repeats, keep pads last
            sort_order = rng.choice(5, n, p=[0.5, 0.2, 0.1, 0.1, 0.1])  # relevance, price up/down, rating, new
            cols.update(category_id=self.topic_cat[intent], filters=-np.sort(-filters, 1), sort_order=sort_order)
            click += -5.3 + 0.1 * (sort_order == 0)
            conv += -3.45 + 0.2 * (sort_order == 1) + 0.1 * n_filters
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.3, 0.4), match=(1.4, 0.7))
        # homepage and cart reveal the intent only through categories
        scores = np.full((n, NCAT), -2.0)
        rows = np.arange(n)
        for j in range(NFAV):
            scores[rows, self.topic_cat[self._favs[user, j]]] += 4 * self._fav_w[user, j]
        scores[rows, self.topic_cat[intent]] += 6.0
        if placement == "homepage":
            cats = topk(rng, scores, 1 + rng.binomial(9, 0.4, n), 10)
            cols.update(recent_browse_categories=cats)
            click += -5.45 + 0.1 * weekend
            conv += -3.4
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.15, 0.2), match=(1.3, 0.5), cats=cats)
        if placement == "cart":
            size = 1 + rng.poisson(1.5 + 0.5 * np.maximum(buyer, 0))
            stage = rng.choice(4, n, p=[0.5, 0.25, 0.15, 0.1])  # cart, shipping, payment, review
            value = rng.gamma(size, 35.0)
            cats = topk(rng, scores, size, 10)
            cols.update(cart_size=size, cart_value=value, checkout_stage=stage, cart_categories=cats)
            click += -5.3 - 0.25 * stage
            conv += -3.15 + 0.15 * stage + 0.1 * np.log1p(value / 100)
            return dict(cols=cols, click=click, conv=conv, retrieval=(0.35, 0.25), match=(1.2, 0.6), cats=cats)
        raise ValueError(f"unknown placement {placement!r}")
