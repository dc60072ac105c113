"""Multi-hot lists of strings in the logs: `vocab` and `hash` encodings, text cells split at the feature's
separator or list columns, `min_count` counted in the statistics pass, clear errors (issue 15)."""

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from multitower_jax import features as F
from multitower_jax.data import logs, multi_hot, preprocess
from multitower_jax.data.catalogue_columns import read_column
from multitower_jax.retrieval import export
from multitower_jax.serving import requests as requests_lib
from tests.test_logs import T0, make_config, make_rows, write

GENRES = ("Comedy", "Drama", "Film-Noir", "Children's", "Sci-Fi")
M64 = 2**64 - 1


def _config(path, *overrides):
    config, _ = make_config([path], *overrides)
    config.features.context.search.genres = dict(type="multi_hot", size=len(GENRES), max_items=3, dim=4,
                                                 encoding="vocab", vocab=GENRES)
    config.features.context.search.tags = dict(type="multi_hot", size=7, max_items=4, dim=4, encoding="hash",
                                               separator=";", min_count=2)
    return config, F.parse_spec(config.features)


GENRE_LISTS = [["Comedy", "Drama"], ["Sci-Fi"], [], ["Western", "Drama"], ["Comedy", "Children's", "Drama", "Sci-Fi"],
               ["Film-Noir"], ["Drama"], ["Comedy"]]
TAG_LISTS = [["a b", "c"], ["c"], ["zz"], [], ["a b", "c", "d", "e", "f"], ["c"], ["d"], ["a b"]]


def _key(s: str) -> int:  # blake2b-64 of the string, sign bit cleared
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _bucket(key: int, size: int) -> int:  # splitmix64's finalizer, in Python integers
    z = (key + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return (z ^ (z >> 31)) % size + 1


def _rows(spec, fmt):
    cols = make_rows(spec, len(GENRE_LISTS), seed=7)
    cols["timestamp"] = [T0 + i for i in range(len(GENRE_LISTS))]  # all in train
    if fmt == "csv":  # text cells: the genres at "|", the tags at the feature's ";" (items keep their spaces)
        cols["context.genres"] = [" | ".join(g) for g in GENRE_LISTS]
        cols["context.tags"] = [";".join(t) for t in TAG_LISTS]
    else:  # list columns
        cols["context.genres"], cols["context.tags"] = GENRE_LISTS, TAG_LISTS
    return cols


def _train(config, spec):
    chunks = list(logs.read_chunks(config, spec, "search", "train", report := {}))
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.argsort(rows["timestamp"])
    return {k: v[order] for k, v in rows.items()}, report


def _padded(lists, width):
    return np.array([(items + [-1] * width)[:width] for items in lists])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_string_lists_are_stored_by_vocab_index_and_hash_key(tmp_path, fmt):
    config, spec = _config(tmp_path / f"a.{fmt}")
    write(tmp_path / f"a.{fmt}", _rows(spec, fmt))
    rows, report = _train(config, spec)
    want_genres = [[GENRES.index(g) if g in GENRES else -1 for g in items] for items in GENRE_LISTS]
    np.testing.assert_array_equal(rows["context.genres"], _padded(want_genres, 3))
    np.testing.assert_array_equal(rows["context.tags"], _padded([[_key(t) for t in items] for items in TAG_LISTS], 4))
    # 'Western' is unknown (a kept item); row 5's 4th genre is cut off, not counted
    assert report["oov"]["context.genres"] == 1 and "context.tags" not in report["oov"]
    assert report["truncated_multi_hot"]["context.genres"] == 1 and report["truncated_multi_hot"]["context.tags"] == 1

    # The statistics pass counts the tags' items; the model sees buckets + 1, rarer than min_count=2 -> 0
    stats = preprocess.compute_stats([rows], spec, "search")
    batch = preprocess.Preprocessor(spec, "search", stats)(rows)
    counts = {}
    for items in TAG_LISTS:
        for t in items[:4]:
            counts[t] = counts.get(t, 0) + 1
    want_tags = [[_bucket(_key(t), 7) if counts[t] >= 2 else 0 for t in items[:4]] for items in TAG_LISTS]
    np.testing.assert_array_equal(batch["context"]["tags"], _padded(want_tags, 4).clip(0))
    np.testing.assert_array_equal(batch["context"]["genres"], _padded(want_genres, 3) + 1)
    assert stats.kept_values("context.tags", 2).tolist() == sorted(_key(t) for t in ("a b", "c", "d"))


def test_integer_ids_with_hash_encoding_and_python_lists(tmp_path):
    """Integer items of a hash list are keys as they are (CSV: integer-looking items too, as categoricals');
    `encode_lists` (requests, catalogues) gives what ingest stores."""
    config, spec = _config(tmp_path / "a.csv")
    cols = _rows(spec, "csv")
    cols["context.tags"][0] = "12;x"
    write(tmp_path / "a.csv", cols)
    rows, _ = _train(config, spec)
    assert rows["context.tags"][0].tolist() == [12, _key("x"), -1, -1]
    f = spec.context("search")["tags"]
    lists = [[12, "x"], *TAG_LISTS[1:]]
    np.testing.assert_array_equal(multi_hot.encode_lists(lists, f), rows["context.tags"])
    genres = spec.context("search")["genres"]
    np.testing.assert_array_equal(multi_hot.encode_lists(GENRE_LISTS, genres), rows["context.genres"])
    with pytest.raises(ValueError, match="encoding 'vocab' or 'hash'"):
        multi_hot.encode_lists([["Comedy"]], spec.context("search")["filters"])


def test_bad_lists_name_file_row_field_and_fix(tmp_path):
    config, spec = _config(tmp_path / "a.csv")
    cols = _rows(spec, "csv")
    cols["context.filters"][4] = "3|Comedy"  # an ids feature given a string
    write(tmp_path / "a.csv", cols)
    with pytest.raises(logs.LogError) as e:
        _train(config, spec)
    for part in ("a.csv", "row 5:", "'context.filters'", "encoding 'vocab' or 'hash'", "'Comedy'"):
        assert part in str(e.value), (part, str(e.value))

    config, spec = _config(tmp_path / "b.parquet")
    cols = _rows(spec, "parquet")
    cols["context.tags"] = [[5, -3] if i == 2 else [i] for i in range(len(TAG_LISTS))]  # integer keys: >= 0
    write(tmp_path / "b.parquet", cols)
    with pytest.raises(logs.LogError, match=r"b.parquet: row 3: column 'context.tags'.*got -3"):
        _train(config, spec)


@pytest.mark.parametrize("change,fragment", [
    (dict(encoding="vocab", vocab=("a", "b")), "vocab has 2 entries but size is 5"),
    (dict(encoding="words"), "encoding: expected 'ids', 'hash' or 'vocab'"),
    (dict(encoding="hash", separator=""), "separator: expected a non-empty string"),
    (dict(min_count=-1), "min_count: expected an integer >= 0"),
])
def test_bad_specs_name_the_key(change, fragment):
    raw = {"user": {"a": dict(type="numeric")}, "ad": {"b": dict(type="numeric")},
           "context": {"search": {"g": dict(type="multi_hot", size=5, max_items=2, dim=2, **change)}}}
    with pytest.raises(F.SpecError, match=f"config.features.context.search.g.*{fragment}"):
        F.parse_spec(raw)


def test_requests_and_catalogues_take_string_lists_as_ingest_stores_them(tmp_path):
    """A request's lists of strings and a catalogue's list<string> column or text cells become the
    stored items that ingest writes for the same lists, so a tower sees one id per genre everywhere."""
    config, spec = _config(tmp_path / "a.parquet")
    write(tmp_path / "a.parquet", _rows(spec, "parquet"))
    rows, _ = _train(config, spec)
    genres, tags = spec.context("search")["genres"], spec.context("search")["tags"]
    np.testing.assert_array_equal(requests_lib.raw_column(genres, GENRE_LISTS, "request.context.genres"),
                                  rows["context.genres"])
    np.testing.assert_array_equal(requests_lib.raw_column(tags, TAG_LISTS, "request.context.tags"), rows["context.tags"])
    with pytest.raises(requests_lib.RequestError, match=r"request.context.filters: .*encoding 'vocab' or 'hash'"):
        requests_lib.raw_column(spec.context("search")["filters"], [["Comedy"]], "request.context.filters")
    with pytest.raises(requests_lib.RequestError, match="expected a list of strings"):
        requests_lib.raw_column(genres, ["Comedy"], "request.context.genres")
    catalogue = pa.record_batch({"genres": pa.array(GENRE_LISTS, pa.list_(pa.string())),
                                 "tags": pa.array([";".join(t) for t in TAG_LISTS])})
    path = tmp_path / "ads.parquet"
    np.testing.assert_array_equal(read_column(catalogue, "genres", genres, 0, path), rows["context.genres"])
    np.testing.assert_array_equal(read_column(catalogue, "tags", tags, 0, path), rows["context.tags"])
    with pytest.raises(export.CatalogueError, match=r"ads.parquet: column 'genres' holds strings.*'ids'"):
        read_column(catalogue, "genres", spec.context("search")["filters"], 0, path)
