"""An unsupervised warm start of the token table: latent semantic analysis of the train texts.

Words that mean the same thing co-occur: an ad's title and description use its product's
words, a query its intent's. A truncated SVD of the TF-IDF matrix of the distinct texts of the
train split (one document per distinct text of each tower: an ad's title + description, a
query) puts co-occurring words near each other, so a query and the ads that match it start
close in the shared token space instead of having to be pulled together by the few clicked
rows. No label is read. Only tokens that occur in the train texts are set; the others keep
their random initialization.

    table_VxD, seen_V = lsa_token_table(documents, vocab_size, dim, seed)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer

from multitower_jax import features as F
from multitower_jax.data.tokenizer import NUM_RESERVED, HashTokenizer

TEXT_INITS = ("random", "lsa")
TOKEN_TABLE = "token_embed"


def tower_documents(blocks: Iterable[Mapping[str, np.ndarray]], towers: Mapping[str, F.TowerSpec]) -> list[np.ndarray]:
    """Token ids of every distinct text document of the raw train blocks: per tower with text,
    its text features joined (as the tower's encoder sees them), each distinct one once."""
    texts = {name: spec.of_type("text") for name, spec in towers.items() if spec.of_type("text")}
    tokenizers = {f"{name}.{f.name}": HashTokenizer(f.vocab_size, f.max_len)
                  for name, fs in texts.items() for f in fs}
    seen: set[tuple] = set()
    documents = []
    for block in blocks:
        for name, fs in texts.items():
            columns = [block[f"{name}.{f.name}"] for f in fs]
            for row in zip(*columns):
                key = (name, *row)
                if key in seen:
                    continue
                seen.add(key)
                tokens = [tokenizers[f"{name}.{f.name}"].tokenize(t)[0] for f, t in zip(fs, row)]
                ids = np.concatenate(tokens)
                documents.append(ids[ids >= NUM_RESERVED])
    return documents


def lsa_token_table(documents: Sequence[np.ndarray], vocab_size: int, dim: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32[vocab_size, dim] token vectors of unit norm, bool[vocab_size] whether the token
    occurs in a document). The vectors are the right singular vectors of the TF-IDF
    document-term matrix scaled by the singular values, normalized per token."""
    rows = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    cols = np.concatenate(documents) if documents else np.zeros(0, np.int64)
    counts = scipy.sparse.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                                     shape=(len(documents), vocab_size))
    seen_V = np.asarray(counts.sum(axis=0)).ravel() > 0
    if len(documents) < 2 or seen_V.sum() < 2:
        raise ValueError(f"LSA warm start: the train split has {len(documents)} distinct texts "
                         f"and {int(seen_V.sum())} distinct words; too few to fit")
    tfidf = TfidfTransformer(sublinear_tf=True).fit_transform(counts)
    components = min(dim, min(tfidf.shape) - 1)
    svd = TruncatedSVD(n_components=components, algorithm="randomized", n_iter=7, random_state=seed)
    svd.fit(tfidf)
    table = np.zeros((vocab_size, dim), np.float32)
    table[:, :components] = (svd.components_.T * svd.singular_values_).astype(np.float32)
    table[~seen_V] = 0.0  # the SVD leaves round-off in the columns of absent words
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    table = np.where(norms > 0, table / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    return table, seen_V & (norms[:, 0] > 0)


def warm_start(table_VxD: jax.Array, lsa_VxD: np.ndarray, seen_V: np.ndarray) -> jax.Array:
    """The token table with the rows of seen tokens replaced by their LSA vectors; the other rows
    (and padding rows past the vocabulary, for sharding) keep theirs. Jitted with the table's
    sharding, so it works on a table sharded over devices and processes."""
    rows = np.flatnonzero(seen_V)
    values = jnp.asarray(lsa_VxD[rows], table_VxD.dtype)
    return jax.jit(lambda t: t.at[rows].set(values), out_shardings=getattr(table_VxD, "sharding", None))(table_VxD)
