"""Raw impressions of one split as columns in memory, and the word view of their texts.

The baselines read the same stored blocks the model trains on (`pipeline.data_source`), in
storage order. Dense vectors (interest, image embeddings) are left out: the baselines use the
ids, categorical, numeric, text and multi-hot columns.
"""

from __future__ import annotations

import dataclasses
import zlib

import ml_collections
import numpy as np

from multitower_jax import features as F
from multitower_jax.baselines import BaselineError
from multitower_jax.data import builders, pipeline
from multitower_jax.data.schema import mix64
from multitower_jax.data.tokenizer import HashTokenizer

LABELS = ("click", "conversion")
ID_COLUMNS = ("user_id", "ad_id")
ORACLE = ("p_click", "p_convert_given_click")  # synthetic data only; never a learner's input
META = (*ID_COLUMNS, *LABELS, "timestamp", *ORACLE)
_WORDS = HashTokenizer(vocab_size=3, max_len=1).words  # the model's word splitting


@dataclasses.dataclass
class Table:
    """One split's raw columns (``<tower>.<feature>``, ids, labels), all of equal length."""

    columns: dict[str, np.ndarray]
    features: dict[str, F.Feature]  # raw column name -> feature, for this placement

    def __len__(self) -> int:
        return len(self.columns["click"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def with_columns(self, extra: dict[str, np.ndarray]) -> Table:
        """The same rows with derived columns added (names with a ":", e.g. ``lsa_cos:context.query``)."""
        return Table({**self.columns, **extra}, self.features)

    @property
    def derived(self) -> list[str]:
        return [name for name in self.columns if ":" in name]

    def take(self, rows: np.ndarray) -> Table:
        return Table({k: v[rows] for k, v in self.columns.items()}, self.features)

    @property
    def click(self) -> np.ndarray:
        return self.columns["click"].astype(np.float64)

    @property
    def ctcvr(self) -> np.ndarray:
        return (self.columns["click"] * self.columns["conversion"]).astype(np.float64)

    def of_type(self, kind: type) -> list[str]:
        return [name for name, f in self.features.items() if isinstance(f, kind) and name in self.columns]


def has_split(config: ml_collections.ConfigDict, placement: str, split: str) -> bool:
    builder = builders.open_dataset(config.data.dir, config.data.source, placement)
    return split in builder.info.splits


def load_split(config: ml_collections.ConfigDict, placement: str, split: str, progress: bool = True) -> Table:
    """Every row of one placement's split, read block by block (a tqdm bar per split)."""
    if not builders.dataset_dir(config.data.dir, config.data.source, placement).exists():
        raise BaselineError(f"no {config.data.source} dataset for placement {placement!r} under {config.data.dir}: "
                            f"run `multitower generate` / `ingest` (or set --config.data.dir)")
    if not has_split(config, placement, split):
        raise BaselineError(f"{config.data.dir}: the {placement} dataset has no {split!r} split")
    features = {name: f for name, f in F.parse_spec(config.features).columns(placement).items()
                if not isinstance(f, F.Dense)}
    wanted = set(features) | set(META)
    parts: dict[str, list[np.ndarray]] = {}
    source = pipeline.data_source(config, placement, split)
    for block in pipeline.raw_blocks(source, progress=f"read {placement}/{split}" if progress else None):
        for name in wanted & set(block):
            parts.setdefault(name, []).append(block[name])
    missing = [c for c in ("click", "conversion") if c not in parts]
    if missing:
        raise BaselineError(f"{config.data.dir}: the {placement}/{split} split has no {missing} column")
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    return Table(columns, {k: f for k, f in features.items() if k in columns})


def factorize(values) -> tuple[list, np.ndarray]:
    """(distinct values in order of appearance, int64 index of each value among them)."""
    index: dict = {}
    inverse = np.fromiter((index.setdefault(v, len(index)) for v in values), np.int64, len(values))
    return list(index), inverse


def as_str(text) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def _word_key(word: str) -> int:
    return zlib.crc32(word.encode()) + 1  # 0 pads


def word_matrix(texts: np.ndarray, max_words: int = 32) -> np.ndarray:
    """int64[n, L]: each text's distinct words as stable positive keys, 0-padded (L <= max_words).

    Texts repeat (an ad's title on every impression, popular queries), so each distinct text is
    split once."""
    distinct, inverse = factorize(texts)
    rows = [list(dict.fromkeys(_word_key(w) for w in _WORDS(as_str(text))))[:max_words] for text in distinct]
    width = max((len(r) for r in rows), default=0) or 1
    unique = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        unique[i, :len(r)] = r
    return unique[inverse]


def overlap(a_NxL: np.ndarray, b_NxM: np.ndarray) -> np.ndarray:
    """int[n]: how many of a row's (distinct, non-pad) words in `a` also occur in `b`."""
    hit = (a_NxL[:, :, None] == b_NxM[:, None, :]).any(-1) & (a_NxL > 0)
    return hit.sum(1)


def text_words(table: Table) -> dict[str, np.ndarray]:
    """{text column: word matrix}, computed once per table."""
    return {name: word_matrix(table[name]) for name in table.of_type(F.Text)}


def query_and_ad_texts(table: Table) -> tuple[list[str], list[str]]:
    """(context text columns, ad text columns): the pairs word crosses and overlaps are made of."""
    texts = table.of_type(F.Text)
    return [c for c in texts if c.startswith("context.")], [c for c in texts if c.startswith("ad.")]


def overlap_counts(table: Table, words: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Word-overlap counts between every context (query) text and every ad text, plus text lengths."""
    queries, ads = query_and_ad_texts(table)
    out = {}
    for q in queries:
        for a in ads:
            out[f"overlap:{q}:{a}"] = overlap(words[q], words[a])
        if ads:
            both = np.concatenate([words[a] for a in ads], axis=1)
            out[f"overlap:{q}:ad"] = overlap(words[q], both)
            out[f"overlap_frac:{q}:ad"] = out[f"overlap:{q}:ad"] / np.maximum((words[q] > 0).sum(1), 1)
    for name, w in words.items():
        out[f"num_words:{name}"] = (w > 0).sum(1)
    return out


def id_keys(table: Table, name: str) -> np.ndarray:
    """int64 keys of an id column, or of a cross ``"a*b"`` of two columns (one key per pair)."""
    parts = name.split("*")
    for p in parts:
        if p not in table:
            raise BaselineError(f"no column {p!r} in the data (have {sorted(table.columns)})")
        if table[p].ndim != 1 or table[p].dtype.kind not in "iu":
            raise BaselineError(f"column {p!r} is not an integer id column")
    key = table[parts[0]].astype(np.int64)
    for p in parts[1:]:
        key = (mix64(key) ^ table[p].astype(np.uint64)).view(np.int64)
    return key
