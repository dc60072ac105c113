"""A deterministic hashing word tokenizer: no vocabulary file, no network, stable across processes.

Words are lower-cased runs of letters and digits; each word maps to one of
``vocab_size - 2`` buckets by CRC32 (ids 0 and 1 are reserved for padding and [CLS]).
Texts repeat a lot in ad logs (the same ad titles, popular queries), so each distinct text is
tokenized once and kept as a row of a token table; a batch is then one fancy-index.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

PAD_ID = 0
CLS_ID = 1
NUM_RESERVED = 2
_WORD = re.compile(r"[0-9a-z]+")


class HashTokenizer:
    def __init__(self, vocab_size: int, max_len: int, cache_size: int = 1 << 20):
        if vocab_size <= NUM_RESERVED:
            raise ValueError(f"vocab_size must exceed {NUM_RESERVED}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self._cache_size = cache_size
        self._reset()

    def _reset(self) -> None:
        self._row: dict[str | bytes, int] = {}  # text -> row of the token table
        self._tokens = np.zeros((1024, self.max_len), np.int32)
        self._truncated = np.zeros(1024, bool)

    def words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def tokenize(self, text: str | bytes) -> tuple[np.ndarray, bool]:
        """(int32[max_len] token ids padded with 0, whether the text had more than max_len words)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        words = self.words(text)
        ids = np.zeros(self.max_len, np.int32)
        n = min(len(words), self.max_len)
        buckets = self.vocab_size - NUM_RESERVED
        ids[:n] = [NUM_RESERVED + zlib.crc32(w.encode()) % buckets for w in words[:n]]
        return ids, len(words) > self.max_len

    def _add(self, text: str | bytes) -> int:
        row = len(self._row)
        if row == len(self._tokens):
            self._tokens = np.concatenate([self._tokens, np.zeros_like(self._tokens)])
            self._truncated = np.concatenate([self._truncated, np.zeros_like(self._truncated)])
        self._tokens[row], self._truncated[row] = self.tokenize(text)
        self._row[text] = row
        return row

    def encode_batch(self, texts) -> tuple[np.ndarray, int]:
        """(int32[n, max_len] token ids, number of truncated texts) for str or bytes texts."""
        get = self._row.get
        rows = np.fromiter((get(t, -1) for t in texts), np.int64, len(texts))
        if rows.size and rows.min() < 0:  # some texts are new
            if len(self._row) + len(rows) > self._cache_size:
                self._reset()
            cache = self._row
            rows = np.fromiter((cache[t] if t in cache else self._add(t) for t in texts), np.int64, len(texts))
        return self._tokens[rows], int(np.count_nonzero(self._truncated[rows]))
