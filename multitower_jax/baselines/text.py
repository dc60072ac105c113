"""Query-ad text similarity fitted without labels: LSA (TF-IDF + truncated SVD) of the train
split's distinct ad and context texts, and k-means topics of the ad vectors.

Word overlap misses a query and an ad about one topic in different words; the LSA space puts
a topic's words together. Per row, for every context text (the search query) against the ad's
texts (all ad text columns together):

* ``lsa_cos:<q>``: cosine of the query and ad vectors
* ``profile_cos:<q>``: cosine of the user's train query profile (mean query vector) and the ad
* ``topic:<q>`` / ``topic:ad``: the nearest k-means topic of the query / the ad, and
  ``same_topic:<q>`` whether they agree

Nothing here reads a label, so the train rows' values are computed from the full train split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from multitower_jax.baselines.data import Table, as_str, factorize, query_and_ad_texts


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


@dataclasses.dataclass
class TextSpace:
    dims: int = 128
    topics: int = 64
    seed: int = 0
    vectorizer: object = None
    svd: object = None
    centroids: np.ndarray | None = None
    profiles: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    def _ad_docs(self, table: Table, ads: list[str]) -> tuple[list[str], np.ndarray]:
        distinct, inverse = factorize(list(zip(*(table[a] for a in ads))))
        return [" ".join(as_str(t) for t in texts) for texts in distinct], inverse

    def _embed(self, docs: list[str]) -> np.ndarray:
        return _unit(self.svd.transform(self.vectorizer.transform(docs)))

    def fit(self, train: Table) -> TextSpace:
        from sklearn.cluster import KMeans  # noqa: PLC0415
        from sklearn.decomposition import TruncatedSVD  # noqa: PLC0415
        from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415

        queries, ads = query_and_ad_texts(train)
        if not (queries and ads):
            return self
        ad_docs, _ = self._ad_docs(train, ads)
        query_docs = {q: factorize(train[q]) for q in queries}
        docs = ad_docs + [as_str(t) for q in queries for t in query_docs[q][0]]
        self.vectorizer = TfidfVectorizer(sublinear_tf=True, lowercase=True, token_pattern=r"[0-9a-z]+").fit(docs)
        tfidf = self.vectorizer.transform(docs)
        dims = max(1, min(self.dims, tfidf.shape[1] - 1, tfidf.shape[0] - 1))
        self.svd = TruncatedSVD(dims, random_state=self.seed).fit(tfidf)
        ad_vectors = self._embed(ad_docs)
        k = max(1, min(self.topics, len(ad_docs)))
        self.centroids = KMeans(k, n_init=1, random_state=self.seed).fit(ad_vectors).cluster_centers_
        # A user's query profile: the mean of their train queries' vectors.
        if "user_id" in train:
            for q in queries:
                distinct, inverse = query_docs[q]
                users, user_index = np.unique(train["user_id"], return_inverse=True)
                counts = sp.csr_matrix((np.ones(len(inverse)), (user_index, inverse)), shape=(len(users), len(distinct)))
                self.profiles[q] = (users, _unit(counts @ self._embed([as_str(t) for t in distinct])))
        return self

    def features(self, table: Table) -> dict[str, np.ndarray]:
        queries, ads = query_and_ad_texts(table)
        if self.svd is None or not (queries and ads):
            return {}
        ad_docs, inverse = self._ad_docs(table, ads)
        ad_vectors = self._embed(ad_docs)
        ad_topic = np.argmax(ad_vectors @ self.centroids.T, axis=1)
        out = {"topic:ad": ad_topic[inverse]}
        ad_rows = ad_vectors[inverse]
        for q in queries:
            distinct, q_inverse = factorize(table[q])
            q_vectors = self._embed([as_str(t) for t in distinct])
            out[f"lsa_cos:{q}"] = np.einsum("nd,nd->n", q_vectors[q_inverse], ad_rows)
            q_topic = np.argmax(q_vectors @ self.centroids.T, axis=1)[q_inverse]
            out[f"topic:{q}"] = q_topic
            out[f"same_topic:{q}"] = (q_topic == out["topic:ad"]).astype(np.int64)
            if q in self.profiles and "user_id" in table:
                users, vectors = self.profiles[q]
                pos = np.clip(np.searchsorted(users, table["user_id"]), 0, len(users) - 1)
                seen = users[pos] == table["user_id"]
                profile = np.where(seen[:, None], vectors[pos], 0.0)
                out[f"profile_cos:{q}"] = np.einsum("nd,nd->n", profile, ad_rows)
        return out
