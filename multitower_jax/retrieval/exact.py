"""Exact top-k by dot product, done well: the baseline ANN figures are measured against.

The database is an argument of one jitted program (not a constant baked into it, which made
XLA copy and fold 512 MB per compilation). Each query chunk scans the database in fixed-size
blocks with `lax.scan`: one [B, L] matmul, `lax.top_k` inside the block, merged into a running
[B, k] best list. The full [B, N] score matrix never exists, so the working set stays in cache
whatever N is. Padding rows (N rounded up to a whole number of blocks) score -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_ROWS = 65_536  # database rows per scan step (measured: 16k-row blocks were slower on 2 cores)
QUERY_CHUNK = 512  # queries per batched call (the last chunk is padded: one compilation)


@functools.partial(jax.jit, static_argnames=("k",))
def _blocked_top_k(q_BxD, db_MxLxD, num_rows, k: int):
    """(scores float32[B, k], rows int32[B, k]) of the k best rows of the blocked database,
    best first; rows >= num_rows (padding) never win."""
    B = q_BxD.shape[0]
    L = db_MxLxD.shape[1]
    kk = min(k, L)

    def step(carry, xs):
        best_s, best_i = carry
        block_LxD, base = xs
        s_BxL = q_BxD @ block_LxD.T
        s_BxL = jnp.where((base + jnp.arange(L))[None, :] < num_rows, s_BxL, -jnp.inf)
        top_s, top_i = jax.lax.top_k(s_BxL, kk)
        both_s = jnp.concatenate([best_s, top_s], axis=1)
        both_i = jnp.concatenate([best_i, top_i + base], axis=1)
        new_s, pos = jax.lax.top_k(both_s, k)
        return (new_s, jnp.take_along_axis(both_i, pos, axis=1)), None

    init = (jnp.full((B, k), -jnp.inf, q_BxD.dtype), jnp.full((B, k), -1, jnp.int32))
    bases = jnp.arange(db_MxLxD.shape[0], dtype=jnp.int32) * L
    (scores, rows), _ = jax.lax.scan(step, init, (db_MxLxD, bases))
    return scores, rows


class ExactSearch:
    """Exact maximum-inner-product top-k over `db_NxD` (float32), on the default JAX device.

    `search(q, k)` pads the queries to whole `query_chunk`s (one compilation per k); a single
    query (`search_one`) runs a [1, D] program of its own, so single-query latency is not paid
    at chunk size.
    """

    def __init__(self, db_NxD: np.ndarray, block_rows: int = BLOCK_ROWS, query_chunk: int = QUERY_CHUNK):
        db_NxD = np.asarray(db_NxD, np.float32)
        if db_NxD.ndim != 2 or len(db_NxD) == 0:
            raise ValueError(f"ExactSearch: expected a non-empty float32[N, D] database, got shape {db_NxD.shape}")
        self.num_rows, self.dim = db_NxD.shape
        L = max(1, min(block_rows, self.num_rows))
        M = -(-self.num_rows // L)
        padded = np.zeros((M * L, self.dim), np.float32)
        padded[:self.num_rows] = db_NxD
        self.db_MxLxD = jnp.asarray(padded.reshape(M, L, self.dim))
        self.query_chunk = query_chunk

    def _call(self, q_BxD: np.ndarray, k: int):
        return _blocked_top_k(jnp.asarray(q_BxD), self.db_MxLxD, self.num_rows, k)

    def search(self, q_BxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64[B, k'], scores float32[B, k']) with k' = min(k, N), best first."""
        q_BxD = np.asarray(q_BxD, np.float32)
        k = min(k, self.num_rows)
        B, C = len(q_BxD), self.query_chunk
        if B == 1:
            return self.search_one(q_BxD[0], k)
        padded = np.zeros((-(-B // C) * C, self.dim), np.float32)
        padded[:B] = q_BxD
        parts = [self._call(padded[s:s + C], k) for s in range(0, len(padded), C)]  # dispatched, then read
        scores = np.concatenate([np.asarray(p[0]) for p in parts])[:B]
        rows = np.concatenate([np.asarray(p[1]) for p in parts])[:B]
        return rows.astype(np.int64), scores

    def search_one(self, q_D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self._call(np.asarray(q_D, np.float32)[None], min(k, self.num_rows))
        return np.asarray(rows).astype(np.int64), np.asarray(scores)

    def warm_up(self, k: int) -> None:
        """Compile the batched and the single-query programs for this k."""
        q = np.zeros((self.query_chunk, self.dim), np.float32)
        self.search(q, k)
        self.search_one(q[0], k)
