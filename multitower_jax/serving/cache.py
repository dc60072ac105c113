"""A thread-safe TTL + LRU cache of user embeddings: users change slowly, requests come often.

    cache = TTLCache(ttl_s=300, max_size=100_000)
    e_user_BxD = cache.get_many(user_ids, compute=lambda missing_ids: user_tower(...))
    entry = cache.get(user_id)        # any value: the Ranker keeps (embedding, country, device)

An entry older than `ttl_s` counts as a miss and is recomputed; past `max_size` entries the
least recently used leave first. `compute` runs once per call for all the misses together, so
the user tower sees one batch, not one call per user.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np


class TTLCache:
    """key -> value (an np.ndarray row for `get_many`), with expiry and a size bound. `clock` is
    injectable for tests. `hits` / `misses` count the lookups of `get` and `get_many`."""

    def __init__(self, ttl_s: float, max_size: int, clock: Callable[[], float] = time.monotonic):
        if ttl_s < 0 or max_size < 1:
            raise ValueError(f"TTLCache: need ttl_s >= 0 and max_size >= 1, got {ttl_s}, {max_size}")
        self.ttl_s, self.max_size, self.clock = float(ttl_s), int(max_size), clock
        self._entries: collections.OrderedDict[Hashable, tuple[float, Any]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any:
        """The fresh value of `key`, or None (expired entries are dropped)."""
        with self._lock:
            value = self._get_locked(key, self.clock())
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def _get_locked(self, key: Hashable, now: float) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored, value = entry
        if now - stored > self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = (self.clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)

    def get_many(self, keys: Sequence[Hashable], compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """Rows for `keys` stacked [B, ...]; `compute(indices of the misses)` returns their rows.

        A key that appears twice is computed once. Concurrent callers that miss the same key may
        both compute it (the results are equal); the lock is not held while computing.
        """
        now = self.clock()
        first_miss: dict[Hashable, int] = {}
        with self._lock:
            found = [self._get_locked(k, now) for k in keys]
            for i, (k, v) in enumerate(zip(keys, found)):
                if v is None and k not in first_miss:
                    first_miss[k] = i
            self.hits += sum(v is not None for v in found)
            self.misses += len(first_miss)
        if first_miss:
            computed = np.asarray(compute(list(first_miss.values())))
            for row, (k, i) in zip(computed, first_miss.items()):
                self.put(k, row)
            by_key = dict(zip(first_miss, computed))
            found = [v if v is not None else by_key[k] for k, v in zip(keys, found)]
        return np.stack(found)
